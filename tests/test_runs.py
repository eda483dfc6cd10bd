"""Comparing runs (`distrnn runs compare`) and the model registry round trip, on real MLflow stores."""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch

from conftest import REPO, cli, distrnn_cmd, run_installed, write_corpus

pytestmark = pytest.mark.slow


def _run(*args, timeout=300, store=None, cwd=None):
    env = os.environ.copy()
    if store:
        env["MLFLOW_TRACKING_URI"] = store
    return subprocess.run(distrnn_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two short runs in one store, shared by this module's tests (each of which points MLflow at it)."""
    tmp_path = tmp_path_factory.mktemp("two-runs")
    store = f"sqlite:///{tmp_path}/mlflow.db"
    write_corpus(tmp_path / "corpus.txt", 6000)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text((REPO / "jobs/configs/tiny.yaml").read_text())
    common = ["--config", str(cfg), "--trainer.max_steps", "8", "--trainer.val_check_interval", "2", "--checkpoint.every_n_train_steps", "4",
              "--trainer.logger.init_args.experiment_name", "cmp"]
    register = json.dumps([{"class_path": "distrnn.registry.RegisterModel", "init_args": {"name": "tiny-byte"}}])
    a = _run("fit", *common, "--trainer.logger.init_args.run_name", "small", "--model.network.hidden_size", "16",
             f"--trainer.callbacks={register}", store=store, cwd=tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    assert "registered the best checkpoint" in a.stdout and "models:/tiny-byte/1" in a.stdout
    b = _run("fit", *common, "--trainer.logger.init_args.run_name", "wide", "--model.network.hidden_size", "48",
             "--model.optimizer.lr", "0.003", store=store, cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    return tmp_path, store


def test_compare_table_shows_the_differing_params_and_final_metrics(two_runs, tmp_path, capsys, monkeypatch):
    two_runs, store = two_runs
    mlflow.set_tracking_uri(store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    code, out, err = cli(capsys, "runs", "compare", "--experiment", "cmp", "--plot", str(tmp_path / "val.png"), "--metric", "val/loss")
    assert code == 0, err
    lines = out.splitlines()
    head = lines[0].split()
    assert "model.network.hidden_size" in head and "model.optimizer.lr" in head
    assert "trainer.max_steps" not in head  # equal in both runs: not a difference
    runs = mlflow.search_runs(experiment_names=["cmp"])
    assert len(runs) == 2
    col = head.index("val/loss")
    for _, run in runs.iterrows():
        row = next(ln.split() for ln in lines[2:] if ln.split()[0] == run["tags.mlflow.runName"])
        assert row[head.index("model.network.hidden_size")] == run["params.model.network.hidden_size"]
        assert row[col] == f"{run['metrics.val/loss']:.4g}"
    assert (tmp_path / "val.png").stat().st_size > 5000 and "2 runs plotted" in out
    # the installed command prints the same table without importing Lightning (distrnn.tracking: ~4 s)
    r, imported = run_installed("runs", "compare", "--experiment", "cmp", cwd=two_runs)
    assert r.returncode == 0 and r.stdout.splitlines()[0].split() == head, r.stderr[-2000:]
    assert "lightning" not in imported and "distrnn.tracking" not in imported, sorted(m for m in imported if "lightning" in m)[:5]
    code, _, err = cli(capsys, "runs", "compare", "--experiment", "nope")
    assert code == 2 and err.strip().startswith("distrnn: error: --experiment: no experiment named 'nope'"), err
    # both runs trained with the same code, data and libraries: no column for them; one with other
    # code and another torch gets a column for each
    assert "code" not in head and "data" not in head and not [h for h in head if h.startswith("env.")]
    other = runs.iloc[0]["run_id"]
    client = mlflow.MlflowClient()
    before = client.get_run(other).data.tags
    assert before["distrnn.env.torch"] == torch.__version__
    changed = ("mlflow.source.git.commit", "distrnn.git.dirty", "distrnn.env.torch")
    try:
        client.set_tag(other, "mlflow.source.git.commit", "0123456789abcdef")
        client.set_tag(other, "distrnn.git.dirty", "true")
        client.set_tag(other, "distrnn.env.torch", "2.99.0")
        code, out, err = cli(capsys, "runs", "compare", "--experiment", "cmp")
        head = out.splitlines()[0].split()
        assert code == 0 and head[:4] == ["run", "status", "code", "env.torch"], out
        row = next(ln.split() for ln in out.splitlines()[2:] if ln.split()[0] == runs.iloc[0]["tags.mlflow.runName"])
        assert row[2:4] == ["01234567+", "2.99.0"]
    finally:
        for k in changed:
            client.set_tag(other, k, before[k]) if k in before else client.delete_tag(other, k)
    # in a folder without the store, the commands that read it say so and do not create an empty one
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    for args in (["runs", "compare", "--experiment", "cmp"], ["generate", "--model", "models:/tiny-byte/1"]):
        code, _, err = cli(capsys, *args)
        assert code == 2 and err.strip() == (f"distrnn: error: no MLflow store at sqlite:///mlflow.db: {elsewhere}/mlflow.db"
                                             " does not exist; run from the folder you trained in, or set MLFLOW_TRACKING_URI"), err
    assert not list(elsewhere.iterdir())


def test_registered_model_round_trips(two_runs, capsys, monkeypatch):
    """Loaded from the registry, the model gives the outputs and final state of the checkpoint it
    came from, MLflow's pyfunc flavor (what `mlflow models serve` answers) predicts those outputs,
    and `distrnn generate --model` samples exactly what `--checkpoint` samples."""
    from distrnn.generate import load_model

    two_runs, store = two_runs
    mlflow.set_tracking_uri(store)
    run = mlflow.search_runs(experiment_names=["cmp"], filter_string="tags.mlflow.runName = 'small'").iloc[0]
    best = next(p for p in (two_runs / "checkpoints").rglob("best-*.ckpt") if run["run_id"] in str(p))
    reference = load_model(str(best))
    loaded = mlflow.pytorch.load_model("models:/tiny-byte/1", map_location="cpu").model.eval()
    x = torch.randint(0, 256, (3, 40))
    with torch.no_grad():
        (y_ref, h_ref), (y, h) = reference(x), loaded(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    served = mlflow.pyfunc.load_model("models:/tiny-byte/1").predict(x.numpy())
    np.testing.assert_array_equal(served, y_ref.numpy())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    g1 = cli(capsys, "generate", "--model", "models:/tiny-byte/1", "--prompt", "the ", "--length", "30")
    g2 = cli(capsys, "generate", "--checkpoint", str(best), "--prompt", "the ", "--length", "30")
    assert g1[0] == 0 and g1[1] == g2[1] and len(g1[1]) > 30, g1[2][-2000:]
    code, _, err = cli(capsys, "generate", "--model", "models:/tiny-byte/99")
    assert code == 2 and "models:/tiny-byte/99" in err


def test_mlflow_models_serve_answers_with_the_models_predictions(two_runs):
    """`mlflow models serve` on the registered model (on 127.0.0.1, a free port, stopped here): a
    JSON request with token sequences of a length other than the signature example's gets the
    model's outputs for them (before the registry held a Predictor, MLflow's pyfunc refused the
    (outputs, state) pair the model returns)."""
    import signal
    import time
    import urllib.request

    from conftest import free_port

    two_runs, store = two_runs
    mlflow.set_tracking_uri(store)
    reference = mlflow.pytorch.load_model("models:/tiny-byte/1", map_location="cpu").model.eval()
    port = free_port()
    # MLflow execs `uvicorn` from the PATH (this environment's first: conftest)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny-byte/1",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.communicate(timeout=10)[0][-3000:]
                time.sleep(0.5)
        x = torch.randint(0, 256, (2, 23))
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": x.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            predictions = np.array(json.loads(answer.read())["predictions"], dtype=np.float32)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    with torch.no_grad():
        y, _ = reference(x)
    np.testing.assert_allclose(predictions, y.numpy(), rtol=0, atol=1e-6)


def test_compare_shows_a_sweep_as_a_line_and_its_trials_as_rows(tmp_path, capsys):
    """An experiment with two sweeps (parent runs with nested trials, as jobs/tune.py logs them) and
    a plain run: each parent is one line naming its best trial, not a row whose missing params
    would make every param 'differ'; --sweep keeps one sweep's trials, --sort orders them, a trial
    the scheduler stopped reads STOPPED_EARLY, an unknown sweep or metric is one line."""
    client = mlflow.MlflowClient()
    exp = client.create_experiment("sweeps")

    def sweep(name, losses, stopped=()):
        parent = client.create_run(exp, run_name=name, tags={"distrnn.sweep": name}).info.run_id
        client.log_param(parent, "sweep.num_samples", str(len(losses)))
        trials = []
        for i, loss in enumerate(losses):
            t = client.create_run(exp, run_name=f"{name}_trial_{i}", tags={"mlflow.parentRunId": parent}).info.run_id
            client.log_batch(t, metrics=[mlflow.entities.Metric("val/loss", loss, 0, 0)],
                             params=[mlflow.entities.Param("model.optimizer.lr", str(10.0 ** -i)),
                                     mlflow.entities.Param("trainer.max_steps", "40")])
            client.set_terminated(t, "KILLED" if i in stopped else "FINISHED")
            if i in stopped:
                client.set_tag(t, "distrnn.stopped_early", "true")
            trials.append(t)
        best = min(range(len(losses)), key=losses.__getitem__)
        client.log_batch(parent, metrics=[mlflow.entities.Metric("best_val_loss", losses[best], 0, 0)],
                         params=[mlflow.entities.Param("best.model.optimizer.lr", str(10.0 ** -best))],
                         tags=[mlflow.entities.RunTag("best.run_id", trials[best])])
        client.set_terminated(parent, "FINISHED")

    sweep("a", [3.0, 2.0, 4.0], stopped=(2,))
    sweep("b", [1.5, 2.5])
    plain = client.create_run(exp, run_name="plain").info.run_id
    client.log_batch(plain, params=[mlflow.entities.Param("model.optimizer.lr", "0.5"), mlflow.entities.Param("trainer.max_steps", "40")])
    client.set_terminated(plain, "FINISHED")

    code, out, err = cli(capsys, "runs", "compare", "--experiment", "sweeps")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("sweep 'a' (run ") and "3 trials; best_val_loss 2 in a_trial_1 with model.optimizer.lr=0.1" in lines[0]
    assert lines[1].startswith("sweep 'b' (run ") and "2 trials; best_val_loss 1.5 in b_trial_0" in lines[1]
    head = lines[2].split()
    assert head == ["run", "status", "model.optimizer.lr", "val/loss"]  # not sweep.*, best.*, trainer.max_steps
    assert [ln.split()[0] for ln in lines[4:]] == ["a_trial_0", "a_trial_1", "a_trial_2", "b_trial_0", "b_trial_1", "plain"]

    code, out, err = cli(capsys, "runs", "compare", "--experiment", "sweeps", "--sweep", "a", "--sort", "val/loss")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 + 2 + 3 and lines[0].startswith("sweep 'a'")
    rows = [ln.split() for ln in lines[3:]]
    assert [r[0] for r in rows] == ["a_trial_1", "a_trial_0", "a_trial_2"] and rows[2][1] == "STOPPED_EARLY"
    assert [r[1] for r in rows[:2]] == ["FINISHED", "FINISHED"]
    code, out, _ = cli(capsys, "runs", "compare", "--experiment", "sweeps", "--sweep", "b", "--sort", "val/loss", "--descending")
    assert [ln.split()[0] for ln in out.splitlines()[3:]] == ["b_trial_1", "b_trial_0"]

    code, out, err = cli(capsys, "runs", "compare", "--experiment", "sweeps", "--max_runs", "3")
    assert code == 0 and "(only the first 3 runs of the experiment: --max_runs)" in err
    assert out.splitlines()[0].startswith("sweep 'a'") and [ln.split()[0] for ln in out.splitlines()[3:]] == ["a_trial_0", "a_trial_1"]
    code, _, err = cli(capsys, "runs", "compare", "--experiment", "sweeps", "--sweep", "c")
    assert code != 0 and err.strip() == "distrnn: error: --sweep: no sweep named 'c' in experiment 'sweeps'"
    code, _, err = cli(capsys, "runs", "compare", "--experiment", "sweeps", "--sort", "val/acc")
    assert code != 0 and err.strip() == "distrnn: error: --sort: no run logged a metric 'val/acc'"
