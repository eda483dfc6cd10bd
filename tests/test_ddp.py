"""Real DDP on gloo with 2 processes (CPU): rank-sharded streams and gradients equal to one
process with the global batch."""

import os

import lightning as L
import pytest
import torch

from distrnn.config import TaskSpec
from distrnn.data.loaders import StreamLoader

from conftest import ListeningSockets
from helpers import make_module

LM = TaskSpec(kind="language_model", output_dim=40, vocab_size=40, seq_len=16)


class Streams(L.LightningDataModule):
    def __init__(self, per_rank_batch):
        super().__init__()
        self.per_rank_batch = per_rank_batch

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 40, (4001,), generator=g, dtype=torch.uint8)
        return StreamLoader(tokens, self.per_rank_batch, 16, rank=self.trainer.global_rank,
                            world_size=self.trainer.world_size)


def _fit(devices, per_rank_batch, steps, rendezvous=None, mode="tbptt", k1=16):
    module = make_module(LM, recurrence="gru", hidden=16, mode=mode, k1=k1, name="sgd", lr=0.5, seed=0)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    if rendezvous:
        rendezvous(trainer)
    trainer.fit(module, Streams(per_rank_batch))
    return module


@pytest.mark.slow
@pytest.mark.parametrize("mode,k1", [("tbptt", 16), ("checkpointed", 5)])
def test_two_ranks_equal_one_process_with_the_global_batch(loopback_rendezvous, mode, k1):
    """2 ranks x 3 streams take the same SGD steps as 1 process x 6 streams: DDP averages the
    ranks' mean losses, and the ranks read disjoint halves of the same 6 streams. Every socket the
    job listens on (the rendezvous store this process hosts, gloo's) is on 127.0.0.1.
    Checkpointed BPTT (segments of 5 steps, recomputed in a custom autograd Function): DDP's
    gradient hooks see each parameter once per update, as in one graph."""
    single = _fit(1, 6, 3, mode=mode, k1=k1)
    watch = ListeningSockets(os.getpid())
    watch.start()
    ddp = _fit(2, 3, 3, loopback_rendezvous, mode=mode, k1=k1)
    seen = watch.stop()
    assert seen and not watch.exposed(), seen
    init = make_module(LM, recurrence="gru", hidden=16, k1=16, name="sgd", lr=0.5, seed=0)
    moved = max((a - b).abs().max().item() for a, b in zip(init.state_dict().values(), ddp.state_dict().values()))
    assert moved > 1e-3  # the spawned ranks trained and their weights came back
    for (k, a), (_, b) in zip(single.state_dict().items(), ddp.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)


def _fit_ckpt(tmp_path, rendezvous, steps, ckpt_path=None, devices=2):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from distrnn.checkpoint import AtomicCheckpointIO

    L.seed_everything(0)
    module = make_module(LM, recurrence="lstm", hidden=16, k1=8, k2=12, name="adamw", lr=1e-2, seed=0)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn", max_steps=steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1, filename="{step}")],
    )
    rendezvous(trainer)
    trainer.fit(module, Streams(3), ckpt_path=ckpt_path)
    return module


@pytest.mark.slow
def test_ddp_resume_restores_every_ranks_state(tmp_path, loopback_rendezvous):
    """Resuming 2 ranks mid-epoch from a checkpoint ends with the weights of the uninterrupted run:
    the checkpoint holds both ranks' hidden states (and TBPTT histories), not rank 0's twice."""
    from distrnn.checkpoint import load_checkpoint_file

    ref = _fit_ckpt(tmp_path, loopback_rendezvous, 16)
    ckpt = tmp_path / "ck" / "step=8.ckpt"
    saved = load_checkpoint_file(ckpt)["distrnn"]
    assert saved["world_size"] == 2
    h0, h1 = (saved["ranks"][r]["carry"]["state"][0] for r in (0, 1))
    assert not torch.equal(h0, h1)  # the ranks read different streams
    resumed = _fit_ckpt(tmp_path / "b", loopback_rendezvous, 16, ckpt_path=str(ckpt))
    for (k, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)
    with pytest.raises(Exception, match="written by 2 ranks"):
        _fit_ckpt(tmp_path / "c", loopback_rendezvous, 16, ckpt_path=str(ckpt), devices=1)
