"""Ray Tune sweep overhead on a local cluster: wall time of a sweep against the trials' own time.

    python benchmarks/bench_sweep.py --trials 4 --concurrent 2

Runs `jobs/tune.py`'s machinery (distrnn.tune.main) on the tiny config with a FIFO scheduler
(every trial runs to the end, so the work is fixed) and reports
    overhead = sweep wall time / (sum of trial times / concurrent trials)
where a trial's time is Tune's `time_total_s` (from the trial's start to its last report). 1.0 means
the trials ran back to back with no cost of their own; Ray's own scalability benchmark shows 1.14.
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

    from distrnn.tune import main as tune_main

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    os.chdir(work)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    write_corpus(work / "corpus.txt", 20000)
    (work / "jobs").symlink_to(REPO / "jobs")  # the sweep names its config relative to the working directory
    overrides = {"data.init_args.path": "corpus.txt", "trainer.max_steps": a.steps, "trainer.val_check_interval": 25}
    t0 = time.perf_counter()
    results = tune_main(["--config", str(REPO / "jobs/configs/sweep_tiny.yaml"), "--storage_path", str(work / "store"),
                         "--num_samples", str(a.trials), "--max_concurrent_trials", str(a.concurrent),
                         "--scheduler", json.dumps({"name": "fifo"}), "--overrides", json.dumps(overrides)])
    wall = time.perf_counter() - t0
    trial_s = [r.metrics["time_total_s"] for r in results]
    ideal = sum(trial_s) / a.concurrent
    print(json.dumps({"trials": a.trials, "concurrent": a.concurrent, "steps": a.steps, "wall_s": round(wall, 1),
                      "trial_s": [round(t, 1) for t in trial_s], "overhead": round(wall / ideal, 3)}))


if __name__ == "__main__":
    main()
