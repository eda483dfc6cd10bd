"""Real DDP on gloo with 2 processes (CPU): rank-sharded streams and gradients equal to one
process with the global batch."""

import lightning as L
import pytest
import torch

from distrnn.config import TaskSpec
from distrnn.data.loaders import StreamLoader

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


def _fit(devices, per_rank_batch, steps):
    module = make_module(LM, recurrence="gru", hidden=16, k1=16, name="sgd", lr=0.5, seed=0)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, Streams(per_rank_batch))
    return module


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_global_batch():
    """2 ranks x 3 streams take the same SGD steps as 1 process x 6 streams: DDP averages the
    ranks' mean losses, and the ranks read disjoint halves of the same 6 streams."""
    single = _fit(1, 6, 3)
    ddp = _fit(2, 3, 3)
    init = make_module(LM, recurrence="gru", hidden=16, k1=16, name="sgd", lr=0.5, seed=0)
    moved = max((a - b).abs().max().item() for a, b in zip(init.state_dict().values(), ddp.state_dict().values()))
    assert moved > 1e-3  # the spawned ranks trained and their weights came back
    for (k, a), (_, b) in zip(single.state_dict().items(), ddp.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)
