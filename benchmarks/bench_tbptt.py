"""distrnn's TBPTT engine against a plain PyTorch TBPTT loop, side by side in one process.

Same model (byte embedding -> LSTM -> linear), same data (contiguous streams of one corpus), same
batch, chunk length, optimizer and clipping. distrnn runs through the Lightning Trainer with
MLflow logging on; the plain loop is the textbook ``for chunk: forward, backward, clip, step,
detach``. Printed: tokens/s of each and their ratio. Warm-up batches are excluded from both.

    python benchmarks/bench_tbptt.py                  # CPU sizes
    python benchmarks/bench_tbptt.py --device cuda --hidden 1024 --batch 64 --k 256 --steps 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import lightning as L
import torch
from torch import nn

from distrnn.config import NetworkConfig, OptimizerConfig, TaskSpec, TBPTTConfig
from distrnn.data.loaders import StreamLoader
from distrnn.data.text import LOCAL_CORPORA, read_bytes
from distrnn.engine import TBPTTModule


class Streams(L.LightningDataModule):
    def __init__(self, tokens, batch, k):
        super().__init__()
        self.tokens, self.batch, self.k = tokens, batch, k

    def train_dataloader(self):
        return StreamLoader(self.tokens, self.batch, self.k)


class Timer(L.Callback):
    def __init__(self, warmup):
        self.warmup, self.t0, self.t1, self.n = warmup, None, None, 0

    def on_train_batch_end(self, trainer, *args):
        self.n += 1
        if self.n == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t1 = time.perf_counter()


def run_distrnn(tokens, a, tracking_dir):
    torch.manual_seed(0)
    task = TaskSpec(kind="language_model", output_dim=256, vocab_size=256, seq_len=a.k)
    module = TBPTTModule(
        NetworkConfig(recurrence="lstm", hidden_size=a.hidden, embedding_dim=a.embed),
        TBPTTConfig(mode="tbptt", k1=a.k),
        OptimizerConfig(name="adamw", lr=1e-3, clip_norm=1.0),
        task,
    )
    timer = Timer(a.warmup)
    logger = False
    if not a.no_mlflow:
        from distrnn.tracking import MLflowLogger

        logger = MLflowLogger(experiment_name="bench", tracking_uri=f"sqlite:///{tracking_dir}/bench.db",
                              checkpoint_dir=tracking_dir, log_model=False)
    trainer = L.Trainer(
        accelerator="gpu" if a.device == "cuda" else "cpu", devices=1, max_steps=a.warmup + a.steps,
        logger=logger, log_every_n_steps=a.log_every, enable_checkpointing=False, enable_progress_bar=a.progress_bar,
        enable_model_summary=False, callbacks=[timer], precision=a.precision,
    )
    trainer.fit(module, Streams(tokens, a.batch, a.k))
    return a.steps * a.batch * a.k / (timer.t1 - timer.t0)


def run_plain(tokens, a):
    torch.manual_seed(0)
    dev = torch.device(a.device)
    emb = nn.Embedding(256, a.embed).to(dev)
    lstm = nn.LSTM(a.embed, a.hidden, batch_first=True).to(dev)
    head = nn.Linear(a.hidden, 256).to(dev)
    params = [*emb.parameters(), *lstm.parameters(), *head.parameters()]
    # the optimizer distrnn builds (fused: stop_on_nonfinite skips on the device), so the ratio is
    # the engine's own cost, not a choice of optimizer kernels
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    n = (tokens.numel() - 1) // a.batch
    data = tokens[: n * a.batch + 1]
    x_all = data[:-1].view(a.batch, n).long()
    y_all = data[1:].view(a.batch, n).long()
    state = None
    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(a.precision)
    autocast = torch.autocast(dev.type, dtype=half or torch.float32, enabled=half is not None)
    # fp16: PyTorch's loss scaler, sync-free with the fused optimizer (it hands the step its flag)
    scaler = torch.amp.GradScaler(dev.type, enabled=half is torch.float16)
    t0 = None
    for i in range(a.warmup + a.steps):
        s = (i * a.k) % (n - a.k)
        x = x_all[:, s : s + a.k].to(dev, non_blocking=True)
        y = y_all[:, s : s + a.k].to(dev, non_blocking=True)
        with autocast:
            h, state = lstm(emb(x), state)
            logits = head(h)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        scaler.step(opt)
        scaler.update()
        state = tuple(t.detach() for t in state)
        if i + 1 == a.warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return a.steps * a.batch * a.k / (time.perf_counter() - t0)


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
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--no_mlflow", action="store_true", help="logging off (a machine without mlflow)")
    p.add_argument("--progress_bar", action="store_true",
                   help="distrnn with Lightning's progress bar, as `distrnn fit` shows it (refreshed after every batch)")
    a = p.parse_args()
    path, glob = LOCAL_CORPORA["python_stdlib"]()
    tokens, _ = read_bytes(path, glob)
    tokens = tokens[: max(2_000_000, (a.warmup + a.steps + 2) * a.batch * a.k)]
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tracking_dir:
        for _ in range(a.repeats):  # interleaved, so drift in machine speed hits both
            plain.append(run_plain(tokens, a))
            ours.append(run_distrnn(tokens, a, tracking_dir))
    po, pp = statistics.median(ours), statistics.median(plain)
    print(f"device={a.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"B={a.batch} k={a.k} H={a.hidden} precision={a.precision} steps={a.steps} repeats={a.repeats} "
          f"mlflow={'off' if a.no_mlflow else 'on'} progress_bar={'on' if a.progress_bar else 'off'}")
    print(f"plain PyTorch TBPTT loop : {pp:12,.0f} tokens/s   (runs: {', '.join(f'{v:,.0f}' for v in plain)})")
    print(f"distrnn (Lightning)       : {po:12,.0f} tokens/s   (runs: {', '.join(f'{v:,.0f}' for v in ours)})")
    paired = statistics.median(o / p for o, p in zip(ours, plain))
    print(f"ratio distrnn / plain    : {po / pp:.3f} of medians, {paired:.3f} median of paired runs   (goal >= 0.95)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.filterwarnings("ignore")
    main()
