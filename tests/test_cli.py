"""The `distrnn` command: bad input, a real training job into MLflow, generation, a real server."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import cli, distrnn_cmd, free_port, write_corpus

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
        (["--data.init_args.path", "missing.txt"], "missing.txt"),
        (["--model.network.recurrence", "nope"], "model.network.recurrence"),
        (["--model.optimizer.lr", "-1"], "model.optimizer.lr"),
        (["--trainer.accelerator", "cpu", "--trainer.devices", "64"], "trainer.devices"),
        (["--trainer.strategy", "bogus"], "strategy"),
        (["--trainer.gradient_clip_val", "1.0"], "trainer.gradient_clip_val: distrnn clips in its own update; set model.optimizer.clip_norm"),
        (["--trainer.accumulate_grad_batches", "2"], "trainer.accumulate_grad_batches: not supported"),
        # found when the data is read (setup, loaders): before the MLflow run opens, not inside fit
        (["--data.init_args.batch_size", "9000"], "data.batch_size"),
        (["--data.init_args.batch_size", "2000"], "trainer.val_check_interval: 10 batches, but an epoch of this data has 1"),
        (["--model.init_weights", "missing.ckpt"], "model.init_weights: checkpoint missing.ckpt: no such file"),
        (["--model.init_weights", "h8.ckpt"], "model.init_weights: checkpoint h8.ckpt does not fit model.network"),
        pytest.param(["--trainer.strategy", "deepspeed_stage_2"], "DeepSpeed",
                     marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed installed")),
        pytest.param(["--trainer.accelerator", "gpu"], "gpu",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
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
    r = _run("fit", "--config", str(job))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MLflow run" in r.stdout
    runs = _runs(os.environ["MLFLOW_TRACKING_URI"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["params.model.tbptt.k1"] == "16" and run["params.data.init_args.batch_size"] == "4"
    for m in ("train/loss", "train/bpb", "train/grad_norm", "train/lr", "train/tokens_per_s", "val/loss", "val/bpb"):
        assert f"metrics.{m}" in run and run[f"metrics.{m}"] == run[f"metrics.{m}"], m  # present, not NaN
    assert run["metrics.val/bpb"] < 8.0  # better than uniform over bytes
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(run.run_id)}
    assert "config.yaml" in names
    ckpt_dirs = [n for n in names if n.startswith("best") or n.startswith("last")]
    assert ckpt_dirs, names
    ckpt = next(Path("checkpoints").rglob("last.ckpt"))
    code, out, err = cli(capsys, "generate", "--checkpoint", str(ckpt), "--prompt", "the cat", "--length", "40")
    assert code == 0, err
    assert out.startswith("the cat") and len(out.encode()) >= 40
    code, _, err = cli(capsys, "generate", "--checkpoint", "nope.ckpt")
    assert code == 2 and "nope.ckpt" in err


@pytest.mark.slow
def test_fit_against_a_real_mlflow_server(job, tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        import urllib.request

        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        r = _run("fit", "--config", str(job), env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        runs = _runs(uri)
        assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
        assert runs.iloc[0]["metrics.val/loss"] > 0
        assert not Path("mlflow.db").exists()  # nothing went to the local default store
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.slow
def test_resumed_job_continues_its_mlflow_run(job):
    r = _run("fit", "--config", str(job), "--trainer.max_steps", "10")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = next(Path("checkpoints").rglob("last.ckpt"))
    r = _run("fit", "--config", str(job), "--trainer.max_steps", "20", "--ckpt_path", str(ckpt))
    assert r.returncode == 0, r.stderr[-3000:]
    runs = _runs(os.environ["MLFLOW_TRACKING_URI"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    run = mlflow.MlflowClient().get_run(runs.iloc[0].run_id)
    assert run.data.params["trainer.max_steps"] == "10" and run.data.tags["resumed.trainer.max_steps"] == "20"
    steps = {m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")}
    # Lightning logs against batches (2 updates each here): the resume came after batch 5
    assert min(steps) < 5 <= max(steps)


def test_init_weights_starts_a_new_run_from_a_checkpoints_weights(job, capsys):
    from distrnn.checkpoint import load_checkpoint_file
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
