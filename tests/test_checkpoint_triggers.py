"""When checkpoints are written (distrnn.checkpoint.Checkpoint, the `checkpoint:` key): the triggers
that Lightning 2.6's ModelCheckpoint does not fire for a manually optimized module."""

from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import cli, write_corpus
from distrnn.checkpoint import AtomicCheckpointIO, Checkpoint, CheckpointOnSigterm
from distrnn.checkpoint_files import load_checkpoint_file

# 2 updates per batch (k1 16, sequences of 32); validation after every 10th batch (update 20)
CONFIG = """
seed_everything: 0
trainer: {max_steps: 28, val_check_interval: 10, limit_val_batches: 2, log_every_n_steps: 2, enable_progress_bar: false}
checkpoint: {every_n_train_steps: 5}
model:
  network: {recurrence: gru, hidden_size: 16}
  tbptt: {k1: 16}
  optimizer: {lr: 0.01}
data:
  class_path: distrnn.data.ByteCorpusDataModule
  init_args: {path: corpus.txt, batch_size: 4, seq_len: 32}
"""


@pytest.fixture
def saves(tmp_path, monkeypatch):
    """(global step, file name) of every checkpoint written, in order."""
    write_corpus(tmp_path / "corpus.txt", 8000)
    (tmp_path / "job.yaml").write_text(CONFIG)
    seen = []
    original = AtomicCheckpointIO.save_checkpoint

    def record(self, checkpoint, path, storage_options=None):
        seen.append((checkpoint["global_step"], Path(path).name))
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", record)
    return seen


def test_last_is_written_every_n_updates_before_the_first_validation_and_at_the_end(saves, capsys):
    """Lightning 2.6 waits for the monitored validation metric before its first save (here: no
    file before update 20), saves only after batches that end on a multiple of n (10, 20: each
    batch makes 2 updates, n = 5) and at the end rewrites last.ckpt only if nothing was saved
    before. Here: after every batch that passed a multiple of 5; a save due just before a
    validation (update 20) waits for it and is written once, after the best file, so that
    last.ckpt knows it; and at the end (28)."""
    code, _, err = cli(capsys, "fit", "--config", "job.yaml")
    assert code == 0, err[-3000:]
    assert saves == [(6, "last.ckpt"), (10, "last.ckpt"), (16, "last.ckpt"), (20, "best-20.ckpt"),
                     (20, "last.ckpt"), (26, "last.ckpt"), (28, "last.ckpt")]
    last = load_checkpoint_file(next(Path("checkpoints").rglob("last.ckpt")))
    assert last["global_step"] == 28
    # under ModelCheckpoint's key: older checkpoints keep their best-file bookkeeping on resume
    state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint{"))
    assert Path(state["best_model_path"]).name == "best-20.ckpt"



def test_without_step_or_time_triggers_last_follows_every_validation(saves, capsys):
    """No every_n_train_steps / train_time_interval: Lightning's own trigger (every_n_epochs 1)
    writes last.ckpt after every validation. Here ``mode: max`` makes the first validation the only
    best (the loss falls): last.ckpt at 40 and 60 all the same (it was written after a new best
    only, so a kill -9 lost every update since: a run stayed at its best step for 45 minutes).
    With ``monitor: null``, the step-named file too."""
    no_trigger = ["--checkpoint.every_n_train_steps", "null", "--trainer.max_steps", "60"]
    code, _, err = cli(capsys, "fit", "--config", "job.yaml", *no_trigger, "--checkpoint.mode", "max")
    assert code == 0, err[-3000:]
    assert saves == [(20, "best-20.ckpt"), (20, "last.ckpt"), (40, "last.ckpt"), (60, "last.ckpt")]
    saves.clear()
    code, _, err = cli(capsys, "fit", "--config", "job.yaml", *no_trigger, "--checkpoint.monitor", "null",
                       "--checkpoint.filename", "{step}")
    assert code == 0, err[-3000:]
    assert saves == [(s, n) for s in (20, 40, 60) for n in (f"{s}.ckpt", "last.ckpt")]


def test_a_run_stopped_by_early_stopping_mid_epoch_leaves_last_in_that_epoch(saves, capsys):
    """EarlyStopping stops after the validation at update 40 (not better than at 20; the step
    trigger, every 7, does not fall there, nor a validation trigger): last.ckpt is written then, at batch 20 of epoch 0's 60, not after Lightning has closed the epoch (a resume
    from that file started epoch 1, skipping the rest of epoch 0)."""
    code, _, err = cli(capsys, "fit", "--config", "job.yaml", "--trainer.max_steps", "60",
                       "--checkpoint.every_n_train_steps", "7", "--checkpoint.mode", "max",
                       "--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
                       "--trainer.callbacks.monitor=val/loss", "--trainer.callbacks.mode=max",
                       "--trainer.callbacks.patience=0")
    assert code == 0, err[-3000:]
    assert saves[-1] == (40, "last.ckpt") and saves.count((40, "last.ckpt")) == 1
    last = load_checkpoint_file(next(Path("checkpoints").rglob("last.ckpt")))
    loops = last["loops"]["fit_loop"]
    position = loops["state_dict"]["combined_loader"][0]
    assert (last["epoch"], position["epoch"], position["next_index"], position["num_batches"]) == (0, 0, 20, 60)
    assert loops["epoch_progress"]["current"]["processed"] == 0


def test_resume_from_the_save_deferred_to_validation_equals_the_uninterrupted_run(saves, capsys, monkeypatch):
    """The last.ckpt written after the validation at update 20 (not at that batch's end) resumes
    to the uninterrupted run's weights at update 28, bit for bit."""
    import shutil

    original = AtomicCheckpointIO.save_checkpoint

    def keep_20(self, checkpoint, path, storage_options=None):
        original(self, checkpoint, path, storage_options)
        if checkpoint["global_step"] == 20 and Path(path).name == "last.ckpt":
            shutil.copy(path, "after-validation-20.ckpt")

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", keep_20)
    code, _, err = cli(capsys, "fit", "--config", "job.yaml")
    assert code == 0, err[-3000:]
    uninterrupted = load_checkpoint_file(next(Path("checkpoints").rglob("last.ckpt")))["state_dict"]
    shutil.rmtree("checkpoints")
    code, _, err = cli(capsys, "fit", "--config", "job.yaml", "--ckpt_path", "after-validation-20.ckpt")
    assert code == 0, err[-3000:]
    resumed = load_checkpoint_file(next(Path("checkpoints").rglob("last.ckpt")))
    assert resumed["global_step"] == 28
    for k, v in uninterrupted.items():
        assert torch.equal(resumed["state_dict"][k], v), k


def test_save_last_link_never_points_at_an_older_step_and_resumes(saves, capsys):
    """``save_last: link`` makes last.ckpt a link to the file written at the same step; where none
    was (a step-triggered save with a monitor), Lightning linked it to the previous best file. Here
    it is a file then, and a link after the best at 20: one that resumes (its checksum is the
    target's; the stale last.ckpt.sha256 of the earlier file made it 'corrupted')."""
    code, _, err = cli(capsys, "fit", "--config", "job.yaml", "--checkpoint.save_last", "link", "--trainer.max_steps", "20")
    assert code == 0, err[-3000:]
    assert saves == [(6, "last.ckpt"), (10, "last.ckpt"), (16, "last.ckpt"), (20, "best-20.ckpt")]
    last = next(Path("checkpoints").rglob("last.ckpt"))
    assert last.is_symlink() and last.resolve().name == "best-20.ckpt"
    assert load_checkpoint_file(last)["global_step"] == 20
    code, _, err = cli(capsys, "fit", "--config", "job.yaml", "--checkpoint.save_last", "link", "--ckpt_path", str(last))
    assert code == 0, err[-3000:]
    assert saves[-1] == (28, "last.ckpt")


def test_a_monitor_no_validation_logs_is_one_line_exit_2_and_keeps_the_checkpoints(saves, capsys):
    """Lightning raised a traceback, or (before its first validation) saved nothing and warned."""
    code, _, err = cli(capsys, "fit", "--config", "job.yaml", "--checkpoint.monitor", "val/acc")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("distrnn: error: checkpoint.monitor: 'val/acc' is not a metric"
                                                   " of this run (after a validation it logs "), err[-2000:]
    assert "val/loss" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert saves[-1] == (16, "last.ckpt")
    assert load_checkpoint_file(next(Path("checkpoints").rglob("last.ckpt")))["global_step"] == 16


def test_step_triggers_with_a_monitor_and_no_last_file_are_refused_before_training(saves, capsys):
    """They would write nothing between validations (Lightning wrote best files ranked by a stale
    metric there): a preempted job would lose every update since the last validation."""
    code, _, err = cli(capsys, "fit", "--config", "job.yaml", "--checkpoint.save_last", "false")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("distrnn: error: checkpoint.save_last: false with a monitor"), err[-2000:]
    assert saves == []
    code, _, err = cli(capsys, "fit", "--config", "job.yaml", "--checkpoint.save_last", "false",
                       "--checkpoint.monitor", "null", "--trainer.max_steps", "10")
    assert code == 0, err[-3000:]
    assert saves == [(6, "best-6.ckpt"), (10, "best-10.ckpt")]


def test_time_interval_writes_last_between_validations(saves, capsys):
    """train_time_interval (ignored by Lightning 2.6 under manual optimization): with an interval
    of 0 every batch is due."""
    code, _, err = cli(capsys, "fit", "--config", "job.yaml", "--checkpoint.every_n_train_steps", "0",
                       "--checkpoint.train_time_interval", "0:00:00", "--trainer.max_steps", "8")
    assert code == 0, err[-3000:]
    assert saves == [(2, "last.ckpt"), (4, "last.ckpt"), (6, "last.ckpt"), (8, "last.ckpt")]


def test_fast_dev_run_writes_no_checkpoint(saves, capsys):
    code, out, err = cli(capsys, "fit", "--config", "job.yaml", "--trainer.fast_dev_run", "true")
    assert code == 0, err[-3000:]
    assert saves == [] and not Path("checkpoints").exists()
    assert "checkpoints:" not in out


LM_VOCAB = 40


class _Streams(L.LightningDataModule):
    def train_dataloader(self):
        from distrnn.data.loaders import StreamLoader

        tokens = torch.randint(0, LM_VOCAB, (4001,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        return StreamLoader(tokens, 3, 16, rank=self.trainer.global_rank, world_size=self.trainer.world_size)


class _SkewedClocks(Checkpoint):
    """Rank 1's clock says a time-triggered save is always due; rank 0's, only at update 5."""

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer

    def _time_up(self):
        return self._trainer.global_rank == 1 or self._trainer.global_step == 5


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ranks_save_at_the_step_rank_0s_clock_chose(tmp_path, loopback_rendezvous):
    """Under DDP every rank must save at the same step (the hidden states are gathered into one
    file). Rank 0's decision at update 5 reaches the other ranks through the SIGTERM agreement's
    all-reduce, read a batch later: both save at update 6 and nowhere else, whatever rank 1's
    clock says. Deciding per rank would hang in the gather or write files at different steps."""
    from distrnn.config import TaskSpec

    from helpers import make_module

    task = TaskSpec(kind="language_model", output_dim=LM_VOCAB, vocab_size=LM_VOCAB, seq_len=16)
    module = make_module(task, recurrence="gru", hidden=8, k1=16, name="sgd", lr=0.1, seed=0)
    ckpt = _SkewedClocks(dirpath=tmp_path / "ck", every_n_train_steps=0, train_time_interval=timedelta(hours=1),
                         save_top_k=-1, filename="{step}", save_last=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=9, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        callbacks=[ckpt, CheckpointOnSigterm()])
    loopback_rendezvous(trainer)
    trainer.fit(module, _Streams())
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.ckpt")) == ["step=6.ckpt"]
    saved = load_checkpoint_file(tmp_path / "ck" / "step=6.ckpt")
    assert saved["global_step"] == 6 and saved["distrnn"]["world_size"] == 2


def test_ray_reports_follow_batches_that_make_several_updates(monkeypatch):
    """ReportToRay (checkpoints to Ray storage every report_every updates): with 4 updates a batch
    and n = 6, after the batches that passed 6, 12, 18, 24 (updates 8, 12, 20, 24); testing
    ``step % n`` at the batch's end reported only at 12 and 24. The end of training (28, mid-epoch
    1) is reported at its batch's end, before Lightning closes the epoch (reported later, a job
    resubmitted for more steps skipped the rest of epoch 1)."""
    from distrnn.config import TaskSpec
    from distrnn.data.loaders import TensorLoader
    from distrnn.raytrain import ReportToRay

    from helpers import ListDataModule, make_module, trainer

    reported = []

    def report(self, t, force=False):  # what it hands to Ray (which needs a session) aside
        reported.append((t.global_step, t.fit_loop.epoch_progress.current.processed))
        self._last_step = t.global_step

    monkeypatch.setattr(ReportToRay, "_report", report)
    task = TaskSpec(kind="regression", output_dim=1, input_dim=2, seq_len=40)
    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(16, 40, 2, generator=g), "y": torch.randn(16, 40, 1, generator=g),
            "mask": torch.ones(16, 40, dtype=torch.bool)}
    module = make_module(task, recurrence="gru", hidden=8, mode="tbptt", k1=10)
    trainer(max_steps=28, callbacks=[ReportToRay(every_n_steps=6)]).fit(module, ListDataModule(TensorLoader(data, 4)))
    assert reported == [(8, 0), (12, 0), (20, 1), (24, 1), (28, 1)]  # 16 updates an epoch


@pytest.mark.fresh_store  # checks what its folder holds
def test_report_folders_of_killed_workers_are_swept_and_live_ones_kept(tmp_path):
    """A Ray worker killed mid-report (Ctrl-C or `ray job stop` on the driver) leaves its report
    folder, a whole checkpoint, in the temporary directory: the next report on the host removes
    it. A live process's folder, another host's and what is not a report folder stay."""
    import signal
    import subprocess
    import sys
    import tempfile

    from distrnn.raytrain import _report_dir_prefix, sweep_report_dirs

    code = ("import os, sys, tempfile, time; from distrnn.raytrain import _report_dir_prefix;"
            "d = tempfile.mkdtemp(prefix=_report_dir_prefix(), dir=sys.argv[1]);"
            "open(os.path.join(d, 'checkpoint.ckpt'), 'wb').write(b'x' * 1000); print(d, flush=True); time.sleep(600)")
    worker = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    killed = worker.stdout.readline().strip()
    alive = tempfile.mkdtemp(prefix=_report_dir_prefix(), dir=tmp_path)
    other_host = tmp_path / f"distrnn-ray-another.host-{worker.pid}-abc"
    unrelated = tmp_path / "distrnn-ray-notes"
    for d in (other_host, unrelated):
        d.mkdir()
    assert sweep_report_dirs(str(tmp_path)) == []  # the worker still runs
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert sweep_report_dirs(str(tmp_path)) == [killed]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(alive).name, other_host.name, unrelated.name])


def test_an_unwritable_checkpoint_folder_is_found_before_training_and_nothing_is_created(tmp_path, monkeypatch):
    from distrnn.paths import unwritable_folder

    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())  # (the suite's MLflow store)
    assert unwritable_folder("a/b/c") is None and sorted(tmp_path.iterdir()) == before  # probed in tmp_path, removed
    (tmp_path / "f").write_text("x")
    assert unwritable_folder("f/x") == "f is not a folder"
    if Path("/proc/self").is_dir():  # a folder where no file can be made, even by root
        assert unwritable_folder("/proc/distrnn/x").startswith("cannot write into /proc ("), unwritable_folder("/proc/x")
    assert unwritable_folder("s3://bucket/run") is None  # the store's to judge
