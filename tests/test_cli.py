"""The `distrnn` command: bad input, a real training job into MLflow, generation, a real server."""

import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

import distrnn

from conftest import REPO, cli, distrnn_cmd, free_port, mlflow_server, run_installed, write_corpus

CONFIG = """
seed_everything: 0
trainer: {{max_steps: {steps}, val_check_interval: 10, limit_val_batches: 3, log_every_n_steps: 2, enable_progress_bar: false}}
checkpoint: {{every_n_train_steps: 10}}
model:
  network: {{recurrence: gru, hidden_size: 32}}
  tbptt: {{k1: 16}}
  optimizer: {{lr: 0.01}}
data:
  class_path: distrnn.data.ByteCorpusDataModule
  init_args: {{path: corpus.txt, batch_size: 4, seq_len: 32}}
"""


def _run(*args, env=None, timeout=300):
    return subprocess.run(distrnn_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env or os.environ.copy())


def _runs(uri):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(search_all_experiments=True)


@pytest.fixture
def job(tmp_path):
    write_corpus(tmp_path / "corpus.txt", 8000)
    (tmp_path / "job.yaml").write_text(CONFIG.format(steps=20))
    return tmp_path / "job.yaml"


@pytest.mark.parametrize(
    "args,key",
    [
        (["--model.tbptt.k1", "abc"], "model.tbptt.k1"),
        (["--model.tbptt.kk", "3"], "model.tbptt.kk"),
        (["--model.tbptt.k1", "0"], "model.tbptt.k1"),
        (["--model.tbptt.k1", "64"], "model.tbptt.k1"),  # longer than data.seq_len
        (["--model.tbptt.micro_batch_size", "0"], "model.tbptt.micro_batch_size: must be > 0 or null, got 0"),
        (["--model.tbptt.overlap_recompute", "true"], "model.tbptt.overlap_recompute: only applies to mode 'checkpointed', not 'tbptt'"),
        (["--data.init_args.path", "missing.txt"], "missing.txt"),
        (["--model.network.recurrence", "nope"], "model.network.recurrence"),
        (["--model.optimizer.lr", "-1"], "model.optimizer.lr"),
        # torch.optim refused these when fit built the optimizer (a traceback, the run open)
        (["--model.optimizer.betas", "[1.5, 0.999]"], "model.optimizer.betas: each must be in [0, 1), got [1.5, 0.999]"),
        (["--model.optimizer.name", "sgd", "--model.optimizer.momentum", "-1"], "model.optimizer.momentum: must be >= 0"),
        (["--trainer.accelerator", "cpu", "--trainer.devices", "64"], "trainer.devices"),
        (["--trainer.strategy", "bogus"], "trainer.strategy: unknown strategy 'bogus'; use auto, ddp, deepspeed_stage_1"),
        # Lightning divided by these inside fit (ZeroDivisionError); its own refusals name the key too
        (["--trainer.val_check_interval", "0"], "trainer.val_check_interval: 0 batches; validate every N >= 1"),
        (["--trainer.check_val_every_n_epoch", "0"], "trainer.check_val_every_n_epoch: must be >= 1 or null"),
        (["--trainer.max_steps", "-5"], "trainer.max_steps: `max_steps` must be a non-negative integer or -1"),
        (["--trainer.limit_val_batches", "-1"], "trainer.limit_val_batches: You have passed invalid value -1.0"),
        (["--trainer.max_time", "xyz"], "trainer.max_time: `Timer(duration='xyz')` is not a valid duration"),
        # LightningCLI's own optimizer keys replaced the module's update (SGD: AttributeError inside fit)
        (["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1"], "optimizer, lr_scheduler: LightningCLI's keys are off"),
        (["--lr_scheduler", "torch.optim.lr_scheduler.StepLR"], "the optimizer and its schedule are model.optimizer"),
        (["--trainer.gradient_clip_val", "1.0"], "trainer.gradient_clip_val: distrnn clips in its own update; set model.optimizer.clip_norm"),
        (["--trainer.accumulate_grad_batches", "2"], "trainer.accumulate_grad_batches: not supported"),
        (["--trainer.accumulate_grad_batches", "2"], "set model.tbptt.micro_batch_size to pass them through in groups"),
        # another library's class refusing its arguments: the class and its own error, not
        # jsonargparse's "Does not validate against any of the Union subtypes"
        (["--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay", "1.5"],
         "lightning.pytorch.callbacks.EMAWeightAveraging: Invalid decay value 1.5 provided"),
        # found when the data is read (setup, loaders): before the MLflow run opens, not inside fit
        (["--data.init_args.batch_size", "9000"], "data.batch_size"),
        (["--data.init_args.batch_size", "2000"], "trainer.val_check_interval: 10 batches, but an epoch of this data has 1"),
        (["--model.init_weights", "missing.ckpt"], "model.init_weights: checkpoint missing.ckpt: no such file"),
        # Lightning found these out at the first save, after training up to it (a traceback)
        (["--checkpoint.dirpath", "corpus.txt/ck"], "checkpoint.dirpath: corpus.txt is not a folder (checkpoints would go to"),
        (["--trainer.logger.init_args.checkpoint_dir", "corpus.txt/ck"],
         "trainer.logger.init_args.checkpoint_dir: corpus.txt is not a folder (checkpoints would go to corpus.txt/ck)"),
        (["--checkpoint.filename", "{step"], "checkpoint.filename: '{step' is not a format string"),
        (["--trainer.logger.init_args.tracking_uri", "sqlite:///corpus.txt/x/m.db"],  # was: the logger class and errno
         "trainer.logger.init_args.tracking_uri: the MLflow store sqlite:///corpus.txt/x/m.db cannot be used: corpus.txt is not a folder"),
        # the store's file lock waited its 120 s in a folder that cannot be written, then failed
        (["--trainer.logger.init_args.tracking_uri", "sqlite:////proc/m.db"],
         "trainer.logger.init_args.tracking_uri: the MLflow store sqlite:////proc/m.db cannot be used: cannot write into /proc ("),
        (["--checkpoint.save_top_k", "-2"], "checkpoint.save_top_k: Invalid value for save_top_k=-2"),
        (["--model.init_weights", "h8.ckpt"], "model.init_weights: checkpoint h8.ckpt does not fit model.network"),
        pytest.param(["--trainer.strategy", "deepspeed_stage_2"], "DeepSpeed",
                     marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed installed")),
        pytest.param(["--trainer.accelerator", "gpu"], "trainer.accelerator: gpu, but no CUDA device is visible",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
        # the layer's forward failed inside fit (a RuntimeError traceback, the run open)
        (["--trainer.accelerator", "cpu", "--model.network.recurrence", "mingru", "--model.network.options",
          "{backend: triton}"], "model.network.options.backend: triton needs a CUDA device, and this run is on cpu"),
        # only a GPU path cuts the scan into pieces: a CPU run trained, a GPU one failed inside fit
        (["--model.network.recurrence", "mingru", "--model.network.options", "{scan_chunk: 0}"],
         "model.network.options.scan_chunk: must be an integer >= 1 (steps), got 0"),
        (["--model.network.recurrence", "minlstm", "--model.network.options", "{chrono: abc}"],
         "model.network.options.chrono: abc must be a number > 2"),
        (["--model.network.recurrence", "mingru", "--model.network.options", "{kernel_split: half}"],
         "model.network.options.kernel_split: must be auto or an integer >= 1 (chunks of the time axis), got 'half'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run(job, args, key, capsys):
    # in this process; test_unknown_key_in_config_file runs the command as a process
    from distrnn.config import NetworkConfig, TaskSpec
    from distrnn.engine import TBPTTModule

    other = TBPTTModule(NetworkConfig(recurrence="gru", hidden_size=8), task=TaskSpec(kind="language_model", output_dim=256, vocab_size=256))
    torch.save({"state_dict": other.state_dict()}, "h8.ckpt")  # the job's model has hidden_size 32
    code, _, err = cli(capsys, "fit", "--config", str(job), *args)
    assert code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("distrnn: error:") and key in last, last
    assert "Traceback" not in err
    assert not Path("mlflow.db").exists() or _runs(os.environ["MLFLOW_TRACKING_URI"]).empty
    assert not Path("checkpoints").exists()


@pytest.mark.fresh_store
def test_fast_dev_run_creates_no_mlflow_store(job, capsys):
    """Lightning suppresses logging under fast_dev_run, but the logger had been built first and
    made the store: a new mlflow.db (and its lock file) for a run that never came."""
    code, _, err = cli(capsys, "fit", "--config", str(job), "--trainer.fast_dev_run", "true")
    assert code == 0, err[-2000:]
    assert not Path("mlflow.db").exists() and not Path("mlflow.db.lock").exists()
    assert not Path("checkpoints").exists()


def test_enable_checkpointing_false_trains_without_writing_checkpoints(job, capsys):
    """distrnn always builds the `checkpoint:` key's callback; Lightning then refused
    `--trainer.enable_checkpointing false` ("found ModelCheckpoint in callbacks"). Now the run
    trains, is logged, and writes no checkpoint file."""
    code, _, err = cli(capsys, "fit", "--config", str(job), "--trainer.enable_checkpointing", "false")
    assert code == 0, err[-3000:]
    runs = _runs(os.environ["MLFLOW_TRACKING_URI"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED" and runs.iloc[0]["metrics.val/loss"] > 0, runs.T
    assert not [p for p in Path.cwd().rglob("*.ckpt")], list(Path.cwd().rglob("*.ckpt"))


def test_runs_record_their_data_as_mlflow_datasets_with_a_digest_of_the_content(job, capsys):
    """MLflow's dataset tracking (the UI's "Datasets"): a fit logs its training and validation
    splits (name, absolute path, a digest of the bytes, token and document counts); a second fit
    on the same corpus the same digests; one with a byte of the corpus changed in the training part
    another training digest and the same validation one; `validate` its validation split."""

    def inputs(run):
        return {t.value: d.dataset for d in run.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context"}

    def fit():
        code, _, err = cli(capsys, "fit", "--config", str(job), "--trainer.max_steps", "2")
        assert code == 0, err[-3000:]
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        return mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["start_time DESC"])[0]

    first, again = fit(), fit()
    import lightning

    env = {k: v for k, v in first.data.tags.items() if k.startswith("distrnn.env.")}  # the libraries and device too
    assert env["distrnn.env.torch"] == torch.__version__ and env["distrnn.env.lightning"] == lightning.__version__
    assert env["distrnn.env.device"] == "cpu" and env["distrnn.env.mlflow"] == mlflow.__version__ and "distrnn.env.python" in env
    assert env["distrnn.env.cpu_subnormals"] == "flushed"  # (distrnn/denormals.py)
    a, b = inputs(first), inputs(again)
    assert sorted(a) == ["training", "validation"] and first.info.run_id != again.info.run_id
    corpus = (job.parent / "corpus.txt").resolve()
    for context, d in a.items():
        assert (d.name, d.source_type, json.loads(d.source)) == ("corpus.txt", "local", {"uri": str(corpus)})
        assert (d.digest, d.profile) == (b[context].digest, b[context].profile) and len(d.digest) == 16
    n = corpus.stat().st_size
    assert json.loads(a["training"].profile)["tokens"] + json.loads(a["validation"].profile)["tokens"] == n
    data = bytearray(corpus.read_bytes())
    data[100] = (data[100] + 1) % 256
    corpus.write_bytes(bytes(data))
    third = fit()
    c = inputs(third)
    assert c["training"].digest != a["training"].digest and c["validation"].digest == a["validation"].digest
    # `runs compare` shows a data column: the same config, the corpus changed under the third run
    code, out, err = cli(capsys, "runs", "compare", "--experiment", "distrnn")
    assert code == 0, err[-2000:]
    head, _, *rows = out.strip().splitlines()
    col = head.split().index("data")
    assert [r.split()[col] for r in rows] == [a["training"].digest[:8]] * 2 + [c["training"].digest[:8]], out

    code, _, err = cli(capsys, "validate", "--config", str(job), "--ckpt_path", "last")
    assert code == 0, err[-3000:]
    (evaluation,) = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                     if r.data.tags.get("distrnn.stage") == "validate"]
    v = inputs(evaluation)
    assert sorted(v) == ["validation"] and v["validation"].digest == a["validation"].digest


def test_a_store_without_the_datasets_api_warns_and_trains(job, capsys, monkeypatch):
    """A tracking server from before MLflow 2.4 answers the inputs call with an error (404): the
    run trains and finishes all the same, with one warning."""
    from mlflow.exceptions import MlflowException

    def refuse(self, run_id, datasets=None, models=None):
        raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-inputs failed with error code 404")

    monkeypatch.setattr(mlflow.MlflowClient, "log_inputs", refuse)
    code, _, err = cli(capsys, "fit", "--config", str(job), "--trainer.max_steps", "2")
    assert code == 0, err[-3000:]
    assert err.count("distrnn: warning: the MLflow store did not take the run's datasets (API request") == 1, err[-2000:]
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED" and not run.inputs.dataset_inputs


def test_a_file_that_is_no_checkpoint_is_one_line_for_every_command(job, capsys):
    """validate/test/predict read --ckpt_path through Lightning first (a torch.load traceback for
    a file that is no checkpoint); fit read it through distrnn: one line naming the file, each."""
    for command in ("fit", "validate", "test", "predict"):
        code, _, err = cli(capsys, command, "--config", str(job), "--ckpt_path", "corpus.txt")
        assert code == 2 and "Traceback" not in err, (command, err[-2000:])
        assert err.strip().splitlines()[-1] == ("distrnn: error: checkpoint corpus.txt: not a PyTorch checkpoint file"
                                                " (neither torch.save's zip format nor a pickle)"), (command, err[-500:])


def test_help_names_every_command_and_each_answers_its_own_help(capsys):
    """`distrnn --help` listed only Lightning's four subcommands (and called itself "Lightning
    Trainer command line tool"): distrnn's own commands are named there, and each has a --help."""
    code, out, _ = cli(capsys, "--help")
    assert code == 0 and "Lightning Trainer command line tool" not in out
    own = ["generate", "download", "convert-checkpoint", "runs"]
    for name in own + ["fit", "validate", "test", "predict"]:
        assert name in out, (name, out)
    for name in own:
        code, out, err = cli(capsys, name, "--help")
        assert code == 0 and out.startswith(f"usage: distrnn {name}"), (name, out[:300], err[-500:])
    code, out, _ = cli(capsys, "fit", "--help")  # each config field with the docstring below it
    assert code == 0 and "Steps between updates (tbptt)" in out and "Hidden units per layer (H)." in out, out[:2000]
    from jsonargparse import ArgumentParser

    from distrnn.config import TBPTTConfig

    later = ArgumentParser()  # the costly docstring reading is off again for the parsers of other commands
    later.add_class_arguments(TBPTTConfig, "tbptt")
    assert "--tbptt.k1" in later.format_help() and "Steps between updates" not in later.format_help()
    code, _, err = cli(capsys)  # no command at all: the commands named, not only Lightning's four
    assert code == 2 and all(name in err for name in own + ["fit"]) and len(err.strip().splitlines()) == 1, err


def test_own_commands_start_without_lightning(tmp_path):
    """The installed `distrnn` script runs its own commands without importing Lightning (their
    --help took ~4-5.5 s, ~3 s of it Lightning's CLI and the data modules; now 0.06-1.2 s); fit
    still gets LightningCLI. (`generate` on a checkpoint: test_fit_logs_one_run_to_mlflow_and_generates.)"""
    for name in ("download", "tokenize", "runs", "generate", "convert-checkpoint", "fit"):
        r, imported = run_installed(name, "--help", cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.startswith("usage: distrnn"), (name, r.stdout[:300], r.stderr[-1000:])
        assert ("lightning" in imported) == (name == "fit"), (name, sorted(m for m in imported if "lightning" in m)[:5])
        if name in ("download", "tokenize", "runs"):  # nor torch (~0.8 s; `import distrnn` imported it)
            assert "torch" not in imported, name


def test_more_gpus_than_the_machine_has_name_trainer_devices(monkeypatch, capsys):
    """On a GPU machine (stood in for: CUDA visible, 2 devices) more GPUs than exist are refused
    naming trainer.devices (Lightning's message named neither key nor count asked); as many as
    exist, or `auto`, pass."""
    from distrnn import cli as cli_mod

    monkeypatch.setattr(cli_mod, "_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for accelerator in ("gpu", "auto"):
        with pytest.raises(SystemExit) as e:
            cli_mod._check_devices({"accelerator": accelerator, "devices": "8"})
        assert e.value.code == 2
        assert capsys.readouterr().err.strip() == "distrnn: error: trainer.devices: 8 GPUs asked for, this machine has 2"
        cli_mod._check_devices({"accelerator": accelerator, "devices": 2})
        cli_mod._check_devices({"accelerator": accelerator, "devices": "auto"})


def test_a_corpus_that_cannot_be_fetched_is_one_line_before_the_run(job, capsys, monkeypatch):
    from distrnn.data import download

    def offline(name, cache_dir, corpus=None):
        raise download.DownloadError(f"{name}: cannot download https://example.invalid/x.zip: no network")

    monkeypatch.setattr(download, "fetch_corpus", offline)
    code, _, err = cli(capsys, "fit", "--config", str(job), "--data.init_args.path", "null", "--data.init_args.corpus", "enwik8")
    assert code == 2 and err.strip().splitlines()[-1] == (
        "distrnn: error: data.corpus: enwik8: cannot download https://example.invalid/x.zip: no network"), err[-2000:]
    assert "Traceback" not in err and not Path("checkpoints").exists()
    assert not Path("mlflow.db").exists() or _runs(os.environ["MLFLOW_TRACKING_URI"]).empty


@pytest.mark.fresh_store  # checks that no store was created
def test_malformed_scan_config_fails_before_the_run(job, capsys, monkeypatch):
    # the kernel reads it on the first forward on CUDA: by then a run and its checkpoints exist
    monkeypatch.setenv("DISTRNN_SCAN_CONFIG", "4,100,4,1")
    code, _, err = cli(capsys, "fit", "--config", str(job), "--model.network.recurrence", "mingru")
    assert code == 2 and err.strip().splitlines()[-1].startswith("distrnn: error: DISTRNN_SCAN_CONFIG: '4,100,4,1' is not"), err[-2000:]
    assert not Path("mlflow.db").exists() and not Path("checkpoints").exists()


def test_unknown_key_in_config_file(job):
    job.write_text(job.read_text().replace("tbptt: {k1: 16}", "tbptt: {k1: 16, truncation: 3}"))
    r = _run("fit", "--config", str(job))
    assert r.returncode == 2 and "truncation" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and not Path("checkpoints").exists()


def test_print_config(job, capsys):
    code, out, err = cli(capsys, "fit", "--config", str(job), "--print_config")
    assert code == 0, err
    assert "class_path: distrnn.data.ByteCorpusDataModule" in out and "k1: 16" in out


@pytest.mark.slow
def test_fit_logs_one_run_to_mlflow_and_generates(job, capsys):
    r = _run("fit", "--config", str(job), "--trainer.logger.init_args.system_metrics_s", "0.05")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MLflow run" in r.stdout
    assert "litlogger" not in r.stdout + r.stderr  # Lightning's advertisement for another logger
    runs = _runs(os.environ["MLFLOW_TRACKING_URI"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["params.model.tbptt.k1"] == "16" and run["params.data.init_args.batch_size"] == "4"
    for m in ("train/loss", "train/bpb", "train/grad_norm", "train/lr", "train/tokens_per_s", "val/loss", "val/bpb"):
        assert f"metrics.{m}" in run and run[f"metrics.{m}"] == run[f"metrics.{m}"], m  # present, not NaN
    assert run["metrics.val/bpb"] < 8.0  # better than uniform over bytes
    client = mlflow.MlflowClient()
    # the machine, sampled every 0.05 s by MLflow's monitors (and once at the end), at the step of the moment
    cpu = client.get_metric_history(run.run_id, "system/cpu_utilization_percentage")
    memory = client.get_metric_history(run.run_id, "system/system_memory_usage_megabytes")
    assert len(cpu) >= 2 and all(0 <= m.value <= 100 for m in cpu) and any(m.value > 0 for m in cpu)
    assert memory and all(m.value > 100 for m in memory)
    steps = [m.step for m in sorted(cpu, key=lambda m: m.timestamp)]
    assert steps == sorted(steps) and 0 < steps[-1] <= 40, steps
    names = {a.path for a in client.list_artifacts(run.run_id)}
    assert "config.yaml" in names
    # the code that trained: this checkout's commit (MLflow's own tag was empty: `distrnn` runs
    # from the git-ignored .venv) and whether tracked files differ from it, the difference logged
    tags = client.get_run(run.run_id).data.tags
    if (REPO / ".git").exists():
        diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD"], capture_output=True, text=True, check=True).stdout
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        assert tags["mlflow.source.git.commit"] == head.strip() and tags["distrnn.git.dirty"] == str(bool(diff)).lower()
        assert ("code.diff" in names) == bool(diff), names
    assert tags["distrnn.version"] == distrnn.__version__
    ckpt_dirs = [n for n in names if n.startswith("best") or n.startswith("last")]
    assert ckpt_dirs, names
    ckpt = next(Path("checkpoints").rglob("last.ckpt"))
    weights = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert run["params.model.num_params"] == str(sum(t.numel() for t in weights.values()))
    code, out, err = cli(capsys, "generate", "--checkpoint", str(ckpt), "--prompt", "the cat", "--length", "40")
    assert code == 0, err
    assert out.startswith("the cat") and len(out.encode()) >= 40
    # the installed command samples the same text, without importing Lightning or the training module
    r, imported = run_installed("generate", "--checkpoint", str(ckpt), "--prompt", "the cat", "--length", "40")
    assert r.returncode == 0 and r.stdout == out, r.stderr[-2000:]
    assert not {"lightning", "distrnn.engine"} & imported, sorted(m for m in imported if "lightning" in m)[:5]
    code, _, err = cli(capsys, "generate", "--checkpoint", "nope.ckpt")
    assert code == 2 and "nope.ckpt" in err
    for flag, value in (("--tokenizer", "tok.json"), ("--eot", "none")):  # token-model options, one line
        code, _, err = cli(capsys, "generate", "--checkpoint", str(ckpt), flag, value)
        assert code == 2 and err.strip().endswith(f"{flag}: {ckpt} is a byte-level model; it reads and writes bytes,"
                                                  " without a tokenizer") and err.count("\n") == 1, err
    # (a negative temperature favoured the least probable bytes; a negative top_k: torch.topk's traceback)
    for flag, value, message in (("--temperature", "-1", "--temperature must be >= 0, got -1.0"),
                                 ("--top_k", "-3", "--top_k must be >= 0 (0: no cut), got -3")):
        code, _, err = cli(capsys, "generate", "--checkpoint", str(ckpt), flag, value)
        assert code == 2 and err.strip().endswith(message), err
    code, greedy, _ = cli(capsys, "generate", "--checkpoint", str(ckpt), "--temperature", "0", "--length", "20", "--seed", "1")
    assert code == 0 and greedy == cli(capsys, "generate", "--checkpoint", str(ckpt), "--temperature", "0", "--length", "20",
                                       "--seed", "2")[1]  # the most probable byte each time, whatever the seed

    # an evaluation of the checkpoint is its own run, nested under the run that trained it
    code, out, err = cli(capsys, "validate", "--config", str(job), "--ckpt_path", str(ckpt))
    assert code == 0, err[-3000:]
    runs = _runs(os.environ["MLFLOW_TRACKING_URI"])
    assert len(runs) == 2
    evaluation = runs[runs.run_id != run.run_id].iloc[0]
    # it says where its results went, as fit does (not the training run's checkpoints)
    assert f"MLflow run {evaluation.run_id} in experiment" in out and "checkpoints:" not in out, out
    assert f"#/experiments/{evaluation.experiment_id}/runs/{evaluation.run_id}" in out, out
    assert evaluation["tags.mlflow.parentRunId"] == run.run_id and evaluation["tags.distrnn.stage"] == "validate"
    assert evaluation["tags.mlflow.runName"] == run["tags.mlflow.runName"] + "-validate"
    assert evaluation["tags.distrnn.checkpoint"] == str(ckpt) and evaluation["metrics.val/loss"] > 0
    trained = mlflow.MlflowClient().get_run(run.run_id)
    assert trained.data.metrics["val/loss"] == run["metrics.val/loss"] and trained.info.status == "FINISHED"
    # runs compare: training runs, the evaluation only when asked for
    experiment = mlflow.get_experiment(run.experiment_id).name
    code, out, err = cli(capsys, "runs", "compare", "--experiment", experiment)
    names = [ln.split()[0] for ln in out.splitlines()[2:]]
    assert code == 0 and names == [run["tags.mlflow.runName"]] and "1 validate/test/predict runs not shown" in err
    code, out, _ = cli(capsys, "runs", "compare", "--experiment", experiment, "--evaluations")
    assert code == 0 and sorted(ln.split()[0] for ln in out.splitlines()[2:]) == sorted(runs["tags.mlflow.runName"])


@pytest.mark.fresh_store  # checks that no local store was created
@pytest.mark.slow
def test_fit_against_a_real_mlflow_server(job, tmp_path, store_template):
    with mlflow_server(tmp_path, auth=False, template=store_template) as uri:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        r = _run("fit", "--config", str(job), env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        runs = _runs(uri)
        assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
        assert runs.iloc[0]["metrics.val/loss"] > 0
        assert not Path("mlflow.db").exists()  # nothing went to the local default store


@pytest.mark.slow
def test_code_version_names_the_commit_and_the_uncommitted_changes_of_a_tracked_source(tmp_path, monkeypatch):
    from distrnn.provenance import code_version

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path / "repo"), *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    pkg = tmp_path / "repo/pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    git("init", "-q", "-b", "trunk")
    git("add", "pkg/__init__.py")
    git("commit", "-q", "-m", "one")
    tags, diff = code_version(pkg)
    assert tags == {"distrnn.version": distrnn.__version__, "mlflow.source.git.commit": git("rev-parse", "HEAD"),
                    "mlflow.source.git.branch": "trunk", "distrnn.git.dirty": "false"} and diff is None
    (pkg / "__init__.py").write_text("x = 2\n")
    (tmp_path / "repo/untracked.txt").write_text("not code of the commit\n")
    tags, diff = code_version(pkg)
    assert tags["distrnn.git.dirty"] == "true" and "-x = 1\n+x = 2" in diff and "untracked" not in diff
    git("commit", "-qam", "two")
    git("checkout", "-q", "--detach")
    assert "mlflow.source.git.branch" not in code_version(pkg)[0]
    # inside a checkout but not tracked by it (a venv's site-packages), or no checkout at all: the version only
    other = tmp_path / "repo/.venv/site-packages/pkg"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    plain = tmp_path / "plain/pkg"
    plain.mkdir(parents=True)
    (plain / "__init__.py").write_text("")
    for folder in (other, plain):
        assert code_version(folder) == ({"distrnn.version": distrnn.__version__}, None)
    # a Ray job's package (no .git) takes the submitting checkout's tags, as tracking_env passes them
    from distrnn.provenance import tracking_env

    monkeypatch.setenv("DISTRNN_CODE_TAGS", tracking_env()["DISTRNN_CODE_TAGS"])
    tags, diff = code_version(plain)
    assert tags == code_version()[0] and diff is None
    if (REPO / ".git").exists():
        assert tags["mlflow.source.git.commit"] == subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def test_a_resume_under_other_code_records_it_beside_the_first(tmp_path, monkeypatch):
    """The code of the start stays the run's; a resume under another commit, now with
    uncommitted changes, adds resumed.<tag> for what changed, and its diff as a file of its own."""
    from distrnn import tracking

    logger = tracking.MLflowLogger(experiment_name="code", tracking_uri=f"sqlite:///{tmp_path}/m.db", system_metrics_s=0)
    first = {"distrnn.version": "0.1.0", "mlflow.source.git.commit": "a" * 40, "distrnn.git.dirty": "false"}
    monkeypatch.setattr(tracking, "code_version", lambda: (first, None))
    env = {"distrnn.env.torch": "2.13.0+cpu", "distrnn.env.device": "cpu"}
    tracking.LogConfigToMLflow._log_code(logger, resumed=False, suffix="", before={}, env=env)
    later = {**first, "mlflow.source.git.commit": "b" * 40, "distrnn.git.dirty": "true"}
    monkeypatch.setattr(tracking, "code_version", lambda: (later, "diff --git a/x b/x\n"))
    tracking.LogConfigToMLflow._log_code(logger, resumed=True, suffix="-resumed-1",
                                         before=logger.experiment.get_run(logger.run_id).data.tags,
                                         env={**env, "distrnn.env.device": "NVIDIA H100 80GB HBM3"})
    tags = logger.experiment.get_run(logger.run_id).data.tags
    assert tags["mlflow.source.git.commit"] == "a" * 40 and tags["resumed.mlflow.source.git.commit"] == "b" * 40
    assert tags["distrnn.git.dirty"] == "false" and tags["resumed.distrnn.git.dirty"] == "true"
    assert tags["distrnn.env.device"] == "cpu" and tags["resumed.distrnn.env.device"] == "NVIDIA H100 80GB HBM3"
    assert "resumed.distrnn.version" not in tags and "resumed.distrnn.env.torch" not in tags  # unchanged
    assert [a.path for a in logger.experiment.list_artifacts(logger.run_id)] == ["code-resumed-1.diff"]


def test_resumed_job_continues_its_mlflow_run(job):
    r = _run("fit", "--config", str(job), "--trainer.max_steps", "10")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = next(Path("checkpoints").rglob("last.ckpt"))
    r = _run("fit", "--config", str(job), "--trainer.max_steps", "20", "--ckpt_path", str(ckpt))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exists and is not empty" not in r.stderr  # its own folder: no warning
    runs = _runs(os.environ["MLFLOW_TRACKING_URI"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    run = mlflow.MlflowClient().get_run(runs.iloc[0].run_id)
    assert run.data.params["trainer.max_steps"] == "10" and run.data.tags["resumed.trainer.max_steps"] == "20"
    assert not any(k.startswith("resumed.mlflow") or k.startswith("resumed.distrnn") for k in run.data.tags)  # the same code
    client = mlflow.MlflowClient()
    # against updates (2 a batch here, logged every 2nd batch: the index of its second update),
    # as max_steps and the checkpoint names count (Lightning's own step is the batch's index: 1, 3, ...)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [3, 7, 11, 15, 19]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [19]
    assert sorted(p.name for p in ckpt.parent.glob("best-*.ckpt")) == ["best-20.ckpt"]


def test_ckpt_path_last_and_best_find_the_newest_checkpoint_of_the_experiment(job, capsys):
    """Each run checkpoints into its own folder, so Lightning's own `last` (the new run's empty
    folder) found nothing and quietly started a new run. distrnn looks through the experiment's
    runs: the first job starts afresh, the second continues its run and checkpoint."""
    from distrnn.checkpoint_files import load_checkpoint_file

    code, _, err = cli(capsys, "fit", "--config", str(job), "--trainer.max_steps", "10", "--ckpt_path", "last")
    assert code == 0, err[-3000:]
    assert "--ckpt_path last: no checkpoint in experiment 'distrnn' under checkpoints: starting a new run" in err
    (first,) = Path("checkpoints").rglob("last.ckpt")
    code, _, err = cli(capsys, "fit", "--config", str(job), "--trainer.max_steps", "20", "--ckpt_path", "last")
    assert code == 0, err[-3000:]
    assert f"--ckpt_path last: resuming {first}" in err
    runs = _runs(os.environ["MLFLOW_TRACKING_URI"])
    assert len(runs) == 1 and list(Path("checkpoints").rglob("last.ckpt")) == [first]
    assert load_checkpoint_file(first)["global_step"] == 20
    code, _, err = cli(capsys, "validate", "--config", str(job), "--ckpt_path", "last")
    assert code == 0 and f"validate: {first}" in err, err[-3000:]
    # best: the file the newest checkpoint names (a new process does not know it: Lightning failed)
    (best,) = Path("checkpoints").rglob("best-*.ckpt")
    code, _, err = cli(capsys, "validate", "--config", str(job), "--ckpt_path", "best")
    assert code == 0 and f"--ckpt_path best: validate: {best}" in err, err[-3000:]
    for alias in ("last", "best"):
        code, _, err = cli(capsys, "test", "--config", str(job), "--ckpt_path", alias,
                           "--trainer.logger.init_args.experiment_name", "empty")
        assert code == 2 and err.strip().splitlines()[-1] == (
            f"distrnn: error: ckpt_path: {alias}: no checkpoint in experiment 'empty' under checkpoints to test")


def test_init_weights_starts_a_new_run_from_a_checkpoints_weights(job, capsys):
    from distrnn.checkpoint_files import load_checkpoint_file
    from distrnn.engine import TBPTTModule

    code, _, err = cli(capsys, "fit", "--config", str(job), "--trainer.max_steps", "10")
    assert code == 0, err[-3000:]
    (first,) = Path("checkpoints").rglob("last.ckpt")
    trained = load_checkpoint_file(first)
    hp = trained["hyper_parameters"]
    fresh = TBPTTModule(**hp).state_dict()
    loaded = TBPTTModule(**hp, init_weights=str(first)).state_dict()
    assert loaded.keys() == trained["state_dict"].keys()
    assert all(torch.equal(loaded[k], trained["state_dict"][k]) for k in loaded)
    assert any(not torch.equal(loaded[k], fresh[k]) for k in loaded)

    code, _, err = cli(capsys, "fit", "--config", str(job), "--trainer.max_steps", "4", "--model.init_weights", str(first))
    assert code == 0, err[-3000:]
    runs = _runs(os.environ["MLFLOW_TRACKING_URI"]).sort_values("start_time")
    assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
    # same config, same seed: MLflow's own names came from the seeded RNG and were equal
    assert runs.iloc[0]["tags.mlflow.runName"] != runs.iloc[1]["tags.mlflow.runName"]
    assert runs.iloc[1]["params.model.init_weights"] == str(first)
    (second,) = [p for p in Path("checkpoints").rglob("last.ckpt") if p != first]
    assert runs.iloc[1].run_id in str(second)
    new = load_checkpoint_file(second)
    # a new run: its own loop counters and optimizer state, not the first run's continued
    assert new["global_step"] == 4 and trained["global_step"] == 10
    assert int(next(iter(new["optimizer_states"][0]["state"].values()))["step"]) == 4
    assert "init_weights" not in new["hyper_parameters"]
    first.unlink()  # the new checkpoint stands alone
    code, out, err = cli(capsys, "generate", "--checkpoint", str(second), "--length", "10")
    assert code == 0, err
    # resuming the fine-tuning run (same command, --ckpt_path) needs no init file either
    code, _, err = cli(capsys, "fit", "--config", str(job), "--trainer.max_steps", "6", "--model.init_weights", str(first),
                       "--ckpt_path", str(second))
    assert code == 0, err[-3000:]
    assert load_checkpoint_file(second)["global_step"] == 6
    runs = _runs(os.environ["MLFLOW_TRACKING_URI"])
    assert len(runs) == 2 and runs.sort_values("start_time").iloc[1]["params.model.init_weights"] == str(first)


def test_a_run_name_is_not_drawn_from_the_seeded_rng(tmp_path):
    """Two loggers made right after seeding get different names, and the seeded stream is where
    seeding left it (MLflow's own name draw took from it)."""
    import random

    from distrnn.tracking import MLflowLogger

    uri = f"sqlite:///{tmp_path}/names.db"
    names = []
    for _ in range(2):
        random.seed(0)
        logger = MLflowLogger(experiment_name="names", tracking_uri=uri, log_plots=False)
        names.append(mlflow.MlflowClient(uri).get_run(logger.run_id).info.run_name)
        assert random.random() == random.Random(0).random()
        logger.finalize("success")
    assert names[0] != names[1] and all(n.count("-") == 2 for n in names), names


def test_system_metrics_zero_logs_none_and_a_negative_interval_is_one_line(tmp_path, job, capsys, monkeypatch):
    from distrnn.tracking import MLflowLogger

    uri = f"sqlite:///{tmp_path}/system.db"
    logger = MLflowLogger(experiment_name="quiet", tracking_uri=uri, log_plots=False, system_metrics_s=0)
    logger.log_metrics({"train/loss": 1.0}, step=1)
    logger.finalize("success")
    assert sorted(mlflow.MlflowClient(uri).get_run(logger.run_id).data.metrics) == ["train/loss"]
    from distrnn import tracking

    def no_monitors(*args):
        raise ImportError("No module named 'psutil'")

    monkeypatch.setattr(tracking, "_SystemSampler", no_monitors)
    logger = MLflowLogger(experiment_name="quiet", tracking_uri=uri, log_plots=False)
    logger.log_metrics({"train/loss": 1.0}, step=1)  # the run goes on without them
    logger.finalize("success")
    assert "distrnn: warning: no system metrics: No module named 'psutil'" in capsys.readouterr().err
    assert sorted(mlflow.MlflowClient(uri).get_run(logger.run_id).data.metrics) == ["train/loss"]
    code, _, err = cli(capsys, "fit", "--config", str(job), "--trainer.logger.init_args.system_metrics_s", "-1")
    assert code == 2 and err.strip() == "distrnn: error: trainer.logger.init_args.system_metrics_s: must be >= 0, got -1.0", err


def _forecasting_job(capsys):
    """A CSV of two series, the arguments of a forecasting job on it, and a checkpoint ck/last.ckpt
    of 6 updates."""
    import numpy as np
    import pandas as pd

    t = np.arange(600, dtype=np.float64)
    table = pd.DataFrame({"a": 5 + 3 * np.sin(t / 9), "b": 100 + 10 * np.cos(t / 13)})
    table.to_csv("ts.csv", index=False)
    args = ["--data", "distrnn.data.TimeSeriesDataModule", "--data.init_args.path", "ts.csv",
            "--data.init_args.features", "[a, b]", "--data.init_args.targets", "[b]", "--data.init_args.window", "16",
            "--data.init_args.horizon", "2", "--data.init_args.batch_size", "6", "--data.init_args.stride", "4",
            "--model.network.recurrence", "gru", "--model.network.hidden_size", "16", "--model.tbptt.mode", "full",
            "--model.tbptt.k1", "16", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    code, _, err = cli(capsys, "fit", *args, "--trainer.max_steps", "6", "--checkpoint.dirpath", "ck")
    assert code == 0, err[-3000:]
    return table, args


def test_predict_writes_forecasts_in_the_tables_units(tmp_path, capsys):
    """`distrnn predict` writes predictions.pt; each forecast equals the checkpoint's model run by
    hand on that window, standardized and back with numpy's float64 statistics of the training rows."""
    import numpy as np

    from distrnn.generate import load_model

    table, args = _forecasting_job(capsys)
    code, out, err = cli(capsys, "predict", *args, "--ckpt_path", "ck/last.ckpt")
    assert code == 0, err[-3000:]
    assert "predictions: predictions.pt" in out
    written = torch.load("predictions.pt", weights_only=True)
    assert written["task"] == "regression" and written["world_size"] == 1

    # a file that cannot be written: one line before predicting (was: a traceback as prediction
    # started; a folder, after predicting everything), no run opened, the file above kept
    before, runs = Path("predictions.pt").read_bytes(), len(_runs(os.environ["MLFLOW_TRACKING_URI"]))
    Path("a_folder").mkdir()
    for path, line in (("a_folder", "a_folder is a folder: name the file to write, e.g. a_folder/predictions.pt"),
                       ("predictions.pt/p.pt", "predictions.pt is not a folder (predictions would go to predictions.pt/p.pt)")):
        code, _, err = cli(capsys, "predict", *args, "--ckpt_path", "ck/last.ckpt",
                           "--trainer.callbacks+=distrnn.predict.WritePredictions", "--trainer.callbacks.path", path)
        assert code == 2 and "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1] == f"distrnn: error: trainer.callbacks.path: {line}"
    assert Path("predictions.pt").read_bytes() == before and list(Path("a_folder").iterdir()) == []
    assert len(_runs(os.environ["MLFLOW_TRACKING_URI"])) == runs

    model = load_model("ck/last.ckpt")
    x, y = table[["a", "b"]].to_numpy(), table[["b"]].to_numpy()
    split = int(600 * 0.8)
    zx = (x - x[:split].mean(0)) / x[:split].std(0, ddof=1)
    starts = np.arange(split, 600 - 18 + 1, 4)
    got = torch.cat([b["prediction"] for b in written["batches"]])
    targets = torch.cat([b["target"] for b in written["batches"]])
    assert got.shape == (len(starts), 16, 1)
    with torch.no_grad():
        for i, s0 in enumerate(starts):
            window = torch.tensor(zx[s0:s0 + 16][None], dtype=torch.float32)
            z, _ = model(window)
            expected = z[0, :, 0].double().numpy() * y[:split].std(ddof=1) + y[:split].mean()
            np.testing.assert_allclose(got[i, :, 0].numpy(), expected, rtol=0, atol=1e-4)
            np.testing.assert_allclose(targets[i, :, 0].numpy(), y[s0 + 2:s0 + 18, 0], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_two_ranks_evaluate_and_predict_every_window_like_one_process(tmp_path, capsys):
    """A checkpoint of one process, evaluated by 2 DDP ranks: 26 validation windows in batches of
    6 make 5 batches, 3 on rank 0 and 2 on rank 1 (none left out, no per-batch collective to
    wait on an uneven count); val/loss equals one process's (1e-6) and the ranks' predictions,
    interleaved batch by batch, equal one process's."""
    import re

    _, args = _forecasting_job(capsys)
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--ckpt_path", "ck/last.ckpt"]

    def val_loss(out):
        return float(re.search(r"val/loss\s+([0-9.e-]+)", out).group(1))

    code, out, err = cli(capsys, "validate", *args, "--ckpt_path", "ck/last.ckpt")
    assert code == 0, err[-3000:]
    one = val_loss(out)
    r = _run("validate", *args, *ddp)
    assert r.returncode == 0, r.stderr[-3000:]
    assert val_loss(r.stdout) == pytest.approx(one, rel=1e-6, abs=1e-7)

    code, _, err = cli(capsys, "predict", *args, "--ckpt_path", "ck/last.ckpt")
    assert code == 0, err[-3000:]
    single = torch.load("predictions.pt", weights_only=True)["batches"]
    r = _run("predict", *args, *ddp)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(f"predictions.rank{k}.pt", weights_only=True) for k in (0, 1)]
    assert [len(d["batches"]) for d in ranks] == [3, 2] and len(single) == 5
    interleaved = [ranks[i % 2]["batches"][i // 2] for i in range(5)]
    for a, b in zip(interleaved, single):
        assert torch.equal(a["target"], b["target"])
        torch.testing.assert_close(a["prediction"], b["prediction"], rtol=1e-5, atol=1e-5)


def test_predict_carries_the_state_along_each_stream(job, capsys):
    """For a byte corpus, predictions come chunk by chunk with the state carried: they equal one
    pass of the model over each whole validation stream."""
    from distrnn.generate import load_model

    code, _, err = cli(capsys, "fit", "--config", str(job), "--trainer.max_steps", "6", "--trainer.logger", "false")
    assert code == 0, err[-3000:]
    (ckpt,) = Path("checkpoints").rglob("last.ckpt")
    code, _, err = cli(capsys, "predict", "--config", str(job), "--ckpt_path", str(ckpt), "--trainer.logger", "false")
    assert code == 0, err[-3000:]
    batches = torch.load("predictions.pt", weights_only=True)["batches"]
    assert len(batches) > 2
    predicted = torch.cat([b["prediction"] for b in batches], dim=1)
    mask = torch.cat([b["mask"] for b in batches], dim=1)
    targets = torch.cat([b["target"] for b in batches], dim=1)
    probability = torch.cat([b["probability"] for b in batches], dim=1)
    model = load_model(str(ckpt))
    text = torch.tensor(list(Path("corpus.txt").read_bytes()))
    val = text[len(text) - max(2, int(len(text) * 0.05)):]  # ByteCorpusDataModule's default split
    rows = predicted.shape[0]
    n = val.numel() - 1
    lengths = [n // rows + (r < n % rows) for r in range(rows)]
    start = 0
    with torch.no_grad():
        for r, length in enumerate(lengths):
            stream = val[start:start + length + 1]
            start += length
            logits, _ = model(stream[None, :-1])
            p, k = torch.softmax(logits[0], -1).max(-1)
            assert int(mask[r].sum()) == length
            assert torch.equal(targets[r, :length], stream[1:])
            assert torch.equal(predicted[r, :length], k)
            torch.testing.assert_close(probability[r, :length], p, rtol=1e-5, atol=1e-6)


def test_a_resumed_fit_trains_with_the_optimizer_settings_given_and_keeps_its_model(tmp_path, capsys, monkeypatch):
    """Resuming with another lr and weight decay (a lower lr to go on, or a PBT trial restarted from another
    trial's checkpoint with a perturbed one) trains with them, not with those in the checkpoint's optimizer
    state and hyperparameters (Lightning's CLI put the checkpoint's model settings over the command line),
    and the run records them as resumed.* tags. Another hidden size, whose weights the checkpoint cannot
    fill, or another optimizer (a traceback from inside SGD's step, before) is refused in one line naming
    the setting, before any run opens."""
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus.txt", 3000)
    base = ["fit", "--config", str(Path(__file__).parents[1] / "jobs/configs/tiny.yaml"), "--trainer.val_check_interval", "2",
            "--checkpoint.dirpath", "ckpts"]
    code, _, err = cli(capsys, *base, "--trainer.max_steps", "4")
    assert code == 0, err
    code, _, err = cli(capsys, *base, "--trainer.max_steps", "8", "--model.optimizer.lr", "0.002",
                       "--model.optimizer.weight_decay", "0.1", "--ckpt_path", "ckpts/last.ckpt")
    assert code == 0, err
    last = torch.load("ckpts/last.ckpt", map_location="cpu", weights_only=True)
    group = last["optimizer_states"][0]["param_groups"][0]
    assert last["global_step"] == 8 and group["lr"] == pytest.approx(0.002) and group["weight_decay"] == 0.1, group
    assert last["hyper_parameters"]["optimizer"]["lr"] == 0.002
    (run,) = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert run.data.params["model.optimizer.lr"] == "0.01" and run.data.tags["resumed.model.optimizer.lr"] == "0.002"

    before = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    code, _, err = cli(capsys, *base, "--trainer.max_steps", "12", "--model.network.hidden_size", "64",
                       "--ckpt_path", "ckpts/last.ckpt")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("distrnn: error: checkpoint ckpts/last.ckpt: its weights do not fit this model")
    assert "model.network.hidden_size 32 -> 64" in lines[-1], lines[-1]
    code, _, err = cli(capsys, *base, "--trainer.max_steps", "12", "--model.optimizer.name", "sgd",
                       "--ckpt_path", "ckpts/last.ckpt")
    assert code == 2 and err.strip().splitlines()[-1] == (
        "distrnn: error: checkpoint ckpts/last.ckpt: model.optimizer.name adamw -> sgd: the checkpoint holds the state"
        " of adamw; resume with adamw, or start a new run from its weights (--model.init_weights)"), err[-2000:]
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == before
    assert len(mlflow.search_runs(experiment_names=["tiny"])) == 1


@pytest.mark.fresh_store  # checks what its folder holds
@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "jobs" / "configs").glob("*.yaml")
                                        if not p.name.startswith("sweep_")))
def test_every_shipped_training_config_parses(capsys, tmp_path, monkeypatch, name):
    """The configs in jobs/configs stay valid as the classes they name change (sweeps have their
    own checks in test_sweep_config)."""
    import yaml

    monkeypatch.chdir(tmp_path)
    path = Path(__file__).parents[1] / "jobs" / "configs" / name
    code, out, err = cli(capsys, "fit", "--config", str(path), "--print_config")
    assert code == 0, err
    resolved, given = yaml.safe_load(out), yaml.safe_load(path.read_text())
    assert resolved["model"]["network"]["recurrence"] == given["model"]["network"]["recurrence"]
    assert resolved["data"]["class_path"] == given["data"]["class_path"]
    assert not list(tmp_path.iterdir())  # nothing written: no MLflow store, no checkpoint folder


def test_a_pre_tokenized_corpus_trains_logs_bits_per_token_and_bad_ids_are_one_line(tmp_path, capsys):
    """`distrnn fit` on nanoGPT-style uint16 token files (ids above 40,000 of a 40,100-id vocabulary,
    a next-token rule over 100 of them): it learns (validation loss far below the 100 ids'
    uniform 4.6 nats), logs bits per token as val/bpt (not bits per byte), the state reset at each end-of-text id, and generate
    asks for the tokenizer in one line (tests/test_tokenizer.py generates with one). A validation file of another tokenizer (an id
    outside the vocabulary) fails before any run opens, naming the file."""
    rule = lambda n, shift: 40_000 + (np.arange(n) * 37 + shift) % 100  # noqa: E731
    rule(20_000, 0).astype(np.uint16).tofile(tmp_path / "train.bin")
    rule(3_000, 11).astype(np.uint16).tofile(tmp_path / "val.bin")
    config = tmp_path / "tokens.yaml"
    config.write_text("""
seed_everything: 0
trainer: {max_steps: 60, val_check_interval: 20, limit_val_batches: 2, log_every_n_steps: 10,
          enable_progress_bar: false, enable_model_summary: false}
model:
  network: {recurrence: gru, hidden_size: 32}
  tbptt: {k1: 16}
  optimizer: {lr: 0.01}
data:
  class_path: distrnn.data.TokenFileDataModule
  init_args: {path: train.bin, val_path: val.bin, vocab_size: 40100, dtype: uint16, batch_size: 8, seq_len: 32,
              eot_token: 40099}
""")
    code, _, err = cli(capsys, "fit", "--config", str(config))
    assert code == 0, err[-3000:]
    # documents of 100 ids, each after an end-of-text id: the rule holds from a fresh state too
    assert len(list(Path("data_cache/documents").glob("*.starts.npy"))) == 2
    (run,) = mlflow.MlflowClient().search_runs([e.experiment_id for e in mlflow.MlflowClient().search_experiments()])
    assert run.data.metrics["val/bpt"] * math.log(2) == pytest.approx(run.data.metrics["val/loss"], rel=1e-4)
    assert run.data.metrics["val/loss"] < 4.0 and "val/bpb" not in run.data.metrics
    (ckpt,) = Path("checkpoints").rglob("last.ckpt")
    code, _, err = cli(capsys, "generate", "--checkpoint", str(ckpt))
    assert code == 2 and err.strip().endswith("a language model over 40100 token ids: pass --tokenizer, the"
                                              " tokenizer.json its data was made with"), err

    np.array([1, 2, 40_500, 3], dtype=np.uint16).tofile(tmp_path / "val.bin")
    code, _, err = cli(capsys, "fit", "--config", str(config))
    assert code == 2 and err.strip().splitlines()[-1] == (
        "distrnn: error: data.val_path val.bin: token id 40500 at position 2 is not below data.vocab_size 40100:"
        " is data.dtype the files' type, data.vocab_size their vocabulary's?"), err[-2000:]
    assert len(mlflow.MlflowClient().search_runs([e.experiment_id for e in mlflow.MlflowClient().search_experiments()])) == 1


def test_the_ui_hint_opens_the_run_where_its_store_is_served(tmp_path):
    from distrnn.tracking import ui_hint

    page = "#/experiments/3/runs/abc"
    assert ui_hint("http://10.0.0.5:5000/", "3", "abc") == f"open http://10.0.0.5:5000/{page}"
    assert ui_hint("databricks://profile", "3", "abc") is None  # its UI is the workspace's: no guess
    assert ui_hint("postgresql+psycopg2://u@db/mlflow", "3", "abc").startswith("mlflow ui ")
    # a store of one's own: the command that serves it, quoted for the shell
    store = f"sqlite:///{tmp_path}/it's here/mlflow.db"
    hint = ui_hint(store, "3", "abc", cwd=str(tmp_path))
    assert hint.startswith("mlflow ui --host 127.0.0.1 --port 5000 --workers 1 --backend-store-uri ") and hint.endswith(f"http://127.0.0.1:5000/{page})")
    assert shlex.split(hint.split("   (")[0])[-1] == store
    # this checkout's default store: its Makefile serves it (another project's Makefile does not)
    here = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "Makefile").write_text("all:\n\ttrue\n")
    assert ui_hint(here, "3", "abc", cwd=str(tmp_path)).startswith("mlflow ui ")
    (tmp_path / "Makefile").write_text((REPO / "Makefile").read_text())
    assert ui_hint(here, "3", "abc", cwd=str(tmp_path)) == f"make mlflow-ui   (then open http://127.0.0.1:5000/{page})"


@pytest.mark.slow
def test_make_mlflow_ui_serves_the_store_in_one_worker_without_mlflows_job_runner(tmp_path):
    """What the README's `make mlflow-ui` starts (here on a free port, over this test's store):
    the runs of the store, served by one uvicorn process and no job runner (MLflow's defaults
    started 15 processes, 2.75 GB)."""
    import psutil

    run_id = mlflow.MlflowClient().create_run(mlflow.MlflowClient().create_experiment("ui")).info.run_id
    port, venv = free_port(), Path(sys.executable).parent.parent
    log = tmp_path / "ui.log"  # a file: a pipe nobody reads would stop the server once full
    ui = subprocess.Popen(["make", "-C", str(REPO), "-o", f"{venv}/.installed", "mlflow-ui", f"VENV={venv}", f"MLFLOW_UI_PORT={port}"],
                          stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                body = json.dumps({"experiment_ids": [mlflow.get_experiment_by_name("ui").experiment_id]}).encode()
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    runs = json.load(r)["runs"]
                break
            except OSError:
                assert ui.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        assert [r["info"]["run_id"] for r in runs] == [run_id]
        # two Python processes under make's shell: MLflow's launcher and uvicorn serving alone
        commands = [p.cmdline() for p in psutil.Process(ui.pid).children(recursive=True)]
        pythons = [c for c in commands if Path(c[0]).name.startswith("python")]
        assert len(pythons) == 2 and sum(c[1:3] == ["-m", "uvicorn"] for c in pythons) == 1, commands
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)


def test_a_ray_driver_refuses_cudnn_dropout_under_checkpointed_bptt_for_gpu_workers(job, capsys):
    """The Ray driver checks a config on its CPU before any worker exists: for GPU workers it asks
    the module about CUDA too, so cuDNN's dropout between layers under checkpointed BPTT (which a
    recomputation cannot replay there) fails in one line before the job, not in every worker."""
    from distrnn.raytrain import check_config

    args = ["--config", str(job), "--model.tbptt.mode", "checkpointed", "--model.network.num_layers", "2",
            "--model.network.dropout", "0.2"]
    check_config(args)  # CPU workers: the CPU's RNNs draw dropout from torch's generators, replayed
    with pytest.raises(SystemExit) as e:
        check_config(args, use_gpu=True)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("distrnn: error: model.network.dropout: 0.2 between the layers of the cuDNN gru"), err
    assert err.endswith("(use_gpu: cuda)"), err
