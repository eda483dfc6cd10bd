"""A real MLflow tracking server with basic-auth, started on 127.0.0.1 by the test and always
stopped: `cluster/mlflow_check.py` finds what an unsafe deployment leaves open, and a distrnn
run logs to the hardened server with credentials."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import REPO, distrnn_cmd, free_port, write_corpus

pytestmark = pytest.mark.slow

OLD_DEFAULT = "password1234"  # what older MLflow versions shipped; servers set up then may still have it
BOOTSTRAP = "bootstrap-admin-password-0123"


@contextlib.contextmanager
def mlflow_server(tmp_path, auth: bool):
    port = free_port()
    env = {**os.environ, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-" + str(port)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path}/server-{port}.db", "--artifacts-destination", str(tmp_path / "artifacts"),
           "--serve-artifacts", "--workers", "1"]
    if auth:
        ini = tmp_path / "auth.ini"
        ini.write_text(
            "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{tmp_path}/auth.db\nadmin_username = admin\nadmin_password = {BOOTSTRAP}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        cmd += ["--app-name", "basic-auth", "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"]
    log = tmp_path / f"server-{port}.log"
    server = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(log.read_text()[-3000:])
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        yield uri
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _post(url, body, auth):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PATCH" if "update" in url else "POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status


def _check(uri, user=None):
    env = {**os.environ}
    if user:
        env.update(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])
    return subprocess.run([sys.executable, str(REPO / "cluster/mlflow_check.py"), uri], capture_output=True, text=True,
                          timeout=60, env=env)


def test_deployment_check_fails_an_open_server(tmp_path):
    """The negative control: a server started without authentication answers anyone, and with
    any password, so the check fails and says why."""
    with mlflow_server(tmp_path, auth=False) as uri:
        r = _check(uri)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "without credentials" in r.stderr and "default admin password" in r.stderr


def test_hardened_server_refuses_what_it_must(tmp_path):
    with mlflow_server(tmp_path, auth=True) as uri:
        _hardened(uri, tmp_path)


def _hardened(auth_server, tmp_path):
    trainer = ("trainer", "another-long-random-password")
    assert _post(f"{auth_server}/api/2.0/mlflow/users/create", {"username": trainer[0], "password": trainer[1]},
                 ("admin", BOOTSTRAP)) == 200
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
    no_creds = {k: v for k, v in env.items() if not k.startswith("MLFLOW_TRACKING_USER") and k != "MLFLOW_TRACKING_PASSWORD"}
    refused = subprocess.run(distrnn_cmd("fit", "--config", str(cfg), "--trainer.max_steps", "2"), capture_output=True,
                             text=True, timeout=300, env=no_creds, cwd=tmp_path)
    assert refused.returncode != 0 and ("401" in refused.stderr or "Unauthorized" in refused.stderr or "credentials" in refused.stderr)
