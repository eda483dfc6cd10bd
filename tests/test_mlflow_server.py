"""A real MLflow tracking server, started on 127.0.0.1 by the test and always stopped: the
cluster's `cluster/mlflow-server.sh` (basic-auth, a Host allow-list) on a SQLite store, to which a
distrnn run logs with credentials, and a plain server without authentication, whose openings
`cluster/mlflow_check.py` finds."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import MLFLOW_ADMIN_PASSWORD, REPO, cli, distrnn_cmd, free_port, mlflow_server, write_corpus

pytestmark = pytest.mark.slow

OLD_DEFAULT = "password1234"  # what older MLflow versions shipped; servers set up then may still have it


def _post(url, body, auth):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PATCH" if "update" in url else "POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()})
    # 60 s: the server's first request (a user created, its password hashed) took over 10 s once in
    # CI, beside a DeepSpeed Ray trial on the other core
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status


def _check(uri, user=None):
    env = {**os.environ}
    if user:
        env.update(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])
    return subprocess.run([sys.executable, str(REPO / "cluster/mlflow_check.py"), uri], capture_output=True, text=True,
                          timeout=60, env=env)


def test_deployment_check_fails_an_open_server(tmp_path, store_template):
    """The negative control: a server started without authentication answers anyone, and with
    any password, so the check fails and says why."""
    with mlflow_server(tmp_path, auth=False, template=store_template) as uri:
        r = _check(uri)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "without credentials" in r.stderr and "default admin password" in r.stderr


def test_server_script_refuses_to_bind_to_every_interface_and_names_what_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    given = {"MLFLOW_BACKEND_URI": f"sqlite:///{tmp_path}/x.db", "MLFLOW_ARTIFACTS_URI": str(tmp_path / "artifacts"),
             "MLFLOW_ALLOWED_HOSTS": "mlflow.internal:5000"}
    script = ["bash", str(REPO / "cluster/mlflow-server.sh")]
    r = subprocess.run(script, env={**env, **given, "MLFLOW_HOST": "0.0.0.0"}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.strip() == (
        "mlflow-server: refusing to bind to all interfaces; give MLFLOW_HOST a private address"), r.stderr
    r = subprocess.run(script, env={**env, **given}, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "MLFLOW_HOST: a private address to bind to" in r.stderr, r.stderr
    assert not list(tmp_path.glob("x.db*")) and not (tmp_path / "artifacts").exists()


def test_hardened_server_refuses_what_it_must(tmp_path, capsys, monkeypatch, store_template):
    """`cluster/mlflow-server.sh` on a SQLite store."""
    with mlflow_server(tmp_path, auth=True, template=store_template) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for the fit run in this process
        _hardened(uri, tmp_path, capsys)


def _hardened(auth_server, tmp_path, capsys):
    trainer = ("trainer", "another-long-random-password")
    assert _post(f"{auth_server}/api/2.0/mlflow/users/create", {"username": trainer[0], "password": trainer[1]},
                 ("admin", MLFLOW_ADMIN_PASSWORD)) == 200
    # no credentials, the old default admin password, a foreign Host, path traversal: all refused
    r = _check(auth_server, trainer)
    assert r.returncode == 0, r.stderr

    # A distrnn run logs to it with the job's credentials (and only with them).
    write_corpus(tmp_path / "corpus.txt", 6000)
    cfg = tmp_path / "job.yaml"
    cfg.write_text((REPO / "jobs/configs/tiny.yaml").read_text())
    env = {**os.environ, "MLFLOW_TRACKING_URI": auth_server, "MLFLOW_TRACKING_USERNAME": trainer[0],
           "MLFLOW_TRACKING_PASSWORD": trainer[1]}
    run = subprocess.run(distrnn_cmd("fit", "--config", str(cfg), "--trainer.max_steps", "6", "--trainer.val_check_interval", "3"),
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    import mlflow

    os.environ.update(MLFLOW_TRACKING_USERNAME=trainer[0], MLFLOW_TRACKING_PASSWORD=trainer[1])
    try:
        mlflow.set_tracking_uri(auth_server)
        runs = mlflow.search_runs(experiment_names=["tiny"])
        assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED" and runs.iloc[0]["metrics.val/loss"] > 0
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME"), os.environ.pop("MLFLOW_TRACKING_PASSWORD")
    # without credentials, in this process (a new one would spend ~10 s importing)
    code, _, err = cli(capsys, "fit", "--config", str(cfg), "--trainer.max_steps", "2")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"distrnn: error: MLFLOW_TRACKING_URI: the MLflow store {auth_server} cannot be used: 401"), err[-2000:]


def test_a_tracking_server_that_does_not_answer_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    """Lightning asked the store first inside fit: a traceback of MLflow's retries."""
    write_corpus(tmp_path / "corpus.txt", 2000)
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for command in ("fit", "validate"):
        code, _, err = cli(capsys, command, "--config", str(REPO / "jobs/configs/tiny.yaml"))
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1] == f"distrnn: error: MLFLOW_TRACKING_URI: the MLflow store {uri} cannot be used: Connection refused"
    assert not (tmp_path / "checkpoints").exists()


def test_training_goes_on_when_the_tracking_server_dies(tmp_path, store_template):
    """The server is killed mid-training: the job still finishes (exit 0, in bounded time), says
    so once, and every logging step after the failure is in the local JSONL file, none dropped."""
    import mlflow

    write_corpus(tmp_path / "corpus.txt", 20000)
    # The job holds at update 100 until the server is gone: left to run, it sometimes finished all
    # 300 updates while the server was being stopped, and nothing was left to fail
    release = tmp_path / "server-gone"
    hold = json.dumps([{"class_path": "distrnn.faults.HoldAt", "init_args": {"step": 100, "until": str(release)}}])
    with mlflow_server(tmp_path, auth=False, template=store_template) as uri:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        fit = subprocess.Popen(
            distrnn_cmd("fit", "--config", str(REPO / "jobs/configs/tiny.yaml"), "--trainer.max_steps", "300",
                        "--trainer.val_check_interval", "40", "--trainer.log_every_n_steps", "2", f"--trainer.callbacks={hold}"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        mlflow.set_tracking_uri(uri)
        deadline = time.time() + 120
        while True:  # wait until the run has logged some metrics, then take the server away
            runs = mlflow.search_runs(experiment_names=["tiny"])
            if len(runs) and mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "train/loss"):
                run_id = runs.iloc[0]["run_id"]
                break
            assert time.time() < deadline and fit.poll() is None
            time.sleep(0.5)
        store = f"sqlite:///{tmp_path}/server-{uri.rsplit(':', 1)[1]}.db"
    release.touch()
    t_kill = time.time()
    out, err = fit.communicate(timeout=240)
    assert fit.returncode == 0, err[-3000:]
    assert time.time() - t_kill < 200
    assert err.count("did not answer") == 1 and "was not finalized" in err
    (unsent,) = list((tmp_path / "checkpoints").glob("unsent-metrics-*.jsonl"))
    rows = [json.loads(line) for line in unsent.read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r["metrics"]]
    assert rows and all(r["run_id"] == run_id for r in rows)
    # train metrics every 2nd of ~150 batches: what reached the server's store and what was written
    # locally together cover the run, none dropped. (Logged at the index of the batch's last update:
    # tiny.yaml makes two a batch, 3, 7, 11, ..., and one in the epoch's short last batch.)
    sent = {m.step for m in mlflow.MlflowClient(store).get_metric_history(run_id, "train/loss")}
    both = sorted(sent | set(steps))
    assert sent and max(steps) >= 296 and len(both) == 75 and both[:5] == [3, 7, 11, 15, 19], both
    assert list((tmp_path / "checkpoints").rglob("last.ckpt"))
