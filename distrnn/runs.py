"""``distrnn runs compare --experiment NAME``: the runs of an experiment side by side in the terminal.

Prints one row per run: its name, status, the params whose values differ between the runs (the
ones that are equal everywhere say nothing about the difference) and the final value of every
metric; the runs of ``validate``/``test``/``predict`` only with ``--evaluations``. ``--plot FILE --metric val/loss`` writes an overlay PNG of one metric against the step.
A sweep's parent run (``jobs/tune.py``) is a line above the table (its best value, trial and
config), not a row: its trials are the rows (``--sweep NAME``: only the trials of that sweep).
``--sort METRIC`` orders the rows by that metric's final value, smallest first (``--descending``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

import mlflow

from distrnn.commands import fail

SWEEP_TAG = "distrnn.sweep"  # on a sweep's parent run (distrnn.tune), its name
STOPPED_EARLY_TAG = "distrnn.stopped_early"  # on a trial the sweep's scheduler stopped
# The tags distrnn.tracking puts on runs, here where `distrnn runs` reads them without Lightning
STAGE_TAG = "distrnn.stage"  # on a validate/test/predict run: which
GIT_COMMIT_TAG, GIT_BRANCH_TAG = "mlflow.source.git.commit", "mlflow.source.git.branch"  # the MLflow UI shows these
GIT_DIRTY_TAG, VERSION_TAG = "distrnn.git.dirty", "distrnn.version"


def check_store_exists() -> None:
    """A command that reads runs refuses a SQLite store that is not there: MLflow would create an
    empty one (in the working directory, by default) and then report that nothing is in it."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = os.path.abspath(uri.removeprefix("sqlite:///").split("?")[0])
        if not os.path.isfile(path):
            fail(f"no MLflow store at {uri}: {path} does not exist; run from the folder you trained in, or set"
                 " MLFLOW_TRACKING_URI")


def _runs(experiment: str, max_runs: int) -> list[Any]:
    check_store_exists()
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        fail(f"--experiment: no experiment named '{experiment}' at {mlflow.get_tracking_uri()}")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=max_runs)


def differing_params(runs: list[Any]) -> list[str]:
    keys = sorted({k for r in runs for k in r.data.params})
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


STOPPED_EARLY = "STOPPED_EARLY"


def _status(run: Any) -> str:
    """A trial that the sweep's scheduler stopped is KILLED in MLflow like one stopped by Ctrl-C:
    the table tells them apart."""
    return STOPPED_EARLY if run.data.tags.get(STOPPED_EARLY_TAG) == "true" else run.info.status


def _name(run: Any) -> str:
    return run.data.tags.get("mlflow.runName") or run.info.run_id[:8]


def sweep_line(parent: Any, runs: list[Any]) -> str:
    """One line for a sweep's parent run: its trials among ``runs`` and the best it logged."""
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    best = {k: v for k, v in parent.data.metrics.items() if k.startswith("best_")}
    by_id = {r.info.run_id: r for r in runs}
    winner = by_id.get(parent.data.tags.get("best.run_id", ""))
    config = ", ".join(f"{k[len('best.'):]}={v}" for k, v in sorted(parent.data.params.items()) if k.startswith("best."))
    found = "; ".join(f"{k} {v:.4g}" for k, v in best.items()) or "no best logged yet"
    return (f"sweep '{parent.data.tags.get(SWEEP_TAG)}' (run {parent.info.run_id[:8]}, {parent.info.status}): {len(trials)} trials;"
            f" {found}{f' in {_name(winner)}' if winner else ''}{f' with {config}' if config else ''}")


def code(run: Any) -> str:
    """The code a run trained with (distrnn.provenance.code_version's tags): the commit's first 8
    characters, ``+`` when it ran with uncommitted changes (its ``code.diff``), else the version."""
    tags = run.data.tags
    commit = tags.get(GIT_COMMIT_TAG)
    if commit:
        return commit[:8] + ("+" if tags.get(GIT_DIRTY_TAG) == "true" else "")
    return tags.get(VERSION_TAG, "-")


def data(run: Any) -> str:
    """The data a run trained on: the digest of its training split in MLflow's dataset tracking
    (first 8 characters; tracking.LogConfigToMLflow._log_datasets), ``-`` for a run without one."""
    inputs = getattr(getattr(run, "inputs", None), "dataset_inputs", None) or []
    for d in inputs:
        if any(t.key == "mlflow.data.context" and t.value == "training" for t in d.tags):
            return d.dataset.digest[:8]
    return "-"


def table(runs: list[Any], metrics: Optional[list[str]] = None) -> str:
    params = differing_params(runs)
    metric_keys = metrics or sorted({k for r in runs for k in r.data.metrics if not k.startswith("system/")})
    # a column only when the runs differ in it, as for params (the same config over a changed
    # corpus: the data column)
    env = sorted({k for r in runs for k in r.data.tags if k.startswith("distrnn.env.")})
    columns = [("code", code), ("data", data),
               *((k[len("distrnn."):], lambda r, k=k: r.data.tags.get(k, "-")) for k in env)]  # env.torch, env.device, ...
    extra = [(name, fn) for name, fn in columns if len({fn(r) for r in runs}) > 1]
    head = ["run", "status", *(name for name, _ in extra), *params, *metric_keys]
    rows = []
    for r in runs:
        vals = [r.data.params.get(k, "-") for k in params]
        ms = [f"{r.data.metrics[k]:.4g}" if k in r.data.metrics else "-" for k in metric_keys]
        rows.append([_name(r), _status(r), *(fn(r) for _, fn in extra), *vals, *ms])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def plot(runs: list[Any], metric: str, path: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = mlflow.MlflowClient()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = 0
    for r in runs:
        hist = sorted(client.get_metric_history(r.info.run_id, metric), key=lambda m: m.step)
        if not hist:
            continue
        ax.plot([m.step for m in hist], [m.value for m in hist], label=_name(r))
        drawn += 1
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="distrnn runs", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="a table of an experiment's runs: differing params, final metrics")
    c.add_argument("--experiment", required=True, help="MLflow experiment name")
    c.add_argument("--metrics", nargs="*", default=None, help="metrics to show (default: all)")
    c.add_argument("--plot", default=None, help="write an overlay PNG of --metric to this file")
    c.add_argument("--metric", default="val/loss", help="the metric of --plot")
    c.add_argument("--max_runs", type=int, default=1000, help="read at most this many runs, the oldest first")
    c.add_argument("--evaluations", action="store_true",
                   help="also the runs of validate/test/predict (nested under the runs they evaluated)")
    c.add_argument("--sweep", default=None, help="only the trials of the sweep of this name (its latest, when run again)")
    c.add_argument("--sort", default=None, metavar="METRIC", help="order the rows by this metric's final value, smallest first")
    c.add_argument("--descending", action="store_true", help="with --sort: largest first")
    a = p.parse_args(argv)
    runs = _runs(a.experiment, a.max_runs + 1)
    if not runs:
        print(f"distrnn: experiment '{a.experiment}' has no runs", file=sys.stderr)
        return 1
    if len(runs) > a.max_runs:
        runs = runs[:a.max_runs]
        print(f"(only the first {a.max_runs} runs of the experiment: --max_runs)", file=sys.stderr)
    evaluations = [r for r in runs if STAGE_TAG in r.data.tags]
    if evaluations and not a.evaluations:
        runs = [r for r in runs if STAGE_TAG not in r.data.tags]
        print(f"({len(evaluations)} validate/test/predict runs not shown: --evaluations)", file=sys.stderr)
    parents = [r for r in runs if SWEEP_TAG in r.data.tags]
    if a.sweep is not None:
        parents = [r for r in parents if r.data.tags[SWEEP_TAG] == a.sweep][-1:]  # runs come oldest first
        if not parents:
            fail(f"--sweep: no sweep named '{a.sweep}' in experiment '{a.experiment}'")
        runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id or r in parents]
    for parent in parents:
        print(sweep_line(parent, runs))
    runs = [r for r in runs if SWEEP_TAG not in r.data.tags]
    if a.sort:
        if not any(a.sort in r.data.metrics for r in runs):
            fail(f"--sort: no run logged a metric '{a.sort}'")
        # runs without the metric last, in either order
        runs = sorted(runs, key=lambda r: (a.sort not in r.data.metrics,
                                           (-1 if a.descending else 1) * r.data.metrics.get(a.sort, 0.0)))
    if not runs:
        print(f"distrnn: no runs to compare in experiment '{a.experiment}'", file=sys.stderr)
        return 1
    print(table(runs, a.metrics))
    if a.plot:
        n = plot(runs, a.metric, a.plot)
        print(f"\n{a.metric} of {n} runs plotted to {a.plot}")
    return 0
