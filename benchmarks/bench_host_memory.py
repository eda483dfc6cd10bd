"""The settings `distrnn fit` makes on a CPU against the CPU as it is, side by side: the same
`distrnn fit` command with each setting's environment variable one way and the other, runs
interleaved, the other setting at distrnn's default.

- malloc: glibc's freed memory kept for the next step (DISTRNN_MALLOC=keep, the default) against
  glibc as it is (system); distrnn/host_memory.py.
- denormals: subnormal floats flushed to zero (DISTRNN_DENORMALS=flush, the default) against
  computed (keep); distrnn/denormals.py. They appear as a model learns (saturated gates), so one
  case starts from the selective-copy model's trained weights (benchmarks/state/selective_copy).

Printed per config and setting: updates/s (after 10 warm-up updates) and the process's resident
peak (VmHWM), each run and the ratio of medians.

    python benchmarks/bench_host_memory.py            # every case, both settings
    python benchmarks/bench_host_memory.py --setting denormals --only trained --repeats 3
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
TRAINED = REPO / "benchmarks/state/selective_copy/last.ckpt"
CASES = {
    "make train's byte LSTM (B=32, k=100, H=256), 300 updates": ["--config", str(REPO / "jobs/configs/default.yaml"), "--trainer.max_steps", "300"],
    "selective copy T=1024 (3-layer minGRU H=128, B=32), 60 updates": [
        "--config", str(REPO / "jobs/configs/selective_copy_mingru_t1024.yaml"), "--trainer.max_steps", "60"],
    "selective copy T=4096 (3-layer minGRU H=128, B=16), 30 updates": [
        "--config", str(REPO / "jobs/configs/selective_copy_mingru.yaml"), "--data.init_args.batch_size", "16", "--trainer.max_steps", "30"],
    "selective copy T=4096 from its trained weights (B=16), 30 updates": [
        "--config", str(REPO / "jobs/configs/selective_copy_mingru.yaml"), "--data.init_args.batch_size", "16", "--trainer.max_steps", "30",
        "--model.init_weights", str(TRAINED)],
}
# setting: (environment variable, the CPU as it is, distrnn's default)
SETTINGS = {"malloc": ("DISTRNN_MALLOC", "system", "keep"), "denormals": ("DISTRNN_DENORMALS", "keep", "flush")}


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


def run(args: list[str], env_var: str, value: str, tmp: str) -> tuple[float, float]:
    env = {**os.environ, env_var: value, "PYTHONPATH": f"{REPO / 'benchmarks'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
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
    p.add_argument("--setting", choices=sorted(SETTINGS), action="append", help="one setting (default: both)")
    p.add_argument("--only", default=None, help="the cases whose name contains this")
    a = p.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; each pair of runs interleaved")
    for name, args in CASES.items():
        if a.only and a.only not in name:
            continue
        for setting in a.setting or list(SETTINGS):
            var, off, on = SETTINGS[setting]
            got: dict[str, list[tuple[float, float]]] = {off: [], on: []}
            with tempfile.TemporaryDirectory() as tmp:
                for _ in range(a.repeats):
                    for value in (off, on):
                        got[value].append(run(args, var, value, tmp))
            med = {k: (statistics.median(r for r, _ in v), statistics.median(g for _, g in v)) for k, v in got.items()}
            print(f"\n{name}: {setting}")
            for k in (off, on):
                runs = ", ".join(f"{r:.2f}" for r, _ in got[k])
                print(f"  {var}={k:6s}: {med[k][0]:7.2f} updates/s (runs: {runs}), resident peak {med[k][1]:.2f} GiB")
            print(f"  ratio {on} / {off}: {med[on][0] / med[off][0]:.2f}x updates/s, {med[on][1] / med[off][1]:.2f}x resident peak")


if __name__ == "__main__":
    main()
