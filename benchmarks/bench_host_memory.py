"""Training on a CPU with glibc's malloc as distrnn sets it (freed memory kept, DISTRNN_MALLOC=keep,
the default) against glibc as it is (DISTRNN_MALLOC=system), side by side: the same `distrnn fit`
command, runs interleaved. Printed per config: updates/s (after 10 warm-up updates) and the
process's resident peak (VmHWM), each run and the ratio of medians.

    python benchmarks/bench_host_memory.py            # make train's LSTM, selective copy at T=1024 and T=4096
    python benchmarks/bench_host_memory.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

REPO = Path(__file__).resolve().parent.parent
CASES = {
    "make train's byte LSTM (B=32, k=100, H=256), 300 updates": ["--config", str(REPO / "jobs/configs/default.yaml"), "--trainer.max_steps", "300"],
    "selective copy T=1024 (3-layer minGRU H=128, B=32), 60 updates": [
        "--config", str(REPO / "jobs/configs/selective_copy_mingru_t1024.yaml"), "--trainer.max_steps", "60"],
    "selective copy T=4096 (3-layer minGRU H=128, B=16), 30 updates": [
        "--config", str(REPO / "jobs/configs/selective_copy_mingru.yaml"), "--data.init_args.batch_size", "16", "--trainer.max_steps", "30"],
}


class Rate(L.Callback):
    """Prints updates/s after 10 warm-up updates and the process's resident peak."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.marks.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        t = self.marks[10:]
        peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
        print(f"RATE {(len(t) - 1) / (t[-1] - t[0]):.4f} PEAK_KB {peak}", flush=True)


def run(args: list[str], malloc: str, tmp: str) -> tuple[float, float]:
    env = {**os.environ, "DISTRNN_MALLOC": malloc, "PYTHONPATH": f"{REPO / 'benchmarks'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "distrnn.cli", "fit", *args, "--trainer.logger", "false", "--trainer.limit_val_batches", "0",
           "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=bench_host_memory.Rate",
           "--checkpoint.dirpath", f"{tmp}/checkpoints"]
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    m = re.search(r"RATE (\S+) PEAK_KB (\d+)", r.stdout)
    if r.returncode != 0 or m is None:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return float(m.group(1)), int(m.group(2)) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", default=None, help="the cases whose name contains this")
    a = p.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; each pair of runs interleaved")
    for name, args in CASES.items():
        if a.only and a.only not in name:
            continue
        got: dict[str, list[tuple[float, float]]] = {"keep": [], "system": []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(a.repeats):
                for malloc in ("system", "keep"):
                    got[malloc].append(run(args, malloc, tmp))
        med = {k: (statistics.median(r for r, _ in v), statistics.median(g for _, g in v)) for k, v in got.items()}
        print(f"\n{name}")
        for k in ("system", "keep"):
            runs = ", ".join(f"{r:.2f}" for r, _ in got[k])
            print(f"  DISTRNN_MALLOC={k:6s}: {med[k][0]:7.2f} updates/s (runs: {runs}), resident peak {med[k][1]:.2f} GiB")
        print(f"  ratio keep / system: {med['keep'][0] / med['system'][0]:.2f}x updates/s, {med['keep'][1] / med['system'][1]:.2f}x resident peak")


if __name__ == "__main__":
    main()
