"""What tracking and diagnostics cost: the same TBPTT training run with logging off, with MLflow
logging every step (distrnn's asynchronous logger, and Lightning's synchronous one for contrast),
and with the :class:`distrnn.diagnostics.Diagnostics` callback. Interleaved repeats in one
process; printed: tokens/s of each, the cost of each relative to logging off, and the cost of one
diagnostics measurement in training steps.

The model and data are the default experiment's (byte LSTM, H=256, B=32, k=100, the standard
library's sources), so the ratio is the one a user of ``make train`` sees.

    python benchmarks/bench_logging.py
    python benchmarks/bench_logging.py --device cuda --hidden 1024 --batch 64 --k 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tbptt import Streams, Timer  # noqa: E402

from distrnn.config import NetworkConfig, OptimizerConfig, TaskSpec, TBPTTConfig  # noqa: E402
from distrnn.data.text import LOCAL_CORPORA, read_bytes  # noqa: E402
from distrnn.engine import TBPTTModule  # noqa: E402


SENDER: dict[str, list[float]] = {}


def run(tokens, a, tracking_dir, variant: str) -> float:
    torch.manual_seed(0)
    task = TaskSpec(kind="language_model", output_dim=256, vocab_size=256, seq_len=a.k)
    module = TBPTTModule(
        NetworkConfig(recurrence="lstm", hidden_size=a.hidden, embedding_dim=a.embed),
        TBPTTConfig(mode="tbptt", k1=a.k),
        OptimizerConfig(name="adamw", lr=1e-3, clip_norm=1.0),
        task,
    )
    timer = Timer(a.warmup)
    callbacks: list = [timer]
    logger = False
    log_every = 10**9
    if variant in ("async", "sync", "diagnostics"):
        from distrnn.tracking import MLflowLogger

        logger = MLflowLogger(experiment_name=f"bench-{variant}", tracking_uri=f"sqlite:///{tracking_dir}/bench.db",
                              checkpoint_dir=tracking_dir, log_model=False, synchronous=variant == "sync",
                              log_plots=False)
        log_every = 1
    if variant == "diagnostics":
        from distrnn.diagnostics import Diagnostics

        callbacks.append(Diagnostics(every_n_steps=a.diag_every, window=a.diag_window))
    trainer = L.Trainer(
        accelerator="gpu" if a.device == "cuda" else "cpu", devices=1, max_steps=a.warmup + a.steps,
        logger=logger, log_every_n_steps=log_every, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
    )
    t0 = time.perf_counter()
    trainer.fit(module, Streams(tokens, a.batch, a.k))
    if logger and logger.sender_stats:  # the sending thread's CPU time, as a share of the whole fit
        SENDER.setdefault(variant, []).append(logger.sender_stats["cpu_s"] / (time.perf_counter() - t0))
    return a.steps * a.batch * a.k / (timer.t1 - timer.t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--diag_every", type=int, default=25, help="measure often here, to time one measurement")
    p.add_argument("--diag_window", type=int, default=100)
    a = p.parse_args()
    path, glob = LOCAL_CORPORA["python_stdlib"]()
    tokens, _ = read_bytes(path, glob)
    tokens = tokens[: max(2_000_000, (a.warmup + a.steps + 2) * a.batch * a.k)]
    variants = ("off", "async", "sync", "diagnostics")
    speed: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tracking_dir:
        for _ in range(a.repeats):  # interleaved, so drift in machine speed hits all
            for v in variants:
                speed[v].append(run(tokens, a, tracking_dir, v))
    print(f"device={a.device} torch={torch.__version__} threads={torch.get_num_threads()} B={a.batch} k={a.k} "
          f"H={a.hidden} steps={a.steps} repeats={a.repeats}")
    med = {v: statistics.median(s) for v, s in speed.items()}
    names = {"off": "logging off", "async": "MLflow every step (async)", "sync": "MLflow every step (sync)",
             "diagnostics": f"async + Diagnostics every {a.diag_every}"}
    for v in variants:
        paired = statistics.median(o / s for o, s in zip(speed["off"], speed[v]))
        print(f"{names[v]:34s}: {med[v]:12,.0f} tokens/s   time x{paired:.3f} of off"
              f"   (runs: {', '.join(f'{x:,.0f}' for x in speed[v])})")
    for v, shares in SENDER.items():
        print(f"CPU time of the MLflow sending thread ({names[v]}): {100 * statistics.median(shares):.2f}% of the fit's wall time")
    # one measurement, in steps: the extra time of the diagnostics runs over the async runs
    per_step = a.batch * a.k
    extra_s = statistics.median(a.steps * per_step / d - a.steps * per_step / s
                                for d, s in zip(speed["diagnostics"], speed["async"]))
    n_meas = a.steps // a.diag_every
    step_s = per_step / med["async"]
    one = extra_s / max(n_meas, 1) / step_s
    print(f"one Diagnostics measurement (window {a.diag_window}, {n_meas} per run): {one:.1f} training steps;"
          f" at every_n_steps=500 that is {100 * one / 500:.2f}% of training time")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.filterwarnings("ignore")
    main()
