"""A sweep is checked before any trial starts: bad distributions and unknown keys end with exit
code 2 and one line naming the key, and no MLflow run exists afterwards."""

import mlflow
import pytest

from conftest import REPO, write_corpus
from distrnn.tune import main as tune_main

SWEEP = """
config: [{config}]
overrides: {{data.init_args.path: corpus.txt}}
search_space: {space}
"""


@pytest.mark.parametrize(
    "space,message",
    [
        ("{model.optimizer.lr: {uniform: [0.1, 0.01]}}", "search_space.model.optimizer.lr: uniform lower bound 0.1 must be below"),
        ("{model.optimizer.lr: {uniform: [0.1, 0.1]}}", "search_space.model.optimizer.lr: uniform lower bound"),
        ("{model.network.hidden_size: {choice: []}}", "search_space.model.network.hidden_size: choice needs a non-empty list"),
        ("{model.optimizer.lr: {loguniform: [0, 0.1]}}", "search_space.model.optimizer.lr: loguniform bounds must be > 0"),
        ("{model.optimizer.lr: {loguniform: [-1, 0.1]}}", "search_space.model.optimizer.lr: loguniform bounds must be > 0"),
        ("{model.optimizer.lr: {normal: [0, 1]}}", "search_space.model.optimizer.lr: give exactly one of"),
        ("{model.tbptt.k1: {randint: [4, 8.5]}}", "search_space.model.tbptt.k1: randint bounds must be integers"),
        ("{model.optimizer.lrr: {uniform: [0.001, 0.01]}}", "model.optimizer.lrr"),
        ("{model.tbptt.k1: {choice: [8, 64]}}", "model.tbptt.k1"),  # 64 > data.seq_len 32
        ("{}", "search_space: empty"),
        # found when the data is read, on the driver: not in every trial
        ("{data.init_args.batch_size: {choice: [4, 4000]}}", "data.batch_size: corpus of 2850 tokens is too short for 4000 streams"),
    ],
)
def test_bad_search_space_is_rejected_before_any_trial(tmp_path, capsys, space, message):
    write_corpus(tmp_path / "corpus.txt", 3000)
    (tmp_path / "sweep.yaml").write_text(SWEEP.format(config=REPO / "jobs/configs/tiny.yaml", space=space))
    with pytest.raises(SystemExit) as e:
        tune_main(["--config", str(tmp_path / "sweep.yaml"), "--storage_path", str(tmp_path / "store")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert len(mlflow.search_runs(search_all_experiments=True)) == 0
    assert not (tmp_path / "store").exists()


def test_a_ray_train_job_checks_its_data_for_its_number_of_workers(tmp_path, capsys, monkeypatch):
    """2,000 streams fit the 2,850 training tokens of one rank but not of two: the driver of a
    2-worker job refuses it before Ray starts, as each worker would."""
    from distrnn.raytrain import main as train_main

    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus.txt", 3000)
    args = ["--check-only", "--config", str(REPO / "jobs/configs/tiny.yaml"), "--data.init_args.batch_size", "2000",
            "--trainer.check_val_every_n_epoch", "null"]
    assert train_main(["--num-workers", "1", *args]) is None
    assert "config OK" in capsys.readouterr().out
    for flag in ("--num-workers", "--num_workers"):  # spelled as jobs/train.py's help does, or as distrnn's options
        with pytest.raises(SystemExit) as e:
            train_main([flag, "2", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err == ["distrnn: error: data.batch_size: corpus of 2850 tokens is too short for 4000"
                                             " streams (batch_size 2000 x world size 2)"], err
    # Ray refused a worker without resources only after the cluster had started
    with pytest.raises(SystemExit) as e:
        train_main(["--num-workers", "1", "--cpus-per-worker", "0", *args])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == (
        "distrnn: error: cpus_per_worker: must be > 0 (or 0 with use_gpu: each worker then reserves a GPU only), got 0.0")


@pytest.mark.parametrize(
    "option,message",
    [
        (["--workers_per_trial", "2"], "data.batch_size: corpus of 2850 tokens is too short for 3000 streams"),
        (["--workers_per_trial", "0"], "workers_per_trial: must be >= 1, got 0"),
        (["--strategy", "fsdp"], "strategy: 'fsdp' is not one of ddp, deepspeed_stage_1"),
        (["--workers_per_trial", "2", "--gpus_per_trial", "1"], "gpus_per_trial: 1.0 GPUs cannot be split evenly"),
        (["--scheduler", '{"name": "pbt", "resample_probability": 1.5}'], "scheduler.resample_probability: must be within [0, 1]"),
        (["--max_failures", "-1"], "max_failures: must be >= 0, got -1"),
        (["--cpus_per_trial", "0"], "cpus_per_trial: must be > 0 (or 0 with gpus_per_trial), got 0.0"),
        (["--gpus_per_trial", "-1"], "gpus_per_trial: must be >= 0, got -1.0"),
        (["--keep_checkpoints", "0"], "keep_checkpoints: must be >= 1 or null (keep all), got 0"),
        (["--keep_checkpoints", "2", "--scheduler", '{"name": "pbt"}'], "keep_checkpoints: must be >= 3 with PBT"),
        (["--search", "optuna", "--search_space", '{"model.optimizer.lr": {"grid": [0.01, 0.02]}}'],
         "search: optuna draws every value itself; search_space.model.optimizer.lr is a grid (use choice)"),
        (["--search", "optuna", "--scheduler", '{"name": "pbt"}'], "search: optuna picks each trial's values once"),
        (["--search", "bayes"], "search"),
    ],
)
def test_a_sweeps_settings_are_checked_on_the_driver_before_any_trial(tmp_path, capsys, option, message):
    """Each setting above is refused on the driver in one line, before any trial or run. The first:
    1,500 streams fit the 2,850 training tokens of a one-rank trial but not of a two-rank one (each
    rank its own 1,500)."""
    write_corpus(tmp_path / "corpus.txt", 3000)
    (tmp_path / "sweep.yaml").write_text(SWEEP.format(config=REPO / "jobs/configs/tiny.yaml",
                                                      space="{model.optimizer.lr: {choice: [0.01]}}"))
    base = ["--config", str(tmp_path / "sweep.yaml"), "--storage_path", str(tmp_path / "store"), "--check_only",
            "--overrides", '{"data.init_args.path": "corpus.txt", "data.init_args.batch_size": 1500,'
                           ' "trainer.check_val_every_n_epoch": null}']
    tune_main(base)
    assert "sweep OK" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        tune_main(base + option)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err
    assert len(mlflow.search_runs(search_all_experiments=True)) == 0


def test_sweep_file_keys_are_typed(tmp_path, capsys):
    (tmp_path / "sweep.yaml").write_text("config: [x.yaml]\nnum_samples: many\n")
    with pytest.raises(SystemExit) as e:
        tune_main(["--config", str(tmp_path / "sweep.yaml")])
    assert e.value.code == 2 and "num_samples" in capsys.readouterr().err



def test_a_callback_in_the_overrides_reaches_the_trials_as_a_config(tmp_path, capsys):
    """``trainer.callbacks`` in a sweep's overrides (a drill's fault, an EMA): handed to every
    trial's command line as the {class_path, init_args} it is, not built in the driver."""
    from distrnn.tune import as_args, load_sweep

    write_corpus(tmp_path / "corpus.txt", 3000)
    hold = "{class_path: distrnn.faults.HoldAt, init_args: {step: 9, until: release}}"
    (tmp_path / "sweep.yaml").write_text(
        SWEEP.format(config=REPO / "jobs/configs/tiny.yaml", space="{model.optimizer.lr: {uniform: [0.001, 0.01]}}")
        .replace("overrides: {", f"overrides: {{trainer.callbacks: [{hold}], "))
    argv = ["--config", str(tmp_path / "sweep.yaml"), "--storage_path", str(tmp_path / "store")]
    sweep, _, _ = load_sweep(argv)
    assert sweep.overrides["trainer.callbacks"] == [{"class_path": "distrnn.faults.HoldAt", "init_args": {
        "step": 9, "until": "release", "rank": None, "timeout_s": 600.0}}]
    assert '--trainer.callbacks=[{"class_path": "distrnn.faults.HoldAt"' in " ".join(as_args(sweep.overrides))
    tune_main(argv + ["--check_only=true"])  # the trials' parser takes it
    assert "sweep OK" in capsys.readouterr().out


def test_a_run_ending_in_error_once_its_job_or_sweep_was_stopped_is_killed_not_failed(tmp_path):
    """Tune stops the trials of an interrupted sweep, and a trial's training thread can see the
    stop as an error at any moment around the driver's own closing of the trial runs (seen once
    in CI: a trial run FAILED). The driver tags the parent run before Tune stops anything; a trial
    run that ends in error after that is KILLED. Before the tag, and after a --resume removed
    it, an error is FAILED. The same for a stopped Ray Train job's own run (rank 0 can fail on a
    killed peer after the driver closed the run), until a resume continues the run."""
    from distrnn.tracking import INTERRUPTED_TAG, RUN_ID_KEY, MLflowLogger, continue_run
    from distrnn.tune import SweepConfig, _parent_run

    sweep = SweepConfig(config=["x.yaml"], experiment_name="sweep-x", name="sx")
    parent = _parent_run(sweep, resume=False)
    client = mlflow.MlflowClient()

    def logger(**tags):
        return MLflowLogger(experiment_name="sweep-x", tags=tags, log_plots=False, synchronous=True,
                            checkpoint_dir=str(tmp_path))

    def ends_in_error(log) -> str:
        log.log_metrics({"val/loss": 1.0}, 0)
        try:
            raise RuntimeError("the session was shut down")
        except RuntimeError:
            log.finalize("failed")
        return client.get_run(log.run_id).info.status

    assert ends_in_error(logger(**{"mlflow.parentRunId": parent})) == "FAILED"
    client.set_tag(parent, INTERRUPTED_TAG, "true")
    assert ends_in_error(logger(**{"mlflow.parentRunId": parent})) == "KILLED"
    assert _parent_run(sweep, resume=True) == parent  # --resume: the same parent, no longer interrupted
    assert INTERRUPTED_TAG not in client.get_run(parent).data.tags
    assert ends_in_error(logger(**{"mlflow.parentRunId": parent})) == "FAILED"

    job = logger()
    job.log_metrics({"val/loss": 1.0}, 0)
    client.set_tag(job.run_id, INTERRUPTED_TAG, "true")  # as the Ray Train driver does when stopped
    assert ends_in_error(job) == "KILLED"
    resumed = logger()
    assert continue_run(resumed, {RUN_ID_KEY: job.run_id}) == job.run_id
    assert INTERRUPTED_TAG not in client.get_run(job.run_id).data.tags
    assert ends_in_error(resumed) == "FAILED"


def test_a_run_stopped_by_sys_exit_0_is_killed_and_by_another_code_failed(tmp_path):
    """Ray Tune stops a trial's training thread with sys.exit(0) in its report call: KILLED, not
    FAILED; an exit with an error code is a failure."""
    from distrnn.tracking import MLflowLogger

    def ends_in(exc) -> str:
        log = MLflowLogger(experiment_name="exits", log_plots=False, synchronous=True, checkpoint_dir=str(tmp_path))
        log.log_metrics({"val/loss": 1.0}, 0)
        try:
            raise exc
        except BaseException:
            log.finalize("failed")
        return mlflow.MlflowClient().get_run(log.run_id).info.status

    assert ends_in(SystemExit(0)) == "KILLED"
    assert ends_in(SystemExit(None)) == "KILLED"
    assert ends_in(SystemExit(2)) == "FAILED"


def test_the_sweep_closes_trial_runs_after_the_trials_have_closed_them():
    """Tune returns without waiting for a stopped trial's thread, which then closes its own run
    (FAILED or KILLED) while the driver closes the trial runs. The driver waits until no trial run
    is RUNNING, so its statuses are the last written: the stopped trial KILLED and tagged, the
    trial that trained to its last step FINISHED (Tune stopped it at max_t while it closed its run)."""
    import threading
    import time
    from types import SimpleNamespace

    from distrnn.tune import SweepConfig, _close_trial_runs, _parent_run

    parent = _parent_run(SweepConfig(config=["x.yaml"], experiment_name="sweep-settle", name="s"), resume=False)
    client = mlflow.MlflowClient()
    exp_id = client.get_run(parent).info.experiment_id

    def trial(tid):
        return client.create_run(exp_id, tags={"mlflow.parentRunId": parent, "distrnn.trial_id": tid}).info.run_id

    stopped, finished = trial("t0"), trial("t1")
    closing = threading.Timer(1.0, lambda: [client.set_terminated(r, "FAILED") for r in (stopped, finished)])
    closing.start()
    results = [SimpleNamespace(error=None, metrics={"trial_id": "t0", "step": 12, "max_steps": 48}),
               SimpleNamespace(error=None, metrics={"trial_id": "t1", "step": 48, "max_steps": 48})]
    t0 = time.monotonic()
    _close_trial_runs(client, parent, results, settle_s=30)
    waited = time.monotonic() - t0
    closing.join()
    assert 0.9 < waited < 20
    run = client.get_run(stopped)
    assert run.info.status == "KILLED" and run.data.tags.get("distrnn.stopped_early") == "true"
    assert client.get_run(finished).info.status == "FINISHED"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "jobs" / "configs").glob("sweep_*.yaml")))
def test_every_shipped_sweep_passes_its_check(tmp_path, capsys, monkeypatch, name):
    """The sweeps in jobs/configs stay valid (search space, scheduler, keep_checkpoints, each
    sample's config and data) as the classes they name change; nothing is written to the store."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").symlink_to(REPO / "jobs")  # the sweeps name their configs from the checkout's root
    write_corpus(tmp_path / "corpus.txt", 3000)  # tiny.yaml's data
    assert tune_main(["--config", f"jobs/configs/{name}", "--storage_path", str(tmp_path / "store"), "--check_only"]) is None
    assert "distrnn: sweep OK" in capsys.readouterr().out
    assert not (tmp_path / "store").exists() and len(mlflow.search_runs(search_all_experiments=True)) == 0


def test_help_shows_each_key_as_given_with_its_doc(tmp_path, capsys):
    """`jobs/tune.py --help` (it was an error: --help became --sweep.help) lists the keys as they are
    typed, each with the docstring of its SweepConfig field; the distrnn configs can be named on the
    command line as --sweep.config (--config is the sweep YAML)."""
    with pytest.raises(SystemExit) as e:
        tune_main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--sweep.num_samples" not in out
    assert "--num_samples NUM_SAMPLES" in out and "Trials drawn from the space" in out
    assert "--keep_checkpoints KEEP_CHECKPOINTS" in out and "its N best by" in out
    write_corpus(tmp_path / "corpus.txt", 3000)
    (tmp_path / "sweep.yaml").write_text(SWEEP.format(config="nope.yaml", space="{model.optimizer.lr: {choice: [0.01]}}"))
    tune_main(["--config", str(tmp_path / "sweep.yaml"), "--sweep.config", f"[{REPO / 'jobs/configs/tiny.yaml'}]", "--check-only"])
    assert "sweep OK" in capsys.readouterr().out


def test_search_optuna_without_optuna_installed_is_one_line(monkeypatch):
    import sys

    from distrnn.tune import SweepConfig, search_error

    sweep = SweepConfig(search="optuna", search_space={"model.optimizer.lr": {"loguniform": [1e-4, 1e-2]}})
    assert search_error(sweep) is None
    monkeypatch.setitem(sys.modules, "optuna", None)  # an import of it fails as when it is not installed
    assert search_error(sweep) == "search: optuna needs Optuna (pip install 'distrnn[ray]')"


@pytest.fixture
def drivers_before_ray(tmp_path, capsys, monkeypatch):
    """``check(train_args, tune_args, message)``: jobs/train.py and jobs/tune.py in this process
    (a 1-worker job of tiny.yaml, a sweep of it) each exit 2 with ``message`` (or the job's and the
    sweep's, a pair) as the last line, and Ray is never started."""
    import distrnn.raytrain
    import distrnn.tune
    from distrnn.raytrain import main as train_main

    def no_ray(*_: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(distrnn.raytrain, "init_ray", no_ray)
    monkeypatch.setattr(distrnn.tune, "init_ray", no_ray)
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "corpus.txt", 3000)
    (tmp_path / "sweep.yaml").write_text(SWEEP.format(config=REPO / "jobs/configs/tiny.yaml",
                                                      space="{model.optimizer.lr: {loguniform: [0.001, 0.01]}}"))

    def check(train_args: list[str], tune_args: list[str], message: "str | tuple[str, str]") -> None:
        messages = (message, message) if isinstance(message, str) else message
        for run, expected in zip((lambda: train_main(["--num-workers", "1", "--config", str(REPO / "jobs/configs/tiny.yaml"), *train_args]),
                                  lambda: tune_main(["--config", str(tmp_path / "sweep.yaml"), *tune_args])), messages):
            with pytest.raises(SystemExit) as e:
                run()
            assert e.value.code == 2
            assert capsys.readouterr().err.strip().splitlines()[-1] == f"distrnn: error: {expected}"

    return check


@pytest.mark.parametrize("store", ["server", "sqlite", "sqlite_unwritable"])
def test_an_mlflow_store_that_cannot_be_used_stops_a_job_and_a_sweep_before_ray_starts(drivers_before_ray, monkeypatch,
                                                                                         tmp_path, store):
    """Every worker group (and each restart) or trial would have failed inside training; the
    SQLite one, in a folder that cannot exist, failed on the driver with a traceback; in a folder
    that cannot be written, MLflow retried opening the file for minutes."""
    from conftest import free_port

    if store == "server":
        uri, why = f"http://127.0.0.1:{free_port()}", "Connection refused"  # nothing listens there
    elif store == "sqlite_unwritable":
        with pytest.raises(OSError) as e:  # what the kernel says to a new file there (root too)
            open("/proc/distrnn-test", "w")
        uri, why = "sqlite:////proc/mlflow.db", f"cannot write into /proc ({e.value.strerror})"
    else:
        folder = tmp_path.resolve() / "corpus.txt" / "x"  # under a file
        uri, why = f"sqlite:///{folder}/mlflow.db", "corpus.txt is not a folder"  # shown from the working folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    drivers_before_ray([], [], f"MLFLOW_TRACKING_URI: the MLflow store {uri} cannot be used: {why}")


def test_layers_that_cannot_run_on_cpu_workers_stop_a_job_and_a_sweep_before_ray_starts(drivers_before_ray):
    """A Triton scan on workers without GPUs: every worker group (and each restart) or trial failed
    inside training with a traceback; the driver checks the config on a CPU, as those workers run."""
    layer = ["--model.network.recurrence", "mingru", "--model.network.options", "{backend: triton}"]
    drivers_before_ray(layer, ["--overrides", "{data.init_args.path: corpus.txt, model.network.recurrence: mingru,"
                                              " model.network.options: {backend: triton}}"],
                       tuple(f"model.network.options.backend: triton needs a CUDA device, and this run is on cpu ({key});"
                             " leave backend unset to have the layer choose" for key in ("use_gpu", "gpus_per_trial")))


def test_a_storage_path_that_cannot_be_written_stops_a_job_and_a_sweep_before_ray_starts(drivers_before_ray, tmp_path):
    """Ray Train found out as it started the run, after Ray had started (a traceback)."""
    where = (tmp_path / "corpus.txt/ray").resolve()
    drivers_before_ray(["--storage-path", "corpus.txt/ray"], ["--storage_path", "corpus.txt/ray"],
                       f"storage_path: corpus.txt is not a folder (Ray's storage would be {where})")
    assert len(mlflow.search_runs(search_all_experiments=True)) == 0  # not even the sweep's parent run
