"""DDP's cost in distrnn's TBPTT step, measured side by side (issue 4):

- ``single``: one process, no DDP (Lightning's default strategy);
- ``ddp1``: DDP at world size 1 (the same process wrapped in DistributedDataParallel, gloo/NCCL
  process group of one), with and without :class:`distrnn.checkpoint.CheckpointOnSigterm` (which
  the CLI always adds: one all-reduce of an integer per batch, read a batch later, and Lightning's
  own per-batch SIGTERM broadcast switched off; without it, that broadcast runs, read at once);
- ``ddp2``: two ranks, each with the per-rank batch of the others (global batch doubles);
  per-rank throughput against ``single``.

Every process uses ``--threads`` intra-op threads (1 by default: on a 2-core CPU two ranks then
get a core each, and the single process is held to the same one core, so the ratio is DDP's own
cost, not a share of cores). Variants run in fresh processes, interleaved over ``--repeats``.

    python benchmarks/bench_ddp.py
    python benchmarks/bench_ddp.py --device cuda --hidden 1024 --batch 64 --k 256   # GPUs: ranks = GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

VARIANTS = ("single", "ddp1", "ddp1_sigterm", "ddp2", "ddp2_sigterm")


def worker(a) -> None:
    import lightning as L
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_tbptt import Streams, Timer

    from distrnn.checkpoint import CheckpointOnSigterm
    from distrnn.config import NetworkConfig, OptimizerConfig, TaskSpec, TBPTTConfig
    from distrnn.data.text import LOCAL_CORPORA, read_bytes
    from distrnn.engine import TBPTTModule
    from distrnn.rendezvous import host_rendezvous_on_loopback

    torch.set_num_threads(a.threads)
    path, glob = LOCAL_CORPORA["python_stdlib"]()
    tokens, _ = read_bytes(path, glob)

    class RankStreams(Streams):
        def train_dataloader(self):
            from distrnn.data.loaders import StreamLoader

            t = self.trainer
            return StreamLoader(self.tokens, self.batch, self.k, rank=t.global_rank, world_size=t.world_size)

    class RankTimer(Timer):
        def on_train_end(self, trainer, pl_module):
            super().on_train_end(trainer, pl_module)
            rate = a.steps * a.batch * a.k / (self.t1 - self.t0)
            print("RESULT " + json.dumps({"rank": trainer.global_rank, "tokens_per_s": rate}), flush=True)

    torch.manual_seed(0)
    task = TaskSpec(kind="language_model", output_dim=256, vocab_size=256, seq_len=a.k)
    module = TBPTTModule(NetworkConfig(recurrence="lstm", hidden_size=a.hidden, embedding_dim=a.embed),
                         TBPTTConfig(mode="tbptt", k1=a.k), OptimizerConfig(name="adamw", lr=1e-3, clip_norm=1.0), task)
    v = a.variant
    callbacks = [RankTimer(a.warmup)] + ([CheckpointOnSigterm()] if v.endswith("sigterm") else [])
    strategy = "auto" if v == "single" else "ddp"
    devices = 2 if v.startswith("ddp2") else 1
    trainer = L.Trainer(accelerator="gpu" if a.device == "cuda" else "cpu", devices=devices, strategy=strategy,
                        max_steps=a.warmup + a.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    host_rendezvous_on_loopback(trainer)  # as `distrnn fit` does
    trainer.fit(module, RankStreams(tokens, a.batch, a.k))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="per rank")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        return worker(a)
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(a.threads)}
    for _ in range(a.repeats):
        for v in VARIANTS:
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--variant", v]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            results = [json.loads(ln[7:]) for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            if r.returncode != 0 or not results:
                sys.exit(f"variant {v} failed:\n{(r.stdout + r.stderr)[-3000:]}")
            rates[v].append(statistics.mean(x["tokens_per_s"] for x in results))  # per rank
    med = {v: statistics.median(x) for v, x in rates.items()}
    import torch

    print(f"device={a.device} torch={torch.__version__} threads/process={a.threads} B/rank={a.batch} k={a.k} "
          f"H={a.hidden} steps={a.steps} repeats={a.repeats}")
    for v in VARIANTS:
        print(f"{v:14s}: {med[v]:10,.0f} tokens/s per rank  x{med[v] / med['single']:.3f} of single"
              f"   (runs: {', '.join(f'{x:,.0f}' for x in rates[v])})")
    print(f"DDP at world size 1 / no DDP: time x{med['single'] / med['ddp1']:.3f} (goal <= 1.05);"
          f" with the SIGTERM agreement x{med['single'] / med['ddp1_sigterm']:.3f}")
    print(f"per-rank throughput at 2 ranks / 1 process: {med['ddp2'] / med['single']:.3f}"
          f" (with the SIGTERM agreement {med['ddp2_sigterm'] / med['single']:.3f})")


if __name__ == "__main__":
    main()
