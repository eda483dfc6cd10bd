"""Real DDP on gloo with 2 processes (CPU): rank-sharded streams and gradients equal to one
process with the global batch."""

import os

import lightning as L
import pytest
import torch

from distrnn.config import TaskSpec
from distrnn.data.loaders import StreamLoader, TensorLoader

from conftest import ListeningSockets
from helpers import LogAllReduce, make_module

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


def _fit(devices, per_rank_batch, steps, rendezvous=None, mode="tbptt", k1=16, micro=None, comm_log=None):
    module = make_module(LM, recurrence="gru", hidden=16, mode=mode, k1=k1, name="sgd", lr=0.5, seed=0,
                         micro_batch_size=micro)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto", max_steps=steps,
        callbacks=[LogAllReduce(comm_log)] if comm_log else None,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    if rendezvous:
        rendezvous(trainer)
    trainer.fit(module, Streams(per_rank_batch))
    return module


@pytest.mark.slow
@pytest.mark.parametrize("mode,k1,micro", [("tbptt", 16, None), ("checkpointed", 5, None), ("tbptt", 16, 2)])
def test_two_ranks_equal_one_process_with_the_global_batch(loopback_rendezvous, tmp_path, mode, k1, micro):
    """2 ranks x 3 streams take the same SGD steps as 1 process x 6 streams: DDP averages the
    ranks' gradients of their loss sums over half the global count, and the ranks read disjoint
    halves of the same 6 streams. Every socket the
    job listens on (the rendezvous store this process hosts, gloo's) is on 127.0.0.1.
    Checkpointed BPTT (segments of 5 steps, recomputed in a custom autograd Function): DDP's
    gradient hooks see each parameter once per update, as in one graph. With micro_batch_size 2
    (each rank's 3 rows in groups of 2 and 1, the single process's 6 in 3 groups) the ranks still
    all-reduce once per update: the model's gradients fill one bucket, so each rank calls the
    all-reduce hook once for each of the 3 updates, as without groups."""
    single = _fit(1, 6, 3, mode=mode, k1=k1, micro=micro)
    watch = ListeningSockets(os.getpid())
    watch.start()
    comm_log = tmp_path / "allreduce.log"
    ddp = _fit(2, 3, 3, loopback_rendezvous, mode=mode, k1=k1, micro=micro, comm_log=comm_log)
    seen = watch.stop()
    assert seen and not watch.exposed(), seen
    assert sorted(comm_log.read_text().split()) == ["0", "0", "0", "1", "1", "1"]
    init = make_module(LM, recurrence="gru", hidden=16, k1=16, name="sgd", lr=0.5, seed=0)
    moved = max((a - b).abs().max().item() for a, b in zip(init.state_dict().values(), ddp.state_dict().values()))
    assert moved > 1e-3  # the forked ranks trained and their weights came back
    for (k, a), (_, b) in zip(single.state_dict().items(), ddp.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)


class Uneven(L.LightningDataModule):
    """``streams`` (``per_rank`` each), or ``masked``: 8 sequences of 16 steps whose labels
    lie where only some ranks' rows have them (rank r takes batches r, r + 2, ...); the mask a
    field (the loader counts every rank's rows) or, ``masked_transform``, made per batch by a
    transform (the ranks all-reduce their counts)."""

    def __init__(self, per_rank, kind):
        super().__init__()
        self.per_rank, self.kind = per_rank, kind

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        g = torch.Generator().manual_seed(0)
        if self.kind == "streams":
            # 193 inputs in 6 streams: 33 steps in stream 0 (rank 0), 32 in the others; the last
            # batch has a loss step on rank 0 only
            return StreamLoader(torch.randint(0, 40, (194,), generator=g, dtype=torch.uint8), self.per_rank, 16,
                                rank=rank, world_size=world)
        x = torch.randint(0, 40, (8, 16), generator=g)
        mask = torch.zeros(8, 16, dtype=torch.bool)
        mask[0, 5] = mask[1, 2:7] = True  # samples 0-3: rank 0's first batch; 4-7: rank 1's
        mask[5, 12:] = mask[6, 9] = True
        fields = {"x": x, "y": torch.randint(0, 40, (8, 16), generator=g), "mask": mask}
        if self.kind == "masked_transform":
            index = torch.arange(8)
            fields = {**fields, "mask": index}  # the samples' numbers, turned into their masks per batch
            return TensorLoader(fields, self.per_rank, rank=rank, world_size=world,
                                transform=lambda b: {**b, "mask": mask[b["mask"]]})
        return TensorLoader(fields, self.per_rank, rank=rank, world_size=world)


@pytest.mark.slow
@pytest.mark.timeout(300)  # the hang it guards against
@pytest.mark.parametrize("kind,micro", [("streams", None), ("masked", None), ("masked_transform", None), ("masked", 2)])
def test_ranks_without_loss_steps_in_an_update_join_it(loopback_rendezvous, kind, micro):
    """An update where one rank's rows have a loss step and the other's have none (the last, ragged
    batch of a stream corpus; labels only on some sequences): every rank joins its gradient
    all-reduce (the run hung before, each rank waiting in another collective) and the mean
    divides by the count over all ranks, so 2 ranks end, after 2 epochs, with the weights of one
    process with the global batch. Streams and a mask field: the loader knows the ranks' counts;
    a mask made by a transform: the ranks all-reduce them (chunks of 4 steps: in the first batch
    only rank 0 has labels in chunks 0 and 1, only rank 1 in chunks 2 and 3). With groups of 2
    rows, a rank without a loss step runs its zero loss through the last group only."""
    def fit(devices, per_rank):
        module = make_module(LM, recurrence="gru", hidden=16, k1=4, name="sgd", lr=0.5, seed=0,
                             micro_batch_size=micro)
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
                            max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        if devices > 1:
            loopback_rendezvous(trainer)
        trainer.fit(module, Uneven(per_rank, kind))
        return module

    per_rank = 3 if kind == "streams" else 4
    single, ddp = fit(1, 2 * per_rank), fit(2, per_rank)
    init = make_module(LM, recurrence="gru", hidden=16, k1=4, seed=0)
    assert max((a - b).abs().max().item() for a, b in zip(init.state_dict().values(), ddp.state_dict().values())) > 1e-3
    for (k, a), (_, b) in zip(single.state_dict().items(), ddp.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)


def _fit_ckpt(tmp_path, rendezvous, steps, ckpt_path=None, devices=2, reshard=False):
    """``reshard``: reshard the checkpoint (as ``distrnn fit --reshard true`` does) for this run's
    ``devices`` x ``6 // devices`` streams."""
    import functools

    from lightning.pytorch.callbacks import ModelCheckpoint

    from distrnn.checkpoint import AtomicCheckpointIO
    from distrnn.engine import reshard_checkpoint

    L.seed_everything(0)
    module = make_module(LM, recurrence="lstm", hidden=16, k1=8, k2=12, name="adamw", lr=1e-2, seed=0)
    io = AtomicCheckpointIO()
    per_rank = 6 // devices if reshard else 3
    if reshard:
        loader = StreamLoader(torch.zeros(4001, dtype=torch.uint8), per_rank, 16, world_size=devices)
        io.on_load = functools.partial(reshard_checkpoint, world=devices, loader=loader)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_fork", max_steps=steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, plugins=[io],
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1, filename="{step}")],
    )
    rendezvous(trainer)
    trainer.fit(module, Streams(per_rank), ckpt_path=ckpt_path)
    return module


@pytest.mark.slow
def test_ddp_resume_restores_every_ranks_state_and_reshards_exactly(tmp_path, loopback_rendezvous):
    """Resuming 2 ranks mid-epoch from a checkpoint ends with the weights of the uninterrupted run:
    the checkpoint holds both ranks' hidden states (and TBPTT histories), not rank 0's twice. A
    resume on 1 process is refused, unless resharded (``--reshard``): 2 ranks x 3 streams resumed
    on 1 process x 6 streams, checkpointed again and resumed on 2 x 3, end with the weights and
    optimizer of the uninterrupted 2-rank run (1e-6): the 6 streams are the same, and each
    stream's hidden state and TBPTT history moves to the rank that reads it next. Resharded for
    another global batch instead, the run goes on at the same fraction of the epoch from a zero
    state."""
    from distrnn.checkpoint_files import load_checkpoint_file
    from distrnn.engine import reshard_checkpoint

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

    _fit_ckpt(tmp_path / "one", loopback_rendezvous, 12, ckpt_path=str(ckpt), devices=1, reshard=True)
    middle = tmp_path / "one" / "ck" / "step=12.ckpt"
    assert load_checkpoint_file(middle)["distrnn"]["world_size"] == 1
    resumed = _fit_ckpt(tmp_path / "two", loopback_rendezvous, 16, ckpt_path=str(middle), devices=2, reshard=True)
    for (k, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)

    saved = load_checkpoint_file(ckpt)
    index = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["next_index"]
    h_BH = [saved["distrnn"]["ranks"][r]["carry"]["state"][0] for r in (0, 1)]
    one = StreamLoader(torch.zeros(4001, dtype=torch.uint8), 6, 16)
    two = StreamLoader(torch.zeros(4001, dtype=torch.uint8), 3, 16, world_size=2)
    assert reshard_checkpoint(load_checkpoint_file(ckpt), 2, two) is None
    old = load_checkpoint_file(ckpt)  # as an older distrnn wrote it: no batch count
    del old["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["num_batches"]
    assert reshard_checkpoint(old, 2, two) is None  # nothing changed: the plain resume, not refused
    with pytest.raises(ValueError, match="records no batch count"):
        reshard_checkpoint(old, 1, one)
    merged = load_checkpoint_file(ckpt)
    assert "carried over exactly" in reshard_checkpoint(merged, 1, one)
    torch.testing.assert_close(merged["distrnn"]["ranks"][0]["carry"]["state"][0], torch.cat(h_BH, 1), rtol=0, atol=0)
    other = load_checkpoint_file(ckpt)  # 4 streams instead of 6: 1.5x as many batches per epoch
    line = reshard_checkpoint(other, 1, StreamLoader(torch.zeros(4001, dtype=torch.uint8), 4, 16))
    n_old, n_new = one.num_batches(), StreamLoader(torch.zeros(4001, dtype=torch.uint8), 4, 16).num_batches()
    assert f"goes on at batch {index * n_new // n_old} of {n_new} per rank (was {index} of {n_old})" in line
    assert other["distrnn"]["ranks"][0]["carry"] == {"state": None, "history": None}
    loops = other["loops"]["fit_loop"]
    assert loops["state_dict"]["combined_loader"][0]["next_index"] == index * n_new // n_old
    assert loops["epoch_loop.batch_progress"]["current"]["ready"] == index * n_new // n_old
    assert loops["epoch_loop.manual_optimization.optim_step_progress"]["total"]["completed"] == 8


class BlockingCollectives(L.Callback):
    """Writes, per rank, the broadcasts and all-reduces called during training that the host waits
    for (DDP's gradient buckets are launched from C++ and are not seen here)."""

    def __init__(self, out):
        self.out = out

    def on_train_start(self, trainer, pl_module):
        import torch.distributed as dist

        self.seen, self.restore = [], []
        for name in ("broadcast", "all_reduce"):
            original = getattr(dist, name)

            def wrapped(*args, _original=original, _name=name, **kwargs):
                if not kwargs.get("async_op", False):
                    self.seen.append((_name, trainer.global_step))
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)
            self.restore.append((name, original))

    def on_train_end(self, trainer, pl_module):
        import torch.distributed as dist

        for name, original in self.restore:
            setattr(dist, name, original)
        (self.out / f"rank{trainer.global_rank}.txt").write_text(repr(self.seen))


@pytest.mark.slow
def test_no_batch_waits_for_a_collective_of_the_sigterm_agreement(tmp_path, loopback_rendezvous):
    """With distrnn's SIGTERM handling (which the CLI always installs) no training batch makes the
    host wait for a collective: the ranks agree on a preemption through an all-reduce read one batch
    later, and Lightning's own check before every batch (a broadcast read with .item(): on GPUs a
    host sync per batch) is switched off. Fails if a Lightning upgrade brings that check back under
    another name."""
    from datetime import timedelta

    from distrnn.checkpoint import Checkpoint, CheckpointOnSigterm

    module = make_module(LM, recurrence="gru", hidden=16, k1=16, name="sgd", lr=0.5, seed=0)
    # a time-triggered checkpoint is agreed on through the same all-reduce (Lightning's
    # ModelCheckpoint broadcasts that decision before every batch)
    ckpt = Checkpoint(dirpath=tmp_path / "ck", every_n_train_steps=0, train_time_interval=timedelta(hours=1))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=6, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[BlockingCollectives(tmp_path), CheckpointOnSigterm(), ckpt],
    )
    loopback_rendezvous(trainer)
    trainer.fit(module, Streams(3))
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "[]"



def _all_reduce_then_exit(rank: int, out) -> None:
    import atexit
    import json
    import weakref

    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)  # the parent's loopback store
    make_module(LM, recurrence="gru", hidden=4).setup("fit")  # as on every rank of a fit
    t = torch.ones(4)
    dist.all_reduce(t)  # gloo's worker may hold t's last reference a moment after this returns
    sent = weakref.ref(t)
    del t
    atexit._run_exitfuncs()  # what the interpreter runs first at exit, before its shutdown
    (out / f"rank{rank}").write_text(json.dumps({"group": dist.is_initialized(), "held": sent() is not None}))


@pytest.mark.slow
def test_at_exit_the_process_group_is_gone_before_the_interpreter_shuts_down(tmp_path, loopback_rendezvous):
    """A rank that exits right after a collective on a Python tensor, as every rank does after
    fit, must not die with SIGABRT during interpreter shutdown ("terminate called without an
    active exception": a gloo thread releasing the tensor asks for the GIL too late). The TBPTT
    module's setup has the process group destroyed by the first exit handlers, which joins gloo's
    threads: after them no group is left and no thread holds the tensor. (Ranks that only did
    that: 9 of 25 2-rank jobs had a rank aborted here before, 0 of 25 with it; the DDP tests'
    ranks aborted so now and then.)"""
    import json

    import torch.multiprocessing as mp

    from distrnn.rendezvous import gloo_on_loopback, host_store_on_loopback

    host_store_on_loopback()
    gloo_on_loopback()
    mp.start_processes(_all_reduce_then_exit, args=(tmp_path,), nprocs=2, start_method="spawn")
    for r in (0, 1):
        assert json.loads((tmp_path / f"rank{r}").read_text()) == {"group": False, "held": False}


class LabelsOnRankZero(L.LightningDataModule):
    """8 labelled training sequences; of the 8 validation sequences only rank 0's (samples 0-3)
    have labels (``labelled=False``: none has)."""

    def __init__(self, per_rank, labelled=True):
        super().__init__()
        self.per_rank, self.labelled = per_rank, labelled

    def _loader(self, val):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 40, (8, 16), generator=g)
        mask = torch.ones(8, 16, dtype=torch.bool)
        if val:
            mask[4 if self.labelled else 0:] = False
        return TensorLoader({"x": x, "y": torch.randint(0, 40, (8, 16), generator=g), "mask": mask}, self.per_rank,
                            rank=self.trainer.global_rank, world_size=self.trainer.world_size)

    def train_dataloader(self):
        return self._loader(False)

    def val_dataloader(self):
        return self._loader(True)


@pytest.mark.slow
@pytest.mark.timeout(300)  # the hang it guards against
def test_a_rank_without_labels_in_validation_does_not_hang_the_others(loopback_rendezvous):
    """A rank whose rows had no label all epoch once logged nothing, and the other waited for it
    forever in Lightning's all-reduce of the logged keys. The sums are now reduced once at the
    epoch's end on every rank: the validation loss is the one process's with the global batch.
    With no label on any rank nothing is logged, as by one process (a mean over ranks' weighted
    means was 0/0: NaN)."""
    def fit(devices, per_rank, labelled=True):
        module = make_module(LM, recurrence="gru", hidden=16, k1=4, name="adamw", lr=1e-2, seed=0)
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
                            max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0)
        if devices > 1:
            loopback_rendezvous(trainer)
        trainer.fit(module, LabelsOnRankZero(per_rank, labelled))
        return trainer.callback_metrics

    single, ddp = fit(1, 8), fit(2, 4)
    assert set(ddp) >= {"val/loss", "val/bpb"}, ddp
    for k in ("val/loss", "val/bpb"):
        torch.testing.assert_close(ddp[k], single[k], rtol=0, atol=1e-6, msg=k)
    single, ddp = fit(1, 8, labelled=False), fit(2, 4, labelled=False)
    assert not any(k.startswith("val/") for k in (*single, *ddp)), (single, ddp)
