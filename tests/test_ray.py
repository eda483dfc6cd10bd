"""distrnn on a real local Ray cluster (127.0.0.1, token authentication), started once for this
module by `cluster/local_cluster.py` and always stopped: Ray Train against a single process,
worker failure and restore, a Tune sweep through `ray job submit`, bad sweeps, authentication."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from conftest import REPO, ListeningSockets, beyond_loopback, cli, distrnn_cmd, listening_sockets, seed_store, write_corpus

pytestmark = pytest.mark.slow

PY = sys.executable
RAY = str(Path(sys.executable).parent / "ray")

CONFIG = """
seed_everything: 0
trainer: {{max_steps: 12, val_check_interval: 3, limit_val_batches: 2, log_every_n_steps: 2,
          enable_progress_bar: false, enable_model_summary: false,
          logger: {{class_path: distrnn.tracking.MLflowLogger, init_args: {{experiment_name: {exp}}}}}}}
checkpoint: {{every_n_train_steps: 100}}
model:
  network: {{recurrence: lstm, hidden_size: 16}}
  tbptt: {{k1: 8, k2: 12}}
  optimizer: {{name: adamw, lr: 0.01}}
data:
  class_path: distrnn.data.ByteCorpusDataModule
  init_args: {{path: {corpus}, batch_size: {batch}, seq_len: 16}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("ray-state")
    before = listening_sockets()
    up = subprocess.run([PY, str(REPO / "cluster/local_cluster.py"), "up", "--state-dir", str(state), "--num-cpus", "2"],
                        capture_output=True, text=True, timeout=180)
    try:
        assert up.returncode == 0, up.stderr
        info = json.loads((state / "cluster.json").read_text())
        info["state_dir"] = str(state)
        info["listening_before"] = before
        yield info
    finally:
        subprocess.run([PY, str(REPO / "cluster/local_cluster.py"), "down", "--state-dir", str(state)], timeout=180)


def _env(cluster, tmp, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({k: v for k, v in cluster.items() if k.startswith("RAY_")})
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_corpus(d / "corpus.txt", 6000)
    for batch in (2, 4):
        (d / f"b{batch}.yaml").write_text(CONFIG.format(exp="ray", corpus=d / "corpus.txt", batch=batch))
    return d


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _latest_ray_checkpoint(storage: Path, name: str) -> Path:
    found = sorted(glob.glob(str(storage / name / "checkpoint_*" / "checkpoint.ckpt")))
    assert found, f"no checkpoint reported under {storage / name}"
    return Path(found[-1])


def _ray_train(cluster, tmp, data, name, *extra, timeout=400):
    cmd = [PY, str(REPO / "jobs/train.py"), "--num-workers", "2", "--report-every", "4", "--storage-path",
           str(tmp / "store"), "--name", name, *extra, "--config", str(data / "b2.yaml")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(cluster, tmp), cwd=tmp)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, data, store_template):
    """The reference: one process reading all 4 streams (the 2 workers x 2 streams of the Ray run)."""
    tmp = tmp_path_factory.mktemp("single")
    env = {**os.environ, "MLFLOW_TRACKING_URI": seed_store(tmp, store_template)}
    r = subprocess.run(distrnn_cmd("fit", "--config", str(data / "b4.yaml")), capture_output=True, text=True,
                       timeout=300, env=env, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    (last,) = glob.glob(str(tmp / "checkpoints/**/last.ckpt"), recursive=True)
    return _weights(last)


@pytest.fixture(scope="module")
def two_workers(cluster, tmp_path_factory, data, store_template):
    tmp = tmp_path_factory.mktemp("two")
    seed_store(tmp, store_template)
    # Ray Train's workers are the raylet's children, not the driver's: watch the whole machine
    watch = ListeningSockets(None, every=0.25)
    watch.start()
    try:
        r = _ray_train(cluster, tmp, data, "two")
    finally:
        watch.stop()
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return tmp, _weights(_latest_ray_checkpoint(tmp / "store", "two")), watch.seen, r.stdout


def test_two_workers_train_like_one_process_with_the_global_batch(two_workers, single_process):
    """2 Ray Train workers x 2 streams end with the weights of 1 process x 4 streams (12 AdamW
    updates, TBPTT k1=8 k2=12): DDP averages the ranks' losses, the ranks read disjoint streams."""
    tmp, ray_weights, _, out = two_workers
    for k, ref in single_process.items():
        torch.testing.assert_close(ray_weights[k], ref, rtol=0, atol=1e-5, msg=k)
    ckpt = torch.load(_latest_ray_checkpoint(tmp / "store", "two"), map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12 and ckpt["distrnn"]["world_size"] == 2
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["ray"])
    assert len(runs) == 1 and runs["metrics.train/loss"].notna().all()  # one MLflow run per job (rank 0)
    # a worker flushes subnormal floats as `distrnn fit` does (it builds the same DistrnnCLI)
    assert runs["tags.distrnn.env.cpu_subnormals"][0] == "flushed"
    # the driver ends by naming it and how to open it, as `distrnn fit` does
    assert f"MLflow run {runs.run_id[0]} in experiment 'ray' at sqlite:///{tmp}/mlflow.db" in out, out[-3000:]
    assert f"#/experiments/{runs.experiment_id[0]}/runs/{runs.run_id[0]})" in out, out[-3000:]


def test_ray_train_workers_rendezvous_on_loopback_only(two_workers):
    """Rank 0 of a Ray Train job hosts torch.distributed's store (no authentication); PyTorch binds
    it to every interface. On a cluster whose node is 127.0.0.1 distrnn's backend hosts it on
    127.0.0.1: nothing the job opened listened beyond loopback while it trained."""
    _, _, seen, _ = two_workers
    assert any(name.startswith("ray::") for name in seen.values()), f"no worker socket seen: {seen}"
    assert not beyond_loopback(seen), f"listening beyond loopback: {beyond_loopback(seen)}"


def _assert_zero_checkpoint_of_2_ranks_equals(ckpt: Path, two_workers, stage: int) -> None:
    """A DeepSpeed ZeRO-``stage`` checkpoint directory of 2 ranks at update 12 (both ranks' shards,
    both ranks' carried state) that, converted to one file, holds the weights of the two_workers
    DDP job's last checkpoint (ZeRO updates equal plain ones: 1e-5) and its optimizer state, joined
    from the two shards (what a resume without DeepSpeed reads)."""
    from distrnn.checkpoint_files import convert_deepspeed_checkpoint

    ddp = torch.load(_latest_ray_checkpoint(two_workers[0] / "store", "two"), map_location="cpu", weights_only=True)
    assert ckpt.is_dir() and len(list(ckpt.glob("checkpoint/zero_pp_rank_*_optim_states.pt"))) == 2, sorted(ckpt.rglob("*"))
    # ZeRO-3 partitions the module too: a model-states file per rank
    assert len(list(ckpt.glob("checkpoint/zero_pp_rank_*_model_states.pt"))) == (2 if stage == 3 else 0)
    # (the test's own files: unpickling them is fine here)
    states = torch.load(sorted(ckpt.glob("checkpoint/*model_states.pt"))[0], map_location="cpu", weights_only=False)
    assert states["global_step"] == 12 and states["distrnn"]["world_size"] == 2 and len(states["distrnn"]["ranks"]) == 2
    converted = torch.load(convert_deepspeed_checkpoint(ckpt, ckpt.parent / "converted.pt", trusted=True), weights_only=True)
    assert sorted(converted["state_dict"]) == sorted(ddp["state_dict"])
    for k, ref in ddp["state_dict"].items():
        torch.testing.assert_close(converted["state_dict"][k], ref, rtol=0, atol=1e-5, msg=k)
    mine, theirs = converted["optimizer_states"][0]["state"], ddp["optimizer_states"][0]["state"]
    assert sorted(mine) == sorted(theirs) and len(mine) == len(ddp["state_dict"])
    for i in theirs:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(mine[i][key], theirs[i][key], rtol=1e-4, atol=1e-7, msg=f"{i} {key}")


def test_worker_failure_restores_mid_epoch_from_the_latest_checkpoint_deepspeed(cluster, tmp_path, data, two_workers,
                                                                                single_process):
    """A worker that raises with max_failures=1: Ray restarts the worker group from the latest
    checkpoint, mid-epoch, and the run ends with the uninterrupted run's weights in one MLflow run.
    Run with `--strategy deepspeed_stage_2` (Ray's DeepSpeed strategy, its refusal of a CPU lifted in
    the workers by a test callback, DS_ACCELERATOR=cpu), whose checkpoint is the harder case: a
    directory to which every rank adds its ZeRO shard. Rank 1 fails after update 6; the workers
    restart from update 4's directory; the final weights equal the DDP run's (ZeRO-2 updates equal
    plain ones). Then the update-8 directory, converted to one file with its optimizer state,
    resumes without DeepSpeed on 1 process and ends like the single-process run. (DDP's file
    checkpoints are restored through Ray by the resubmitted job of the Ctrl-C test and by the Tune
    tests, PBT and --resume; a DeepSpeed trial's by the failed-trial test.)"""
    pytest.importorskip("deepspeed")
    marker = tmp_path / "failed-once"
    callbacks = json.dumps([{"class_path": "ds_lightning_check.AllowDeepSpeedOnCPU"},
                            {"class_path": "distrnn.faults.FailAt",
                             "init_args": {"step": 6, "rank": 1, "how": "raise", "marker": str(marker)}}])
    r = _submit(cluster, tmp_path, "python", "jobs/train.py", "--num-workers", "2", "--report-every", "4",
                "--max-failures", "1", "--strategy", "deepspeed_stage_2", "--storage-path", str(tmp_path / "store"),
                "--name", "ds", f"--trainer.callbacks={callbacks}", "--config", str(data / "b2.yaml"),
                env_vars={"PYTHONPATH": str(REPO / "tests"), "DS_ACCELERATOR": "cpu"})
    out = r.stdout + r.stderr
    assert r.returncode == 0 and marker.exists(), out[-5000:]
    assert "resuming from Ray checkpoint" in out and "at step 4 (epoch 0)" in out, out[-5000:]
    # once: Ray Train's print patch made every line a worker prints reach the driver twice
    assert out.count("distrnn: resuming from Ray checkpoint") == 1, out[-5000:]
    final = _latest_ray_checkpoint(tmp_path / "store", "ds")
    _assert_zero_checkpoint_of_2_ranks_equals(final, two_workers, stage=2)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(mlflow.search_runs(experiment_names=["ray"])) == 1
    # Off DeepSpeed and onto 1 process: the update-8 directory, converted with its optimizer state,
    # resumed by `distrnn fit` of 1 process x 4 streams (the same global batches, so --reshard moves
    # both ranks' hidden states exactly) ends at update 12 with the single-process run's weights,
    # in the job's MLflow run
    (at8,) = [c for c in sorted((tmp_path / "store" / "ds").glob("checkpoint_*/checkpoint.ckpt"))
              if torch.load(c / "checkpoint" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["global_step"] == 8]
    r = subprocess.run(distrnn_cmd("convert-checkpoint", str(at8), str(tmp_path / "at8.ckpt"), "--trust_deepspeed_checkpoint", "true"),
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (tmp_path / "resume").mkdir()
    r = subprocess.run(distrnn_cmd("fit", "--config", str(data / "b4.yaml"), "--ckpt_path", str(tmp_path / "at8.ckpt"),
                                   "--reshard", "true"), capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}, cwd=tmp_path / "resume")
    assert r.returncode == 0 and "the same global batches" in r.stderr, r.stderr[-3000:]
    (last,) = (tmp_path / "resume").rglob("last.ckpt")
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 12
    for k, ref in single_process.items():
        torch.testing.assert_close(resumed["state_dict"][k], ref, rtol=0, atol=1e-5, msg=k)
    assert len(mlflow.search_runs(experiment_names=["ray"])) == 1


def _submit(cluster, tmp, *entrypoint, submission_id=None, env_vars=None, extra_env=None, timeout=500):
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", **(env_vars or {})}})
    cmd = [RAY, "job", "submit", "--address", cluster["RAY_API_SERVER_ADDRESS"], "--working-dir", str(REPO),
           "--runtime-env-json", runtime_env, *(["--submission-id", submission_id] if submission_id else []),
           "--", *entrypoint]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(cluster, tmp, **(extra_env or {})))


def _jobs(cluster):
    """submission id -> status, from the job REST API with the cluster's token (what
    JobSubmissionClient.list_jobs asks, without a ~3 s process importing Ray)."""
    token = Path(cluster["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    req = urllib.request.Request(f"{cluster['RAY_API_SERVER_ADDRESS']}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return {j["submission_id"]: j["status"] for j in json.load(r) if j.get("submission_id")}


def test_ctrl_c_to_a_ray_train_driver_kills_its_run_and_exits_130(cluster, tmp_path, data):
    """Ctrl-C to `jobs/train.py` once the job has reported a checkpoint: Ray Train aborts the run
    and kills the workers, which never finalize their MLflow run; the driver marks it KILLED
    (it stayed RUNNING) and exits 130 (it exited 1), saying how to continue. The same command on
    2 workers with --reshard true continues it."""
    import signal
    import time

    cmd = [PY, str(REPO / "jobs/train.py"), "--num-workers", "1", "--report-every", "4", "--storage-path",
           str(tmp_path / "store"), "--name", "stopped", "--config", str(data / "b2.yaml"), "--trainer.max_steps", "100000"]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cluster, tmp_path), cwd=tmp_path)
    deadline = time.time() + 200
    # a checkpoint that Ray has registered (a resubmitted job restores from what the snapshot lists)
    snapshot = tmp_path / "store/stopped/checkpoint_manager_snapshot.json"
    while not (snapshot.is_file() and '"checkpoint_dir_name"' in snapshot.read_text()):
        assert driver.poll() is None and time.time() < deadline, driver.communicate()[1][-3000:]
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 130 and "interrupted" in err and "marked KILLED" in err, (out + err)[-3000:]
    (run,) = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()])
    assert run.info.status == "KILLED" and run.data.tags.get("distrnn.ray_job")

    # resubmitted under the same name on 2 workers: the run goes on from its latest checkpoint,
    # resharded (1 x 2 streams -> 2 x 2: the same fraction of the epoch), in the same MLflow run
    # (Ray restores its latest registered checkpoint, which may be older than the newest folder)
    cmd[cmd.index("--num-workers") + 1] = "2"
    r = subprocess.run([*cmd, "--trainer.max_steps", "24", "--reshard", "true"], capture_output=True, text=True,
                       timeout=300, env=_env(cluster, tmp_path), cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    step = int(re.search(r"resuming from Ray checkpoint \S+ at step (\d+) \(epoch 0\)", r.stdout + r.stderr).group(1))
    after = torch.load(_latest_ray_checkpoint(tmp_path / "store", "stopped"), map_location="cpu", weights_only=True)
    now = after["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert after["global_step"] == 24 and after["distrnn"]["world_size"] == 2 and now["epoch"] == 0
    # 2 updates a batch; 1 worker read batch step / 2 of its 2 streams' 179, each of 2 workers has 90
    assert now["num_batches"] == 90
    index = max((step // 2) * 90 // 179, 1)
    assert f"-> 2 x 2: epoch 0 goes on at batch {index} of 90 per rank (was {step // 2} of 179)" in r.stdout + r.stderr
    assert now["next_index"] == index + (24 - step) // 2
    (again,) = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"


def test_sweep_through_ray_job_submit(cluster, tmp_path, data, capsys):
    """4 trials, 2 at a time, ASHA: the job succeeds, every trial ran and has a nested MLflow run
    under the sweep's parent with its metrics, ASHA stopped at least one early, the best is logged.
    The grid runs two good learning rates first, so the two hopeless ones fall below ASHA's first rung.
    keep_checkpoints 1: each trial keeps its best and its latest of up to 4 report checkpoints; the
    parent names the best trial's run and the checkpoint of its best report, which `distrnn validate`
    takes: it scores the best value again, in a run nested under the best trial's."""
    space = json.dumps({"model.optimizer.lr": {"grid": [0.03, 0.02, 1e-6, 1e-7]}, "model.network.hidden_size": {"choice": [16, 32]}})
    # checkpoints under tmp_path, not the checkout (the driver runs in REPO for the sweep's relative config)
    overrides = json.dumps({"data.init_args.path": str(data / "corpus.txt"), "trainer.max_steps": 48,
                            "trainer.logger.init_args.checkpoint_dir": str(tmp_path / "checkpoints"),
                            "trainer.val_check_interval": 6, "trainer.limit_val_batches": 2})
    r = _submit(cluster, tmp_path, "python", "jobs/tune.py", "--config", "jobs/configs/sweep_tiny.yaml",
                "--storage_path", str(tmp_path / "store"), f"--overrides={overrides}", f"--search_space={space}", "--num_samples", "1",
                "--keep_checkpoints", "1", "--scheduler", json.dumps({"name": "asha", "max_t": 4, "grace_period": 1, "reduction_factor": 2}))
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "succeeded" in out, out[-4000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["sweep-tiny"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    trials = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(parents) == 1 and len(trials) == 4
    parent = parents.iloc[0]
    assert (trials["tags.mlflow.parentRunId"] == parent["run_id"]).all()
    assert trials["metrics.val/loss"].notna().all()
    assert "tags.distrnn.stopped_early" in trials, runs.to_string()
    stopped = trials[trials["tags.distrnn.stopped_early"] == "true"]
    assert len(stopped) >= 1 and (stopped["status"] == "KILLED").all(), runs.to_string()
    lrs = set(stopped["params.model.optimizer.lr"].astype(float))
    assert {1e-6, 1e-7} <= lrs and 0.03 not in lrs  # the hopeless stopped, the best ran to the end
    ran = trials[trials["tags.distrnn.stopped_early"] != "true"]
    assert (ran["status"] == "FINISHED").all(), runs.to_string()  # though Tune stopped it at max_t
    client = mlflow.MlflowClient()
    history = {t: [m.value for m in client.get_metric_history(t, "val/loss")] for t in trials["run_id"]}
    best_run = min(history, key=lambda t: min(history[t]))
    assert parent["metrics.best_val_loss"] == pytest.approx(min(history[best_run]), rel=1e-6)
    assert parent["tags.best.run_id"] == best_run and parent["status"] == "FINISHED"
    assert f"#/experiments/{parent['experiment_id']}/runs/{parent['run_id']})" in out, out[-3000:]  # how to open it
    import distrnn  # the code: a bare `ray job submit` uploads no .git, so no commit: the version

    assert (runs["tags.distrnn.version"] == distrnn.__version__).all()
    # the best report's checkpoint, as Tune recorded that report; no trial keeps more than 2
    ckpt = Path(parent["tags.best.checkpoint"])
    assert ckpt.name == "checkpoint.ckpt" and ckpt.is_file(), parent["tags.best.checkpoint"]
    reports = [json.loads(ln) for ln in (ckpt.parent.parent / "result.json").read_text().splitlines()]
    (report,) = [x for x in reports if x.get("checkpoint_dir_name") == ckpt.parent.name]
    assert report["val_loss"] == pytest.approx(min(history[best_run]), rel=1e-6) and report["trial_id"] == \
        trials.set_index("run_id").loc[best_run, "tags.distrnn.trial_id"]
    kept = [(len((d / "result.json").read_text().splitlines()), len(list(d.glob("checkpoint_*"))))
            for d in (tmp_path / "store").glob("*/run_trial_*")]  # (reports, checkpoints kept) per trial
    assert len(kept) == 4 and max(r for r, _ in kept) >= 3 and max(c for _, c in kept) <= 2, kept
    code, _, err = cli(capsys, "validate", "--config", str(REPO / "jobs/configs/tiny.yaml"), "--ckpt_path", str(ckpt),
                       "--data.init_args.path", str(data / "corpus.txt"), "--trainer.limit_val_batches", "2")
    assert code == 0, err[-3000:]
    (evaluation,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                       f"tags.`mlflow.parentRunId` = '{best_run}'")
    assert evaluation.data.metrics["val/loss"] == pytest.approx(min(history[best_run]), rel=1e-5)
    # artifacts beside the store, not in the job's unpacked package in Ray's temporary folder
    assert client.get_experiment_by_name("sweep-tiny").artifact_location == str(tmp_path / "mlruns")
    assert (tmp_path / "mlruns" / parent["run_id"] / "artifacts" / "best_config.json").is_file()
    assert all((tmp_path / "mlruns" / t / "artifacts" / "config.yaml").is_file() for t in trials["run_id"])
    # the best trial's config as a command: distrnn builds the best trial's model from it
    client.download_artifacts(parent["run_id"], "best_command.txt", str(tmp_path))
    command = shlex.split((tmp_path / "best_command.txt").read_text())
    assert command[:2] == ["distrnn", "fit"] and f"distrnn: its config: {shlex.join(command)}" in out
    best_lr, best_h = float(parent["params.best.model.optimizer.lr"]), int(parent["params.best.model.network.hidden_size"])
    with pytest.MonkeyPatch.context() as m:
        m.chdir(REPO)  # the job's working directory: the sweep names its configs from there
        code, printed, err = cli(capsys, *command[1:], "--print_config")
    assert code == 0, err[-2000:]
    resolved = yaml.safe_load(printed)
    assert resolved["model"]["optimizer"]["lr"] == best_lr and resolved["model"]["network"]["hidden_size"] == best_h
    assert resolved["trainer"]["max_steps"] == 48 and resolved["data"]["init_args"]["path"] == str(data / "corpus.txt")
    assert "distrnn runs compare --experiment sweep-tiny --sweep sweep-tiny --sort val/loss" in out
    # `distrnn runs compare`: the sweep is one line naming its best trial, its 4 trials the rows
    code, out, err = cli(capsys, "runs", "compare", "--experiment", "sweep-tiny", "--sweep", "sweep-tiny")
    assert code == 0, err
    names = trials.set_index("run_id")["tags.mlflow.runName"]
    assert out.startswith("sweep 'sweep-tiny'") and "4 trials; best_val_loss " in out and f" in {names[best_run]} with " in out
    rows = {ln.split()[0]: ln.split()[1] for ln in out.splitlines()[3:]}
    assert rows == {names[t]: "STOPPED_EARLY" if t in set(stopped["run_id"]) else "FINISHED" for t in trials["run_id"]}, out


def test_every_ray_server_listens_on_loopback_only(cluster):
    """After jobs and a sweep ran (their idle workers are still up): every socket the cluster
    opened for listening (GCS, raylet, object manager, agents, dashboard, client server, workers)
    is bound to 127.0.0.1. Ray on Linux would otherwise put most of them on the machine's
    outward address or on every interface, even with --node-ip-address 127.0.0.1."""
    opened = {k: v for k, v in listening_sockets().items() if k not in cluster["listening_before"]}
    gcs_port = int(cluster["RAY_ADDRESS"].rsplit(":", 1)[1])
    assert any(port == gcs_port for _, port in opened), opened
    assert len(opened) >= 5, opened
    exposed = beyond_loopback(opened)
    assert not exposed, f"listening beyond loopback: {exposed}"


LOCAL_DRIVER = """
import json, os, sys
from distrnn.raytrain import init_ray, keep_a_local_ray_on_loopback
keep_a_local_ray_on_loopback()  # what jobs/train.py and jobs/tune.py do first
init_ray({"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]})
import psutil, ray
assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker is up too
me = psutil.Process()
found = {}
for p in [me, *me.children(recursive=True)]:
    try:
        found.update({f"{c.laddr.ip}:{c.laddr.port}": p.name() for c in p.net_connections("tcp") if c.status == "LISTEN"})
    except psutil.Error:
        pass
print("LISTENING " + json.dumps(found), flush=True)
# a worker group this Ray has no room for: Ray Train would wait for it without end
from distrnn.raytrain import main
from distrnn.tune import main as tune_main
cpus = int(ray.cluster_resources()["CPU"])
try:
    main(["--num-workers", str(cpus + 1), "--config", sys.argv[1]])
except SystemExit as e:
    print("EXIT", e.code, flush=True)
for workers in (1, 2):  # a trial of one process, and a group of ranks through Ray Train
    try:
        tune_main(["--config", sys.argv[2], "--workers_per_trial", str(workers), "--cpus_per_trial", str(cpus + 2)])
    except SystemExit as e:
        print("EXIT", e.code, flush=True)
ray.shutdown()
"""


def test_a_driver_without_a_cluster_starts_ray_on_loopback_only(tmp_path):
    """`python jobs/train.py` without RAY_ADDRESS starts a Ray of its own: every server of it
    (GCS, raylet, dashboard, agents, the worker) listens on 127.0.0.1. With Ray's defaults on Linux
    most would listen on the machine's outward address or every interface, without authentication.
    A job asking it for more workers than it has CPUs is refused in one line (Ray Train waited for
    them without end)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", RAY_USAGE_STATS_ENABLED="0")
    write_corpus(tmp_path / "corpus.txt", 8000)
    (tmp_path / "sweep.yaml").write_text(f"config: [{REPO / 'jobs/configs/tiny.yaml'}]\n"
                                         "search_space: {model.optimizer.lr: {choice: [0.01]}}\n")
    r = subprocess.run([PY, "-c", LOCAL_DRIVER, str(REPO / "jobs/configs/tiny.yaml"), str(tmp_path / "sweep.yaml")],
                       capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("LISTENING ")), None)
    assert r.returncode == 0 and line, (r.stdout + r.stderr)[-3000:]
    listening = json.loads(line.removeprefix("LISTENING "))
    assert "gcs_server" in listening.values() and "raylet" in listening.values(), listening
    exposed = beyond_loopback({(a.rsplit(":", 1)[0].removeprefix("::ffff:"), int(a.rsplit(":", 1)[1])): n
                               for a, n in listening.items()})
    assert not exposed, f"listening beyond loopback: {exposed}"
    m = re.search(r"distrnn: error: num_workers: (\d+) workers x 1 CPU need \1 CPU \(each worker's on one node\); this Ray"
                  r" cluster has (\d+) CPU: lower --num-workers", r.stderr)
    assert "EXIT 2" in r.stdout and m and int(m[1]) == int(m[2]) + 1, r.stderr[-2000:]
    cpus = int(m[2])
    assert r.stdout.count("EXIT 2") == 3 and (
        f"distrnn: error: cpus_per_trial: 1 workers x {cpus + 2} CPU need {cpus + 2} CPU (each worker's on one node); this"
        f" Ray cluster has {cpus} CPU: lower workers_per_trial, cpus_per_trial or gpus_per_trial") in r.stderr, r.stderr[-2000:]
    assert f"distrnn: error: workers_per_trial: 2 workers x {(cpus + 2) / 2:g} CPU need {cpus + 2} CPU" in r.stderr
    assert mlflow.search_runs(search_all_experiments=True).empty  # no sweep run either


def test_requests_without_the_token_are_refused(cluster, tmp_path):
    """Token authentication: submitting or deleting a job without the token is refused and changes
    nothing; with the token both work."""
    (tmp_path / "hi.py").write_text("print('hello from a job')\n")
    env = _env(cluster, tmp_path)
    for k in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(k)
    env.update(HOME=str(tmp_path))
    before = _jobs(cluster)
    cmd = [RAY, "job", "submit", "--address", cluster["RAY_API_SERVER_ADDRESS"], "--working-dir", str(tmp_path),
           "--submission-id", "intruder", "--", "python", "hi.py"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode != 0 and "Unauthorized" in refused.stdout + refused.stderr
    assert _jobs(cluster) == before
    ok = subprocess.run(cmd[:-5] + ["--submission-id", "friend", "--", "python", "hi.py"], capture_output=True,
                        text=True, timeout=120, env=_env(cluster, tmp_path))
    assert ok.returncode == 0 and "hello from a job" in ok.stdout, ok.stdout + ok.stderr
    delete = [RAY, "job", "delete", "--address", cluster["RAY_API_SERVER_ADDRESS"], "friend"]
    refused = subprocess.run(delete, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode != 0 and "friend" in _jobs(cluster)
    done = subprocess.run(delete, capture_output=True, text=True, timeout=120, env=_env(cluster, tmp_path))
    assert done.returncode == 0 and "friend" not in _jobs(cluster)


def test_cluster_script_refuses_an_open_dashboard_without_authentication(tmp_path):
    r = subprocess.run([PY, str(REPO / "cluster/local_cluster.py"), "up", "--state-dir", str(tmp_path / "s"),
                        "--no-auth", "--dashboard-host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not a loopback address and authentication is off" in r.stderr
    assert not (tmp_path / "s" / "cluster.json").exists()


def test_cluster_down_of_an_old_state_file_stops_nothing_and_says_how(tmp_path):
    """A state file of an older distrnn names no folder of its cluster: `down` ran `ray stop --force`
    (every Ray of this user here, the module's cluster too); now it stops nothing and says what to do."""
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "cluster.json").write_text(json.dumps({"RAY_ADDRESS": "127.0.0.1:6390"}))
    r = subprocess.run([PY, str(REPO / "cluster/local_cluster.py"), "down", "--state-dir", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("local_cluster: error:") and "`ray stop`" in r.stderr
    assert (tmp_path / "s" / "cluster.json").exists()


def test_cluster_down_stops_its_own_cluster_and_no_other(cluster, tmp_path, monkeypatch):
    """`make cluster-down` ran `ray stop --force`, which kills every Ray on the machine (here: the
    module's cluster; elsewhere a user's other cluster or a local driver's Ray): a second cluster
    brought up and down leaves no process of its own and the first one answering."""
    monkeypatch.syspath_prepend(str(REPO / "cluster"))
    from local_cluster import cluster_processes

    state = tmp_path / "second"
    up = subprocess.run([PY, str(REPO / "cluster/local_cluster.py"), "up", "--state-dir", str(state), "--num-cpus", "1"],
                        capture_output=True, text=True, timeout=180)
    info = json.loads((state / "cluster.json").read_text()) if up.returncode == 0 else {}
    try:
        assert up.returncode == 0, up.stderr
        mine = cluster_processes(info["DISTRNN_RAY_TEMP_DIR"], info["RAY_ADDRESS"])
        theirs = cluster_processes(cluster["DISTRNN_RAY_TEMP_DIR"], cluster["RAY_ADDRESS"])
        assert {"gcs_server", "raylet"} <= {p.name() for p in mine} and not {p.pid for p in mine} & {p.pid for p in theirs}
    finally:
        subprocess.run([PY, str(REPO / "cluster/local_cluster.py"), "down", "--state-dir", str(state)], timeout=180)
    assert not [p for p in mine if p.is_running()]
    assert all(p.is_running() for p in theirs) and _jobs(cluster) is not None
    assert not (state / "cluster.json").exists() and not Path(info["DISTRNN_RAY_TEMP_DIR"]).exists()


def test_make_submit_train_with_a_bad_config_creates_no_job_and_no_run(cluster, tmp_path, data):
    """`make submit-train` checks the config on the submitting machine first: a TBPTT length of 0
    stops it there, with the key named, before `ray job submit` runs; the cluster's job list and
    the MLflow store are unchanged."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.format(exp="bad", corpus=data, batch=4).replace("k1: 8", "k1: 0"))
    before = _jobs(cluster)
    venv = Path(PY).parent.parent
    r = subprocess.run(["make", "-C", str(REPO), "-o", f"{venv}/.installed", "submit-train", f"VENV={venv}",
                        f"CONFIG={bad}", f"RAY_STATE={cluster['state_dir']}"],
                       capture_output=True, text=True, timeout=300, env=_env(cluster, tmp_path))
    assert r.returncode != 0 and "model.tbptt.k1" in r.stderr, (r.stdout + r.stderr)[-3000:]
    assert "ray job submit" not in r.stdout.split("--check-only", 1)[1]  # make never ran the submit line
    assert _jobs(cluster) == before
    db = tmp_path / "mlflow.db"
    assert not db.exists() or not mlflow.MlflowClient(f"sqlite:///{db}").search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()])


def test_make_submit_hands_the_job_its_environment_whatever_characters_it_holds(tmp_path):
    """The store path and git branch go into the job's --runtime-env-json through the shell: a
    quote, a dollar sign or a space in them reach the job unchanged (`make -n`: nothing runs)."""
    store = f"sqlite:///{tmp_path}/it's $HOME & co/mlflow.db"
    venv = Path(PY).parent.parent
    for target in ("submit-train", "submit-tune"):
        r = subprocess.run(["make", "-n", "-C", str(REPO), "-o", f"{venv}/.installed", target, f"VENV={venv}",
                            f"RAY_STATE={tmp_path}"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "MLFLOW_TRACKING_URI": store})
        assert r.returncode == 0, r.stderr
        (line,) = [ln for ln in r.stdout.replace("\\\n", " ").splitlines() if "ray job submit" in ln]
        words = shlex.split(line)
        env = json.loads(words[words.index("--runtime-env-json") + 1])["env_vars"]
        assert env["MLFLOW_TRACKING_URI"] == store, line


def test_make_submit_train_logs_into_the_store_of_the_submitting_shell_and_a_failing_job_fails(cluster, tmp_path, data):
    """`make submit-train` hands the job the store that `make train` and `make mlflow-ui` use
    (MLFLOW_TRACKING_URI, else mlflow.db in the checkout), made absolute: the job ran without it,
    and logged into mlflow.db in its unpacked package in Ray's temporary folder, which no UI showed
    and the cluster's end removed. TRAIN_ARGS come after the config, so overrides there win. The job
    (one worker, no retries) raises at update 2: it fails with the error in its logs, and its run FAILED."""
    fault = json.dumps([{"class_path": "distrnn.faults.FailAt", "init_args": {"step": 2, "rank": 0, "how": "raise"}}])
    venv = Path(PY).parent.parent
    before = _jobs(cluster)
    r = subprocess.run(["make", "-C", str(REPO), "-o", f"{venv}/.installed", "submit-train", f"VENV={venv}",
                        f"CONFIG={data / 'b2.yaml'}", "WORKERS=1", f"RAY_STATE={cluster['state_dir']}",
                        f"TRAIN_ARGS=--storage-path {tmp_path / 'store'} --name make-job --max-failures 0"
                        f" --trainer.max_steps 4 --trainer.callbacks='{fault}'"],
                       capture_output=True, text=True, timeout=400, env=_env(cluster, tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "injected fault: rank 0 at step 2" in out, out[-6000:]
    (job,) = set(_jobs(cluster)) - set(before)
    assert _jobs(cluster)[job] == "FAILED"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("ray").experiment_id])
    assert run.info.status == "FAILED" and run.data.params["trainer.max_steps"] == "4"
    assert (tmp_path / "mlruns" / run.info.run_id / "artifacts" / "config.yaml").is_file()
    if (REPO / ".git").exists():  # Ray uploaded the checkout without its .git: the commit came from here
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        assert run.data.tags["mlflow.source.git.commit"] == head.stdout.strip(), run.data.tags


def test_pbt_sweep_restarts_each_trial_exactly(cluster, tmp_path, data, single_process):
    """Two trials of the single_process config (validating every 2 batches: reports at updates 4, 8, 12).
    Synchronous PBT stops the trials at a report and restarts the worse from the better one's checkpoint
    (the better, as a rule, from its own); explore draws the lr anew from a space of one value, so every
    trial follows one trajectory, whatever PBT's schedule. Each report reaches Tune with a checkpoint and
    each restart goes through it: every trial ends with exactly the uninterrupted run's weights. One MLflow
    run per trial under the sweep's parent (not the donor's run, which the checkpoint names). (Trials of
    several ranks restart through the same Tune checkpoints: the failed-trial test above.)"""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({
        "config": [str(data / "b4.yaml")], "overrides": {"trainer.val_check_interval": 2},
        "search_space": {"model.optimizer.lr": {"choice": [0.01]}},
        "num_samples": 2, "cpus_per_trial": 1, "max_concurrent_trials": 2,
        "scheduler": {"name": "pbt", "perturbation_interval": 2, "synch": True, "resample_probability": 1.0},
        "name": "pbt", "experiment_name": "sweep-pbt", "storage_path": str(tmp_path / "store")}))
    r = subprocess.run([PY, str(REPO / "jobs/tune.py"), "--config", str(sweep)], capture_output=True, text=True,
                       timeout=400, env=_env(cluster, tmp_path), cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    # Tune's record of every exploit: [target, donor, their iterations, donor's config, new config]
    policy = [json.loads(ln) for ln in (tmp_path / "store/pbt/pbt_global.txt").read_text().splitlines()]
    assert policy and all(p[5] == {"model.optimizer.lr": 0.01} for p in policy), policy
    resumed = re.findall(r"distrnn: resuming from Ray checkpoint \S+ at step (\d+)", out)
    assert resumed and set(resumed) <= {"4", "8", "12"}, out[-3000:]
    trial_dirs = [d for d in (tmp_path / "store/pbt").iterdir() if (d / "params.json").is_file()]
    assert len(trial_dirs) == 2, trial_dirs
    for d in trial_dirs:
        last = torch.load(sorted(d.glob("checkpoint_*/checkpoint.ckpt"))[-1], map_location="cpu", weights_only=True)
        assert last["global_step"] == 12 and last["distrnn"]["world_size"] == 1
        for k, ref in single_process.items():
            torch.testing.assert_close(last["state_dict"][k], ref, rtol=0, atol=1e-6, msg=f"{d.name}: {k}")

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("sweep-pbt")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    trials = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
    assert len(trials) == 2 and len({t.data.tags["distrnn.trial_id"] for t in trials}) == 2
    for t in trials:
        assert t.data.tags["mlflow.parentRunId"] == parent.info.run_id
        # logged against updates (2 a batch), in each trial's own run: the last of its 12 updates
        assert max(m.step for m in client.get_metric_history(t.info.run_id, "train/loss")) == 11


def test_a_failed_deepspeed_trial_of_two_ranks_restarts_from_its_checkpoint_and_ends_like_an_uninterrupted_run(
        cluster, tmp_path, data, two_workers):
    """max_failures 1, workers_per_trial 2, strategy deepspeed_stage_3, through `ray job submit`:
    the one trial, a Ray Train run of 2 workers under Ray's DeepSpeed strategy (its refusal of a CPU
    lifted in the workers by a test callback, DS_ACCELERATOR=cpu) with the two_workers job's config,
    loses rank 1 after update 8. Its last report, at update 6, holds a checkpoint directory to which
    both ranks added their ZeRO-3 shards (optimizer and module); Tune restarts the trial, whose new
    workers start from that directory, in the same MLflow run, and it ends with the weights and
    Adam moments of the uninterrupted 2-worker DDP job (ZeRO-3 updates equal plain ones: 1e-5).
    (ZeRO-2 through Ray: the job-level failure test.)"""
    pytest.importorskip("deepspeed")
    callbacks = [{"class_path": "ds_lightning_check.AllowDeepSpeedOnCPU"},
                 {"class_path": "distrnn.faults.FailAt",
                  "init_args": {"step": 8, "rank": 1, "how": "raise", "marker": str(tmp_path / "failed")}}]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({
        "config": [str(data / "b2.yaml")], "overrides": {"trainer.callbacks": callbacks},
        "search_space": {"model.optimizer.lr": {"choice": [0.01]}}, "num_samples": 1, "max_failures": 1,
        "workers_per_trial": 2, "cpus_per_trial": 2, "strategy": "deepspeed_stage_3", "scheduler": {"name": "fifo"},
        "name": "retried", "experiment_name": "sweep-retried", "storage_path": str(tmp_path / "store")}))
    r = _submit(cluster, tmp_path, "python", "jobs/tune.py", "--config", str(sweep),
                env_vars={"PYTHONPATH": str(REPO / "tests"), "DS_ACCELERATOR": "cpu"})
    out = r.stdout + r.stderr
    assert r.returncode == 0 and (tmp_path / "failed").is_file(), out[-4000:]
    assert "injected fault: rank 1 at step 8" in out and re.search(r"resuming from Ray checkpoint \S+ at step 6\b", out), out[-4000:]
    (trial_dir,) = [d for d in (tmp_path / "store/retried").iterdir() if (d / "params.json").is_file()]
    last = sorted(trial_dir.glob("checkpoint_*/checkpoint.ckpt"))[-1]
    _assert_zero_checkpoint_of_2_ranks_equals(last, two_workers, stage=3)
    assert not (tmp_path / "store/retried/train-runs").exists()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sweep-retried").experiment_id])
    trials = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
    assert [t.info.status for t in trials] == ["FINISHED"], [(t.info.run_name, t.info.status) for t in runs]


def test_interrupted_sweep_resumes_where_it_stopped(cluster, tmp_path, data):
    """Ctrl-C (SIGINT) to the sweep's driver after every trial has checkpointed: exit 130, the
    parent run KILLED, no trial marked stopped early. The same command with --resume continues
    each trial from its latest checkpoint (not from step 0) in its own MLflow run under the same
    parent; the sweep then finishes with every trial run to max_steps. The values come from
    Optuna (search: optuna), whose study, restored with the sweep, ends with each trial's values
    and its final val/loss as the score."""
    import signal
    import time

    # Each trial holds at update 90 (batch 45, after its second report at batch 40) until the
    # file `release` exists: neither can finish before the signal, however slowly the other's
    # worker starts (with a long run instead, one trial finished first now and then).
    release = tmp_path / "release"
    hold = {"class_path": "distrnn.faults.HoldAt", "init_args": {"step": 90, "until": str(release)}}
    overrides = json.dumps({"data.init_args.path": str(data / "corpus.txt"), "trainer.max_steps": 200,
                            "trainer.logger.init_args.checkpoint_dir": str(tmp_path / "checkpoints"),
                            "trainer.val_check_interval": 20, "trainer.limit_val_batches": 2,
                            "trainer.callbacks": [hold]})
    cmd = [PY, str(REPO / "jobs/tune.py"), "--config", str(REPO / "jobs/configs/sweep_tiny.yaml"), "--storage_path",
           str(tmp_path / "store"), f"--overrides={overrides}", "--num_samples", "2", "--name", "resumable",
           "--scheduler", json.dumps({"name": "fifo"}), "--search", "optuna"]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cluster, tmp_path), cwd=REPO)
    deadline = time.time() + 300
    while len(glob.glob(str(tmp_path / "store/resumable/run_trial_*/checkpoint_000001"))) < 2:
        assert driver.poll() is None and time.time() < deadline, driver.communicate()[1][-3000:]
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=240)
    assert driver.returncode == 130 and "interrupted" in err and "--resume" in err, (out + err)[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("sweep-tiny")
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED"
    trials = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert [t.info.status for t in trials] == ["KILLED", "KILLED"]  # none left RUNNING
    steps_before = {r.data.tags["distrnn.trial_id"]: max(m.step for m in client.get_metric_history(r.info.run_id, "val/loss"))
                    for r in trials}
    assert len(steps_before) == 2 and all(s < 90 for s in steps_before.values()), steps_before  # held

    release.touch()
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=400, env=_env(cluster, tmp_path), cwd=REPO)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    resumed_at = [int(s) for s in __import__("re").findall(r"resuming from Ray checkpoint \S+ at step (\d+)", r.stdout + r.stderr)]
    assert len(set(resumed_at)) >= 1 and min(resumed_at) > 0, (r.stdout + r.stderr)[-3000:]
    runs = client.search_runs([exp.experiment_id])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    trials = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
    assert [p.info.run_id for p in parents] == [parent.info.run_id] and parents[0].info.status == "FINISHED"
    assert sorted(t.data.tags["distrnn.trial_id"] for t in trials) == sorted(steps_before)  # one run per trial
    for t in trials:
        assert t.data.tags.get("distrnn.stopped_early") is None and t.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(t.info.run_id, "val/loss")]
        # (tiny.yaml makes two updates per batch; val/loss is logged against updates)
        assert max(steps) > steps_before[t.data.tags["distrnn.trial_id"]] and max(steps) >= 171
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch()
    searcher.restore_from_dir(str(tmp_path / "store/resumable"))
    studied = sorted(((t.state.name, t.value, t.params["model.optimizer.lr"], t.params["model.network.hidden_size"])
                      for t in searcher._ot_study.trials), key=lambda x: x[2])
    last = {t.info.run_id: max(client.get_metric_history(t.info.run_id, "val/loss"), key=lambda m: (m.step, m.timestamp)).value
            for t in trials}
    logged = sorted((("COMPLETE", last[t.info.run_id], float(t.data.params["model.optimizer.lr"]),
                      int(t.data.params["model.network.hidden_size"])) for t in trials), key=lambda x: x[2])
    assert [x[0] for x in studied] == ["COMPLETE", "COMPLETE"], studied
    for got, want in zip(studied, logged):
        assert got[1:] == pytest.approx(want[1:], rel=1e-6), (studied, logged)
