"""The vanishing/exploding-gradient curve: how much the loss at the end of a window depends on the
hidden state at each earlier step, ``||dL/dh_t||`` over t.

The window runs one step at a time through the layer's own stateful interface (so it works for
every registered recurrence, cuDNN ones included) with every carried state kept in the graph;
one backward pass of the loss at the window's last step fills ``dL/dh_t`` for all t. ``h_t`` is the
whole carried state (all layers; for an LSTM both h and c). Cost: T layer calls, so use a short
window (a few hundred steps) every few hundred updates.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from distrnn.state import state_tensors


def gradient_through_time(model: Any, x: Tensor, y: Tensor, task: Any, state: Optional[Any] = None) -> Tensor:
    """``||dL/dh_t||`` for t = 0..T-2 (batch summed), ``h_t`` the state carried out of step t and L
    the task loss at the last step T-1 (whose own output does not pass through a carried state)."""
    from distrnn.bptt import loss_sum

    e = model.encoder(x)
    T = e.shape[1]
    states = []
    out = None
    for t in range(T):
        out, state = model.recurrence(e[:, t : t + 1], state)
        for s in state_tensors(state):
            s.retain_grad()
        states.append(state)
    y_hat = model.head(out)
    mask = torch.ones(y_hat.shape[:2], dtype=torch.bool, device=y_hat.device)
    loss = loss_sum(y_hat, y[:, T - 1 : T], mask, task) / mask.sum()
    loss.backward()
    norms = []
    for st in states[:-1]:
        grads = [s.grad for s in state_tensors(st) if s.grad is not None]
        norms.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)) if grads else torch.tensor(0.0))
    model.zero_grad(set_to_none=True)
    return torch.stack([n.float().cpu() for n in norms])


class GradientThroughTime(Callback):
    """Every ``every_n_steps`` updates: the curve on the first ``window`` steps of the batch just trained on,
    logged as metrics ``diag/grad_h_t{t}`` (at a few t), ``diag/grad_ratio`` (first / last step)
    and, with an MLflow logger, a PNG ``diagnostics/grad_through_time_step{N}.png``.

    Args:
        every_n_steps: updates between measurements.
        window: steps of the measured window.
    """

    def __init__(self, every_n_steps: int = 500, window: int = 100) -> None:
        self.every_n_steps, self.window = every_n_steps, window

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # the batch the step just trained on (with dataloader_iter steps, the start hook sees the
        # previous one), measured with the updated weights
        if trainer.global_step % self.every_n_steps or not trainer.is_global_zero or not isinstance(batch, dict):
            return
        x, y = batch["x"][:, : self.window].to(pl_module.device), batch["y"][:, : self.window].to(pl_module.device)
        with torch.enable_grad():
            curve = gradient_through_time(pl_module.model, x, y, pl_module.task)
        T = curve.numel()
        metrics = {f"diag/grad_h_t{t}": float(curve[t]) for t in sorted({0, T // 4, T // 2, 3 * T // 4, T - 1})}
        metrics["diag/grad_ratio"] = float(curve[0] / curve[-1].clamp_min(1e-30))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._plot(trainer, curve)

    def _plot(self, trainer: Trainer, curve: Tensor) -> None:
        from lightning.pytorch.loggers import MLFlowLogger

        logger = trainer.logger
        if not isinstance(logger, MLFlowLogger) or not logger.run_id:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.semilogy(range(curve.numel()), curve.clamp_min(1e-30).numpy())
        ax.set_xlabel("step t in the window")
        ax.set_ylabel("||dL_T / dh_t||")
        ax.set_title(f"gradient through time, update {trainer.global_step}")
        fig.tight_layout()
        logger.experiment.log_figure(logger.run_id, fig, f"diagnostics/grad_through_time_step{trainer.global_step}.png")
        plt.close(fig)
