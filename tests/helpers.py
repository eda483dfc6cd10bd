"""Small builders shared by the tests."""

from __future__ import annotations

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


def make_module(task: TaskSpec, recurrence="lstm", hidden=6, layers=1, mode="tbptt", k1=5, k2=None,
                lr=1e-3, clip=None, name="sgd", dropout=0.0, seed=0, randomize=False) -> TBPTTModule:
    torch.manual_seed(seed)
    return TBPTTModule(
        NetworkConfig(recurrence=recurrence, hidden_size=hidden, num_layers=layers, dropout=dropout),
        TBPTTConfig(mode=mode, k1=k1, k2=k2, randomize=randomize),
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
