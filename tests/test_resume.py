"""Exact resume: a run that crashes after a mid-epoch checkpoint and resumes from it ends with
the weights of an uninterrupted run."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from distrnn.averaging import EMAWeightAveraging as QueuedEMAWeightAveraging
from distrnn.checkpoint import AtomicCheckpointIO
from distrnn.checkpoint_files import CheckpointError, load_checkpoint_file
from distrnn.data import ByteCorpusDataModule
from distrnn.engine import TBPTTModule, Carry

from conftest import REPO, write_corpus
from helpers import make_module


class Crash(L.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step >= self.at_step:
            raise RuntimeError("simulated crash")


def _run(tmp_path, corpus, ckpt_dir, ckpt_path=None, crash_at=None, max_epochs=2, extra=(), **trainer_kw):
    L.seed_everything(0)
    dm = ByteCorpusDataModule(path=str(corpus), batch_size=4, seq_len=24, val_fraction=0.1)
    module = make_module(dm.task, recurrence="lstm", layers=2, dropout=0.3, k1=8, k2=12, name="adamw", lr=3e-3, clip=0.5)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=6, save_top_k=-1, filename="{step}")]
    callbacks += [c() for c in extra]
    if crash_at is not None:
        callbacks.append(Crash(crash_at))
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, plugins=[AtomicCheckpointIO()], limit_val_batches=2, num_sanity_val_steps=1,
        default_root_dir=tmp_path, **trainer_kw,
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return module, trainer


def test_a_state_saved_in_bf16_resumes_in_another_precision(tmp_path):
    """A bf16-mixed run carries its LSTM state in bf16 (so do DeepSpeed bf16 runs, converted or
    not); resumed with precision 32-true, the LSTM refused it ("could not create a primitive
    descriptor for the LSTM forward propagation primitive"). The restored state takes the run's
    dtype: the resumed run ends with the weights of one resumed from the same file with the state
    cast to float32 by hand. (A CPU without AVX-512 runs the LSTM in float32 under autocast and
    saves a float32 state: there the bf16 file is made by hand.)"""
    from distrnn.layers import _cpu_autocast_runs
    from distrnn.state import map_state, state_tensors

    corpus = write_corpus(tmp_path / "c.txt", 4000)
    _run(tmp_path, corpus, tmp_path / "a", max_epochs=1, max_steps=6, precision="bf16-mixed")
    saved = load_checkpoint_file(tmp_path / "a" / "step=6.ckpt")
    carry = saved["distrnn"]["ranks"][0]["carry"]
    in_bf16 = _cpu_autocast_runs(torch.nn.LSTM, torch.bfloat16)
    assert {t.dtype for t in state_tensors(carry["state"])} == {torch.bfloat16 if in_bf16 else torch.float32}
    carry["state"] = map_state(lambda t: t.bfloat16(), carry["state"])
    AtomicCheckpointIO().save_checkpoint(saved, tmp_path / "bf16.ckpt")
    carry["state"] = map_state(lambda t: t.float(), carry["state"])
    AtomicCheckpointIO().save_checkpoint(saved, tmp_path / "by_hand.ckpt")
    resumed, trainer = _run(tmp_path, corpus, tmp_path / "b", ckpt_path=str(tmp_path / "bf16.ckpt"), max_epochs=1, max_steps=12)
    by_hand, _ = _run(tmp_path, corpus, tmp_path / "c", ckpt_path=str(tmp_path / "by_hand.ckpt"), max_epochs=1, max_steps=12)
    assert trainer.global_step == 12
    for (k, a), (_, b) in zip(by_hand.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("prefetch", [False, True], ids=["cpu_default", "prefetched_as_on_cuda"])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, monkeypatch, prefetch):
    if prefetch:  # the loaders make batches ahead in a thread, as a CUDA run's do (unpinned here)
        from distrnn.data.base import RecurrentDataModule

        bind = RecurrentDataModule._bind

        def prefetching(self, loader):
            loader = bind(self, loader)
            loader.prefetch = True
            return loader

        monkeypatch.setattr(RecurrentDataModule, "_bind", prefetching)
    corpus = write_corpus(tmp_path / "c.txt", 4000)
    ref, ref_trainer = _run(tmp_path, corpus, tmp_path / "ref")
    steps_per_epoch = ref_trainer.global_step // 2
    assert steps_per_epoch > 20

    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, corpus, tmp_path / "b", crash_at=21)
    ckpt = tmp_path / "b" / "step=18.ckpt"  # mid-epoch 0, mid-sequence
    assert ckpt.exists()
    saved = load_checkpoint_file(ckpt)
    assert saved["global_step"] == 18
    assert saved["distrnn"]["ranks"][0]["carry"]["history"]["x"].shape == (4, 4)
    resumed, trainer = _run(tmp_path, corpus, tmp_path / "c", ckpt_path=str(ckpt))
    assert trainer.global_step == ref_trainer.global_step
    for (k, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)
    ref_opt = ref_trainer.optimizers[0].state_dict()["state"]
    for i, s in trainer.optimizers[0].state_dict()["state"].items():
        torch.testing.assert_close(s["exp_avg"], ref_opt[i]["exp_avg"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("ema_class", [EMAWeightAveraging, QueuedEMAWeightAveraging], ids=["lightning", "distrnn"])
def test_resume_with_an_ema_of_the_weights_equals_uninterrupted(tmp_path, ema_class):
    """Lightning's EMAWeightAveraging (``trainer.callbacks`` in a config) with the TBPTT module: a
    checkpoint holds the average as its weights and the trained weights beside them, and a resumed
    run ends with the average and the trained weights of an uninterrupted one. The same for
    distrnn's (its update count on the host, read again from the restored checkpoint)."""
    ema = lambda: ema_class(decay=0.8)  # noqa: E731
    corpus = write_corpus(tmp_path / "c.txt", 4000)
    ref, ref_trainer = _run(tmp_path, corpus, tmp_path / "ref", max_epochs=1, extra=[ema])
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, corpus, tmp_path / "b", crash_at=21, max_epochs=1, extra=[ema])
    ckpt = load_checkpoint_file(tmp_path / "b" / "step=18.ckpt")
    trained, average = ckpt["current_model_state"], ckpt["state_dict"]
    assert max((trained[k] - average[k]).abs().max().item() for k in average) > 1e-3
    resumed, trainer = _run(tmp_path, corpus, tmp_path / "c", ckpt_path=str(tmp_path / "b" / "step=18.ckpt"),
                            max_epochs=1, extra=[ema])
    assert trainer.global_step == ref_trainer.global_step
    for (k, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):  # the averages
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)
    name = f"step={trainer.global_step - trainer.global_step % 6}.ckpt"  # the last one saved
    last_ref, last = load_checkpoint_file(tmp_path / "ref" / name), load_checkpoint_file(tmp_path / "c" / name)
    for k, a in last_ref["current_model_state"].items():
        torch.testing.assert_close(last["current_model_state"][k], a, rtol=0, atol=1e-6, msg=k)
    assert last["averaging_state"]["n_averaged"] == last_ref["averaging_state"]["n_averaged"]


def test_negative_control_dropping_the_state_breaks_resume(tmp_path, monkeypatch):
    """The same resume with the carried state thrown away must not match: the test above would
    catch a checkpoint that forgot the hidden state."""
    corpus = write_corpus(tmp_path / "c.txt", 4000)
    ref, _ = _run(tmp_path, corpus, tmp_path / "ref", max_epochs=1)
    with pytest.raises(RuntimeError):
        _run(tmp_path, corpus, tmp_path / "b", crash_at=21, max_epochs=1)
    original = TBPTTModule.on_load_checkpoint

    def forget_state(self, checkpoint):
        original(self, checkpoint)
        self._carry = Carry()

    monkeypatch.setattr(TBPTTModule, "on_load_checkpoint", forget_state)
    resumed, _ = _run(tmp_path, corpus, tmp_path / "c", ckpt_path=str(tmp_path / "b" / "step=18.ckpt"), max_epochs=1)
    diff = max((a - b).abs().max().item() for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()))
    assert diff > 1e-6


def _write_code_running_pickle(path, marker):
    """A checkpoint whose unpickling would create ``marker`` (what a safe load must refuse)."""

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {}, "x": Evil()}, path)


@pytest.mark.fresh_store  # checks what its folder holds
def test_checkpoint_write_is_atomic_and_loads_are_safe(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "x.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt", "x.ckpt.sha256"]  # no temporary left behind

    class Boom:
        def __call__(self, *a):
            raise RuntimeError("disk full")

    import distrnn.checkpoint as ck

    orig = ck.torch.save
    try:
        ck.torch.save = Boom()
        with pytest.raises(RuntimeError, match="disk full"):
            io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, target)
    finally:
        ck.torch.save = orig
    assert torch.equal(io.load_checkpoint(target)["state_dict"]["w"], torch.ones(2))  # previous intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt", "x.ckpt.sha256"]

    # flipped bytes inside tensor data: torch.load would return wrong weights; the checksum refuses
    io.save_checkpoint({"state_dict": {"w": torch.randn(10000)}}, target)
    good = target.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    target.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="x.ckpt: contents do not match its checksum"):
        io.load_checkpoint(target)
    target.write_bytes(good)
    io.remove_checkpoint(target)
    assert list(tmp_path.iterdir()) == []
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)

    target.write_bytes(target.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="x.ckpt"):
        io.load_checkpoint(target)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    _write_code_running_pickle(evil, marker)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        io.load_checkpoint(evil)
    assert not marker.exists()


def test_mapped_loads_equal_read_ones_and_stay_safe(tmp_path):
    """What distrnn reads of a checkpoint before Lightning loads it (the MLflow run, carried state,
    best path) is loaded mapped, not read twice: the same contents; a file in torch's legacy
    format (which cannot be mapped) still loads; a pickle that runs code is still refused."""
    from distrnn.checkpoint_files import load_checkpoint_file

    ckpt = {"state_dict": {"w": torch.randn(1000), "b": torch.arange(3)}, "global_step": 7, "distrnn": {"ranks": [1]}}
    AtomicCheckpointIO().save_checkpoint(ckpt, tmp_path / "z.ckpt")
    torch.save(ckpt, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    for name in ("z.ckpt", "legacy.ckpt"):
        mapped = load_checkpoint_file(tmp_path / name, mmap=True)
        assert mapped["global_step"] == 7 and mapped["distrnn"] == {"ranks": [1]}, name
        for k, v in ckpt["state_dict"].items():
            assert torch.equal(mapped["state_dict"][k], v), (name, k)
    marker = tmp_path / "pwned"
    _write_code_running_pickle(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match=r"evil.ckpt: cannot be loaded safely: torch.load\(weights_only=True\) refuses"
                                               r" it: Unsupported global: GLOBAL (io|builtins).open"):
        load_checkpoint_file(tmp_path / "evil.ckpt", mmap=True)
    assert not marker.exists()
    # a file that is no checkpoint at all (a corpus passed as --ckpt_path)
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat\n")
    with pytest.raises(CheckpointError, match=r"corpus.txt: not a PyTorch checkpoint file \(neither torch.save's zip"):
        load_checkpoint_file(tmp_path / "corpus.txt")


def test_nan_loss_stops_at_its_step_and_writes_no_later_checkpoint(tmp_path):
    from distrnn.config import TaskSpec
    from distrnn.data.loaders import TensorLoader

    from helpers import ListDataModule

    task = TaskSpec(kind="regression", output_dim=1, input_dim=2, seq_len=10)
    x = torch.randn(40, 10, 2)
    x[22, 3, 0] = float("nan")  # sample 22 sits in batch 5 (batch size 4): update 5, steps counted from 0
    loader = TensorLoader({"x": x, "y": torch.randn(40, 10, 1)}, 4)
    module = make_module(task, recurrence="gru", mode="full", k1=10)
    w_before = None

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            nonlocal w_before
            w_before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}"), Snapshot()],
    )
    with pytest.raises(FloatingPointError, match="at step 5 on rank 0"):
        trainer.fit(module, ListDataModule(loader))
    assert sorted(p.name for p in tmp_path.glob("*.ckpt"))[-1] == "step=5.ckpt"  # written after step 4, nothing later
    for k, v in module.state_dict().items():
        assert torch.equal(v, w_before[k])  # the NaN update was never applied


def _nan_in_update_5(**kw):
    """A GRU regression, batch size 4, 10 batches; sample 22 (batch 5, update 5 from 0) holds a NaN."""
    from distrnn.config import TaskSpec
    from distrnn.data.loaders import TensorLoader

    from helpers import ListDataModule

    task = TaskSpec(kind="regression", output_dim=1, input_dim=2, seq_len=10)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 10, 2, generator=g), torch.randn(40, 10, 1, generator=g)
    x[22, 3, 0] = float("nan")
    module = make_module(task, recurrence="gru", mode="full", k1=10, name="adamw", lr=1e-2, clip=1.0, **kw)
    return module, ListDataModule(TensorLoader({"x": x, "y": y}, 4))


class _AfterEachUpdate(L.Callback):
    """Weights and AdamW's state after every batch, and the step at which each batch started."""

    def __init__(self):
        self.after, self.started = [], []

    def on_train_batch_start(self, trainer, pl_module, *a):
        self.started.append(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, *a):
        opt = trainer.optimizers[0]
        self.after.append({
            **{k: v.clone() for k, v in pl_module.state_dict().items()},
            **{f"opt.{i}.{k}": v.clone() for i, p in enumerate(opt.param_groups[0]["params"]) for k, v in opt.state[p].items()},
        })


def test_a_nonfinite_update_is_skipped_on_the_device_and_reported_at_the_next_update():
    """No host sync per update: update 5's NaN is found on the device, the fused AdamW skips the
    update there (weights, moments and step count as after update 4), and the host learns it while
    running update 6, before that update's step, and stops naming step 5."""
    module, dm = _nan_in_update_5()
    rec = _AfterEachUpdate()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[rec])
    with pytest.raises(FloatingPointError, match=r"^non-finite loss \(nan\) at step 5 on rank 0: the update was not applied"):
        trainer.fit(module, dm)
    assert trainer.optimizers[0].defaults["fused"] is True
    assert rec.started == [0, 1, 2, 3, 4, 5, 6] and len(rec.after) == 6  # raised inside update 6
    assert all(not torch.equal(rec.after[3][k], v) for k, v in rec.after[4].items())  # update 4 moved everything
    for k, v in rec.after[4].items():
        assert torch.equal(rec.after[5][k], v), k  # nothing of update 5 applied, the step count included
    assert float(rec.after[5]["opt.0.step"]) == 5.0
    for k, v in module.state_dict().items():
        assert torch.equal(v, rec.after[4][k]), k  # nor of update 6


@pytest.mark.parametrize("where", ["last_update", "before_validation"])
def test_a_nonfinite_last_update_or_one_before_validation_is_reported_there(where):
    """Update 5 is the last (max_steps 6), or a validation follows it: the run stops there (at the
    end of training, or as validation starts, before any validation step), naming step 5."""
    module, dm = _nan_in_update_5()
    validated, started, val_steps = [], [], []

    class Val(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, *a):
            started.append(trainer.global_step)

        def on_validation_start(self, trainer, pl_module):
            validated.append(trainer.global_step)

        def on_validation_batch_start(self, *a):
            val_steps.append(1)

    kw = dict(max_steps=6, limit_val_batches=0) if where == "last_update" else dict(val_check_interval=6, limit_val_batches=1)
    dm.val_dataloader = dm.train_dataloader
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Val()], **kw)
    with pytest.raises(FloatingPointError, match=r"at step 5 on rank 0: the update was not applied"):
        trainer.fit(module, dm)
    assert trainer.global_step == 6 and started == [0, 1, 2, 3, 4, 5] and not val_steps
    assert (validated == [6]) == (where == "before_validation")


def test_a_run_resumes_from_a_checkpoint_of_an_unfused_optimizer_and_back(tmp_path):
    """Checkpoints written before the fused optimizer (or by an fp16 run, whose scaler keeps the
    plain one) resume into a run that skips on the device, and the other way round: each run
    uses the optimizer it configured, its step counts where that one keeps them, and the two
    continuations agree to float32 rounding."""
    def fit(stop_on_nonfinite, ckpt=None, max_steps=12, save=None):
        from distrnn.config import TaskSpec
        from distrnn.data.loaders import TensorLoader

        from helpers import ListDataModule

        task = TaskSpec(kind="regression", output_dim=1, input_dim=2, seq_len=10)
        g = torch.Generator().manual_seed(0)
        loader = TensorLoader({"x": torch.randn(80, 10, 2, generator=g), "y": torch.randn(80, 10, 1, generator=g)}, 4)
        module = make_module(task, recurrence="gru", mode="full", k1=10, name="adamw", lr=1e-2, clip=1.0)
        module.optim_cfg.stop_on_nonfinite = stop_on_nonfinite
        cbs = [ModelCheckpoint(dirpath=save, every_n_train_steps=6, save_top_k=-1, filename="{step}")] if save else []
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=bool(save), callbacks=cbs)
        trainer.fit(module, ListDataModule(loader), ckpt_path=ckpt)
        opt = trainer.optimizers[0]
        return module, opt

    for saved_by, resumed_by in ((False, True), (True, False)):
        _, opt = fit(saved_by, max_steps=6, save=tmp_path / str(saved_by))
        assert bool(opt.defaults["fused"]) == saved_by
        ckpt = str(tmp_path / str(saved_by) / "step=6.ckpt")
        ends = {}
        for by in (resumed_by, saved_by):
            module, opt = fit(by, ckpt=ckpt)
            assert all(bool(g["fused"]) == by for g in opt.param_groups)
            steps = [opt.state[p]["step"] for p in opt.param_groups[0]["params"]]
            assert all(float(s) == 12.0 and s.dtype == torch.float32 for s in steps)
            ends[by] = module.state_dict()
        for k, v in ends[True].items():
            torch.testing.assert_close(v, ends[False][k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_checkpoint_missing_a_ranks_state_is_refused_naming_the_file(tmp_path, capsys):
    """A checkpoint whose gathered per-rank state lacks a rank (or was written by another world
    size) fails before training and before any MLflow run: exit 2, the file and the count named."""
    from conftest import REPO, cli, write_corpus
    from distrnn.checkpoint import AtomicCheckpointIO
    from distrnn.engine import CHECKPOINT_FORMAT, check_carried_state

    rank = {"carry": {}, "rng": {}}
    check_carried_state({"distrnn": {"format": CHECKPOINT_FORMAT, "world_size": 2, "ranks": [rank, rank]}}, 2)
    with pytest.raises(ValueError, match="1 of its 2 ranks"):
        check_carried_state({"distrnn": {"format": CHECKPOINT_FORMAT, "world_size": 2, "ranks": [rank, None]}}, 2)
    with pytest.raises(ValueError, match="written by 2 ranks and this run has 1"):
        check_carried_state({"distrnn": {"format": CHECKPOINT_FORMAT, "world_size": 2, "ranks": [rank, rank]}}, 1)

    write_corpus(tmp_path / "corpus.txt", 2000)
    ckpt = tmp_path / "lost-rank.ckpt"
    AtomicCheckpointIO().save_checkpoint(
        {"state_dict": {}, "distrnn": {"format": CHECKPOINT_FORMAT, "world_size": 1, "ranks": [{"rng": {}}]}}, ckpt)
    code, _, err = cli(capsys, "fit", "--config", str(REPO / "jobs/configs/tiny.yaml"), "--ckpt_path", str(ckpt))
    assert code == 2, err[-2000:]
    assert f"checkpoint {ckpt}: checkpoint is incomplete: it holds the carried state of 0 of its 1 ranks" in err
    assert "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists() or _no_runs(tmp_path)


def _no_runs(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


class _BarAfterFirstBatch(L.Callback):
    """Runs after the bar's own hook (callbacks run in list order): what the bar shows."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, *args):
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((bar.desc, bar.n, bar.total, bar.initial))


def test_progress_bar_goes_on_from_where_a_resumed_epoch_stands(tmp_path):
    """Resumed mid-epoch, Lightning skips on_train_epoch_start and restarts batch_idx at 0: its bar
    said "Training: 1/?". distrnn's bar (the CLI's default) says "Epoch 0: 7/N", N the epoch's
    batches, and its rate counts this run's batches only; the next epoch starts at 1/N."""
    from distrnn.cli import DistrnnCLI, EpochProgressBar

    corpus = write_corpus(tmp_path / "c.txt", 2000)

    def run(ckpt_path=None, max_steps=-1):
        L.seed_everything(0)
        dm = ByteCorpusDataModule(path=str(corpus), batch_size=4, seq_len=24, val_fraction=0.1)
        spy = _BarAfterFirstBatch()
        trainer = L.Trainer(accelerator="cpu", max_epochs=2, max_steps=max_steps, logger=False, enable_model_summary=False,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=6, save_top_k=-1,
                                                       filename="{step}"), EpochProgressBar(), spy],
                            limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(make_module(dm.task, recurrence="lstm", layers=1, k1=8, k2=12), dm, ckpt_path=ckpt_path)
        return trainer, spy.seen

    trainer, _ = run(max_steps=9)
    per_epoch = trainer.num_training_batches
    _, seen = run(ckpt_path=str(tmp_path / "ck" / "step=6.ckpt"))  # k1=8 of seq_len 24: 3 updates a batch
    assert seen[0] == ("Epoch 0: ", 3, per_epoch, 2), seen[:3]
    assert seen[per_epoch - 2] == ("Epoch 1: ", 1, per_epoch, 0) and len(seen) == 2 * per_epoch - 2
    # the command's trainer shows it, unless the config turns the bar off
    args = ["--config", str(REPO / "jobs/configs/tiny.yaml"), "--data.init_args.path", str(corpus), "--trainer.logger=false"]
    shown = DistrnnCLI(args=[*args, "--trainer.enable_progress_bar=true"], run=False).trainer.progress_bar_callback
    assert isinstance(shown, EpochProgressBar)
    assert DistrnnCLI(args=args, run=False).trainer.progress_bar_callback is None


def _ray_checkpoint(tmp_path, last):
    """A stand-in for what ray.train.get_checkpoint() returns, as fit_from_ray_checkpoint uses it:
    a checkpoint directory holding a copy of ``last``."""
    import contextlib
    import shutil

    from distrnn.raytrain import CKPT_NAME

    class RayCheckpoint:
        path = "storage/checkpoint_000000"

        @contextlib.contextmanager
        def as_directory(self):
            d = tmp_path / "ray-ckpt"
            d.mkdir(exist_ok=True)
            shutil.copy(last, d / CKPT_NAME)
            yield str(d)

    return RayCheckpoint


def test_a_resume_with_other_data_settings_is_refused_naming_the_key(tmp_path, capsys):
    """A checkpoint's read position means batch i of its run's data layout. Resuming with another
    batch size, chunk length or corpus would read other data at it (and, for the batch size, drop
    the carried hidden state) without a word: refused before any run opens, exit 2, the key named
    and the checkpoint untouched; the same settings resume. A restarted Ray Train job refuses it
    too (the worker's restore path, without Ray: a stand-in for its checkpoint object)."""
    from conftest import cli
    from distrnn.config import ConfigError
    from distrnn.data import GeneratedLoader, TensorLoader
    from distrnn.data.loaders import layout_change
    from distrnn.raytrain import fit_from_ray_checkpoint

    corpus = write_corpus(tmp_path / "corpus.txt", 4000)
    base = ["--config", str(REPO / "jobs/configs/tiny.yaml"), "--trainer.max_steps", "10"]
    code, _, err = cli(capsys, "fit", *base)
    assert code == 0, err[-2000:]
    (last,) = tmp_path.glob("checkpoints/*/*/checkpoints/last.ckpt")
    before = last.read_bytes()
    runs = _runs(tmp_path)
    refusals = [(["--data.init_args.batch_size", "8"], "data.batch_size: 4 in the checkpoint's run, 8 in this one"),
                (["--data.init_args.seq_len", "64"], "data.seq_len: 32 in the checkpoint's run, 64 in this one")]
    for extra, message in refusals:
        code, _, err = cli(capsys, "fit", *base, "--ckpt_path", str(last), *extra, "--trainer.max_steps", "20")
        assert code == 2 and message in err and err.count("\n") == 1, err[-2000:]
    with open(corpus, "ab") as f:  # a corpus that grew: every stream would start elsewhere
        f.write(b"more text\n" * 50)
    code, _, err = cli(capsys, "fit", *base, "--ckpt_path", str(last), "--trainer.max_steps", "20")
    assert code == 2 and "the data (tokens): 3800 in the checkpoint's run, 4275 in this one" in err, err[-2000:]
    assert last.read_bytes() == before and _runs(tmp_path) == runs

    RayCheckpoint = _ray_checkpoint(tmp_path, last)
    from distrnn.cli import DistrnnCLI

    worker = DistrnnCLI(args=[*base, "--trainer.logger=false", "--data.init_args.batch_size", "2"], run=False)
    with pytest.raises(ConfigError, match="^data.batch_size: 4 in the checkpoint's run, 2 in this one"):
        fit_from_ray_checkpoint(worker, RayCheckpoint())

    corpus.write_bytes(corpus.read_bytes()[:4000])
    code, _, err = cli(capsys, "fit", *base, "--ckpt_path", str(last), "--trainer.max_steps", "20")
    assert code == 0 and load_checkpoint_file(last)["global_step"] == 20 and _runs(tmp_path) == runs, err[-2000:]

    saved = {"loops": {"fit_loop": {"state_dict": {"combined_loader": [TensorLoader({"x": torch.zeros(10, 3)}, 2).state_dict()]}}}}
    assert layout_change(saved, TensorLoader({"x": torch.zeros(10, 3)}, 2)) is None
    assert layout_change(saved, TensorLoader({"x": torch.zeros(12, 3)}, 2)).startswith("the data (samples): 10 in")
    assert layout_change(saved, TensorLoader({"x": torch.zeros(10, 3)}, 2, shuffle=True)).startswith("data.seed: None in")
    gen = {"loops": {"fit_loop": {"state_dict": {"combined_loader": [GeneratedLoader(None, 4, 100, seed=1).state_dict()]}}}}
    assert layout_change(gen, GeneratedLoader(None, 4, 100, seed=2)).startswith("data.seed: 1 in")
    old = {"loops": {"fit_loop": {"state_dict": {"combined_loader": [{"epoch": 0, "next_index": 3}]}}}}
    assert layout_change(old, TensorLoader({"x": torch.zeros(12, 3)}, 2)) is None  # saved before layouts were


def _runs(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return sorted(r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()]))


def test_resuming_a_finished_run_for_more_steps_again_and_again_equals_one_run(tmp_path, capsys):
    """Training stopped by max_steps mid-epoch writes its last file at the last batch's end, where
    a resume goes on in the same epoch: 10 -> 22 -> 30 steps in three jobs (22 is no multiple of
    every_n_train_steps: the file is the end-of-training one) ends with the weights of one 30-step
    job and the same read position. (Written after Lightning had closed the epoch, the file sent
    the third job into the next epoch, skipping the rest of this one.)"""
    from conftest import cli

    write_corpus(tmp_path / "corpus.txt", 4000)
    base = ["--config", str(REPO / "jobs/configs/tiny.yaml")]
    code, _, err = cli(capsys, "fit", *base, "--trainer.max_steps", "10")
    assert code == 0, err[-2000:]
    (last,) = tmp_path.glob("checkpoints/*/*/checkpoints/last.ckpt")
    for steps in ("22", "30"):
        code, _, err = cli(capsys, "fit", *base, "--ckpt_path", str(last), "--trainer.max_steps", steps)
        assert code == 0, err[-2000:]
    code, _, err = cli(capsys, "fit", *base, "--trainer.max_steps", "30")
    assert code == 0, err[-2000:]
    (one,) = set(tmp_path.glob("checkpoints/*/*/checkpoints/last.ckpt")) - {last}
    chained, single = load_checkpoint_file(last), load_checkpoint_file(one)
    assert chained["global_step"] == single["global_step"] == 30
    position = [c["loops"]["fit_loop"]["state_dict"]["combined_loader"][0] for c in (chained, single)]
    assert position[0] == position[1] and (position[0]["epoch"], position[0]["next_index"]) == (0, 15)
    for k, v in single["state_dict"].items():
        torch.testing.assert_close(chained["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)


def test_reshard_resumes_with_other_data_settings_in_the_same_run(tmp_path, capsys):
    """``--reshard true`` lets the refused resume above go on: the checkpoint's optimizer, step and
    MLflow run, the epoch continued at the same fraction (batch 5 of 30 -> 2 of 15 with twice the
    streams), the change told in one line and recorded on the run; with nothing changed it is the
    plain exact resume and says nothing."""
    import mlflow

    from conftest import cli

    write_corpus(tmp_path / "corpus.txt", 4000)
    base = ["--config", str(REPO / "jobs/configs/tiny.yaml")]
    code, _, err = cli(capsys, "fit", *base, "--trainer.max_steps", "10")
    assert code == 0, err[-2000:]
    (last,) = tmp_path.glob("checkpoints/*/*/checkpoints/last.ckpt")
    runs = _runs(tmp_path)
    wider = [*base, "--data.init_args.batch_size", "8", "--reshard", "true"]
    code, _, err = cli(capsys, "fit", *wider, "--ckpt_path", str(last), "--trainer.max_steps", "20")
    assert code == 0, err[-2000:]
    assert ("distrnn: --reshard: 1 rank(s) x data.batch_size 4 -> 1 x 8: epoch 0 goes on at batch 2 of 15 per rank"
            " (was 5 of 30), every stream from a zero hidden state") in err
    saved = load_checkpoint_file(last)
    assert saved["global_step"] == 20 and _runs(tmp_path) == runs
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["next_index"] == 2 + 5  # 2 updates a batch
    assert saved["optimizer_states"][0]["state"][0]["step"] == 20
    tags = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(runs[0]).data.tags
    assert tags["resumed.reshard"] == "True" and tags["resumed.data.init_args.batch_size"] == "8"
    code, _, err = cli(capsys, "fit", *wider, "--ckpt_path", str(last), "--trainer.max_steps", "22")
    assert code == 0 and "--reshard" not in err and load_checkpoint_file(last)["global_step"] == 22, err[-2000:]
    code, _, err = cli(capsys, "test", *wider, "--ckpt_path", str(last))
    assert code == 2 and "--reshard: only fit resumes a run; test reads" in err, err[-2000:]

    # a Ray Train job resubmitted with other settings: the worker's restore path (without Ray)
    from distrnn.cli import DistrnnCLI
    from distrnn.config import ConfigError
    from distrnn.raytrain import fit_from_ray_checkpoint

    RayCheckpoint = _ray_checkpoint(tmp_path, last)

    narrow = [*base, "--trainer.logger=false", "--data.init_args.batch_size", "2", "--trainer.max_steps", "24"]
    with pytest.raises(ConfigError, match="^data.batch_size: 8 in the checkpoint's run, 2 in this one"):
        fit_from_ray_checkpoint(DistrnnCLI(args=narrow, run=False), RayCheckpoint())
    worker = DistrnnCLI(args=[*narrow, "--reshard", "true"], run=False)
    fit_from_ray_checkpoint(worker, RayCheckpoint())
    assert worker.trainer.global_step == 24
    assert "epoch 0 goes on at batch 32 of 60 per rank (was 8 of 15)" in capsys.readouterr().err


LEARN_CONFIG = """
seed_everything: 0
trainer: {max_steps: 12, val_check_interval: 4, check_val_every_n_epoch: null, accelerator: cpu}
checkpoint: {monitor: val/accuracy, mode: max}
model:
  network: {recurrence: mingru, hidden_size: 16, embedding_dim: 8, num_layers: 2, options: {norm: true, residual: true, chrono: 64}}
  tbptt: {mode: full, k1: 64}
  optimizer: {name: adamw, lr: 0.003, clip_norm: 1.0, schedule: cosine, warmup_updates: 2}
data:
  class_path: distrnn.data.SyntheticDataModule
  init_args: {name: selective_copy, seq_len: 64, num_tokens: 4, alphabet: 4, batch_size: 8, train_batches: 5, val_batches: 2}
"""


@pytest.mark.slow
def test_learning_script_runs_one_schedule_over_several_calls_exactly(tmp_path):
    """benchmarks/learn.py (the GPU learning runs, a device call at most 10 minutes) stopped after
    5 of 12 updates and resumed from its last.ckpt in a second process ends with the weights and
    optimizer state of one uninterrupted call, past an epoch boundary and a validation, and reports
    the uninterrupted call's curve and best."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "c.yaml").write_text(LEARN_CONFIG)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def learn(*args):
        r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "learn.py"), "c.yaml", *args], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((tmp_path / args[args.index("--json") + 1]).read_text())

    whole = learn("--save", "whole", "--json", "whole.json")
    first = learn("--save", "one", "--updates", "5", "--json", "one.json")
    second = learn("--save", "two", "--resume", "one/last.ckpt", "--json", "two.json")
    assert (whole["updates"], first["updates"], second["updates"]) == (12, 5, 12)
    # the second call reports the whole schedule's curve (the first call's rows came in its checkpoint)
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ("s", "call")} for r in rows]  # noqa: E731
    assert drop(second["curve"]) == drop(whole["curve"]) and any(r["step"] <= 5 for r in whole["curve"])
    assert [r["call"] for r in second["curve"]] == [1 if r["step"] <= 5 else 2 for r in whole["curve"]]
    assert (second["best"], second["last"], second["call"]) == (whole["best"], whole["last"], 2)
    assert second["best_this_call"] == max(r["val/accuracy"] for r in whole["curve"] if r["step"] > 5)
    a = load_checkpoint_file(tmp_path / "whole" / "last.ckpt")
    b = load_checkpoint_file(tmp_path / "two" / "last.ckpt")
    early = load_checkpoint_file(tmp_path / "one" / "last.ckpt")
    assert early["global_step"] == 5 and b["global_step"] == a["global_step"] == 12
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
        assert not torch.equal(v, early["state_dict"][k]), k  # the second call trained
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.mark.slow
def test_learning_script_stops_at_sigusr1_with_its_last_checkpoint(tmp_path):
    """``kill -USR1`` stops benchmarks/learn.py after the update under way, as its limits do: it
    exits 0, reports the updates it made, and its last.ckpt holds them (a long schedule on a shared
    machine stops at any time without losing the updates since its last validation)."""
    import json
    import os
    import signal
    import subprocess
    import sys

    (tmp_path / "c.yaml").write_text(LEARN_CONFIG.replace("max_steps: 12", "max_steps: 100000"))
    p = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "learn.py"), "c.yaml", "--seconds", "150",
                          "--save", "out", "--json", "out.json"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in p.stdout:  # the first validation's row: training is under way
            if line.startswith("{"):
                break
        p.send_signal(signal.SIGUSR1)
        p.stdout.read()
        assert p.wait(timeout=60) == 0
    finally:
        p.kill()
    out = json.loads((tmp_path / "out.json").read_text())
    assert 0 < out["updates"] < 1000 and out["seconds"] < 150, out
    assert load_checkpoint_file(tmp_path / "out" / "last.ckpt")["global_step"] == out["updates"]
