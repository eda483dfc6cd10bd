"""Ray Tune sweep overhead on a local cluster: wall time of a sweep against the trials' own time.

    python benchmarks/bench_sweep.py --trials 4 --concurrent 2

Starts a local cluster as `make cluster-up` does (127.0.0.1, token authentication), runs
`jobs/tune.py`'s machinery (distrnn.tune.main) against it on the tiny config with a FIFO scheduler
(every trial runs to the end, so the work is fixed), stops the cluster, and reports
    overhead = sweep wall time / (sum of trial times / concurrent trials)
where a trial's time is Tune's `time_total_s` (from the trial's start to its last report) and the
sweep's wall time runs from the job's start (config checks, MLflow parent run, connecting to Ray)
to its end; `fit_overhead` counts only `Tuner.fit`. 1.0 means the trials ran back to back with no
cost of their own; Ray's own scalability benchmark shows 1.14.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_corpus

    import subprocess

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    os.chdir(work)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    state = work / "ray-state"
    script = [sys.executable, str(REPO / "cluster/local_cluster.py")]
    subprocess.run([*script, "up", "--state-dir", str(state), "--num-cpus", str(a.concurrent)], check=True, timeout=300)
    os.environ.update({k: v for k, v in json.loads((state / "cluster.json").read_text()).items() if k.startswith("RAY_")})
    from ray import tune  # after the cluster's token settings are in the environment

    import distrnn.tune as dtune

    fit_s = []
    fit = tune.Tuner.fit

    def timed_fit(self):
        t = time.perf_counter()
        try:
            return fit(self)
        finally:
            fit_s.append(time.perf_counter() - t)

    tune.Tuner.fit = timed_fit
    write_corpus(work / "corpus.txt", 20000)
    (work / "jobs").symlink_to(REPO / "jobs")  # the sweep names its config relative to the working directory
    overrides = {"data.init_args.path": "corpus.txt", "trainer.max_steps": a.steps, "trainer.val_check_interval": 25}
    t0 = time.perf_counter()
    try:
        results = dtune.main(["--config", str(REPO / "jobs/configs/sweep_tiny.yaml"), "--storage_path", str(work / "store"),
                         "--num_samples", str(a.trials), "--max_concurrent_trials", str(a.concurrent),
                             "--scheduler", json.dumps({"name": "fifo"}), "--overrides", json.dumps(overrides)])
        wall = time.perf_counter() - t0
    finally:
        import ray

        ray.shutdown()
        subprocess.run([*script, "down", "--state-dir", str(state)], timeout=300)
    trial_s = [r.metrics["time_total_s"] for r in results]
    ideal = sum(trial_s) / a.concurrent
    print(json.dumps({"trials": a.trials, "concurrent": a.concurrent, "steps": a.steps, "wall_s": round(wall, 1),
                      "trial_s": [round(t, 1) for t in trial_s], "overhead": round(wall / ideal, 3),
                      "fit_s": round(fit_s[0], 1), "fit_overhead": round(fit_s[0] / ideal, 3)}))


if __name__ == "__main__":
    main()
