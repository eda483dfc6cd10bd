"""Small builders shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from distrnn.config import NetworkConfig, OptimizerConfig, TaskSpec, TBPTTConfig
from distrnn.engine import TBPTTModule


class ListDataModule(L.LightningDataModule):
    """Serves prepared batches through the same resumable loader protocol as the real ones."""

    def __init__(self, loader):
        super().__init__()
        self.loader = loader

    def train_dataloader(self):
        if self.trainer is not None:
            trainer = self.trainer
            self.loader.bind_epoch(lambda: trainer.current_epoch)
        return self.loader


class GradRecorder(L.Callback):
    """Records the gradients seen by every optimizer step (before clipping)."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


class LogAllReduce(L.Callback):
    """DDP's default gradient all-reduce, each call logged as a line with the rank in ``path``
    (registered here: Lightning registers a strategy's ``ddp_comm_hook`` on CUDA only)."""

    def __init__(self, path):
        self.path = str(path)

    def on_train_start(self, trainer, pl_module):
        trainer.strategy.model.register_comm_hook(self.path, _logged_allreduce)


def _logged_allreduce(path, bucket):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    with open(path, "a") as f:
        f.write(f"{dist.get_rank()}\n")
    return allreduce_hook(None, bucket)


def make_module(task: TaskSpec, recurrence="lstm", hidden=6, layers=1, mode="tbptt", k1=5, k2=None,
                lr=1e-3, clip=None, name="sgd", dropout=0.0, seed=0, randomize=False, micro_batch_size=None) -> TBPTTModule:
    torch.manual_seed(seed)
    return TBPTTModule(
        NetworkConfig(recurrence=recurrence, hidden_size=hidden, num_layers=layers, dropout=dropout),
        TBPTTConfig(mode=mode, k1=k1, k2=k2, randomize=randomize, micro_batch_size=micro_batch_size),
        OptimizerConfig(name=name, lr=lr, clip_norm=clip),
        task,
        seed=seed,
    )


def trainer(**kw) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    defaults.update(kw)
    return L.Trainer(**defaults)


def against_deepspeed_universal(ds_dir, converted_file) -> dict:
    """How far ``distrnn convert-checkpoint``'s file (``converted_file``, written from the DeepSpeed
    directory ``ds_dir``) is from DeepSpeed's own per-parameter view of the same directory: its
    universal-checkpoint converter (``deepspeed.checkpoint.ds_to_universal``, a separate
    implementation of the shard joins) writes each parameter's fp32 weights and Adam moments to
    files of their own. Max absolute differences, and whether the parameter names agree."""
    import contextlib
    import io
    import sys
    import tempfile
    from pathlib import Path
    from unittest import mock

    from deepspeed.checkpoint import ds_to_universal

    converted = torch.load(converted_file, map_location="cpu", weights_only=True)
    names = list(converted["state_dict"])
    state = converted["optimizer_states"][0]["state"]
    with tempfile.TemporaryDirectory() as out:
        # its command line, in this process (DeepSpeed is imported already; a process costs ~3 s)
        argv = ["ds_to_universal", "--input_folder", str(Path(ds_dir) / "checkpoint"), "--output_folder", out,
                "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
        with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(ds_to_universal.parse_arguments())
        zero = Path(out) / "zero"
        diff = {"names": sorted(p.name for p in zero.iterdir() if p.is_dir()) == sorted(names),
                "weights": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
        for i, name in enumerate(names):
            mine = {"weights": converted["state_dict"][name], **{k: state[i][k] for k in ("exp_avg", "exp_avg_sq")}}
            for key, file in (("weights", "fp32"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
                theirs = torch.load(zero / name / f"{file}.pt", map_location="cpu", weights_only=False)
                theirs = theirs["param"] if isinstance(theirs, dict) else theirs  # (DeepSpeed's file format varies)
                diff[key] = max(diff[key], (mine[key].float() - theirs.float().view_as(mine[key])).abs().max().item())
    return diff


def run_probe(cwd: Path, script: str, *args: str, drop=lambda name: False, **env: str) -> dict:
    """Runs ``script`` with ``args`` in a fresh Python process in ``cwd`` (settings made once per
    process are seen there from the start), without the environment's variables that ``drop``
    names and with ``env``; returns the JSON it printed after ``PROBE``."""
    environ = {k: v for k, v in os.environ.items() if not drop(k)}
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                       env={**environ, **env})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return json.loads(r.stdout.split("PROBE ")[-1])
