"""What a recurrent network does inside, measured during training.

- The vanishing/exploding-gradient curve: how much the loss at the end of a window depends on the
  hidden state at each earlier step, ``||dL/dh_t||`` over t (:func:`gradient_through_time`).
- Saturation of gates and hidden units (:func:`saturation`): the share of a gate's values within
  0.05 of 0 or 1, of tanh units beyond +-0.95, of ReLU units at 0. A saturated gate passes no
  gradient to its inputs.
- Gradient norms per layer (:func:`layer_grad_norms`), before clipping.

:class:`Diagnostics` logs all three to the run's loggers, and the curve as a PNG to MLflow.

The curve's window runs one step at a time through the layer's own stateful interface (so it works for
every registered recurrence, cuDNN ones included) with every carried state kept in the graph;
one backward pass of the loss at the window's last step fills ``dL/dh_t`` for all t. ``h_t`` is the
whole carried state (all layers; for an LSTM both h and c). Cost: T layer calls, so use a short
window (a few hundred steps) every few hundred updates.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from distrnn.checkpoint import PassedMultiple
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


SATURATED_GATE = 0.05  # a gate within this of 0 or 1
SATURATED_TANH = 0.95  # |tanh unit| beyond this


def saturation(probe: dict[str, tuple[Tensor, str]]) -> dict[str, float]:
    """``{"sat/{name}": share saturated, "mean/{name}": mean}`` for the bounded values of a
    :meth:`Recurrence.probe <distrnn.layers.Recurrence.probe>` (unbounded ones get only their mean)."""
    out: dict[str, float] = {}
    for name, (v, kind) in probe.items():
        v = v.detach().double()
        out[f"mean/{name}"] = float(v.mean())
        if kind == "sigmoid":
            sat = (v < SATURATED_GATE) | (v > 1 - SATURATED_GATE)
        elif kind == "tanh":
            sat = v.abs() > SATURATED_TANH
        elif kind == "relu":
            sat = v <= 0
        else:
            continue
        out[f"sat/{name}"] = float(sat.double().mean())
    return out


def _layer_of(param_name: str) -> str:
    """``encoder``, ``head`` or ``l{n}`` (the recurrence's layer n) for a RecurrentModel parameter."""
    top, _, rest = param_name.partition(".")
    if top != "recurrence":
        return top
    m = re.search(r"_l(\d+)(_reverse)?$", rest) or re.search(r"(?:^|\.)(\d+)\.", rest)
    return f"l{m.group(1)}" if m else "recurrence"


def layer_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """The L2 norm of the current gradients of each layer's parameters, ``{layer: norm}``."""
    sq: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            key = _layer_of(name)
            sq[key] = sq.get(key, 0) + p.grad.detach().double().pow(2).sum()
    return {k: float(v.sqrt()) for k, v in sq.items()}


class Diagnostics(Callback):
    """Every ``every_n_steps`` updates, on rank 0 (the weights are the same on every rank), logs:

    - ``diag/grad_norm/{encoder,l0,l1,...,head}``: gradient norms per layer before clipping (after
      the DDP all-reduce) of the update made after N updates, logged at step N (where
      ``train/grad_norm`` is logged when that update is the last of a batch:
      :func:`distrnn.engine.log_against_updates`);
    - after the batch that passed a multiple of ``every_n_steps`` updates (a TBPTT batch makes
      several), the gradient-through-time curve on the first ``window`` steps of that batch,
      with the updated weights: ``diag/grad_h_t{t}`` at five t, ``diag/grad_ratio`` (first / last
      step) and, with an MLflow logger, a PNG ``diagnostics/grad_through_time_step{N}.png``;
    - ``diag/sat/l{n}.{name}`` and ``diag/mean/l{n}.{name}`` for every gate and hidden unit over the
      same window (:func:`saturation`).

    Cost (``benchmarks/bench_logging.py``, in ``benchmarks/RESULTS.md``): a window costs about as
    much as ``2 * window`` steps of one sequence forward and backward, once per ``every_n_steps``.

    Args:
        every_n_steps: updates between measurements.
        window: steps of the measured window (the curve and the saturation statistics).
        curve: measure the gradient-through-time curve.
        gates: measure saturation.
        grad_norms: measure per-layer gradient norms.
        batch_rows: rows of the batch used for the curve and saturation (all when None).
    """

    def __init__(self, every_n_steps: int = 500, window: int = 100, curve: bool = True, gates: bool = True,
                 grad_norms: bool = True, batch_rows: Optional[int] = 8) -> None:
        if every_n_steps < 1 or window < 2:
            raise ValueError(f"Diagnostics: every_n_steps must be >= 1 and window >= 2, got {every_n_steps}, {window}")
        self.every_n_steps, self.window = every_n_steps, window
        self.curve, self.gates, self.grad_norms, self.batch_rows = curve, gates, grad_norms, batch_rows
        self._passed = PassedMultiple(every_n_steps)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._passed.start(trainer.global_step)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from distrnn.checkpoint import deepspeed_strategy

        strategy = deepspeed_strategy(trainer)
        if strategy is None:
            return
        # ZeRO reduces gradients into its own partitioned buffers (not p.grad), through hooks that
        # any backward pass fires, so no backward outside the engine's; ZeRO-3 also partitions the
        # parameters outside the engine's forward, so no probe either.
        off = []
        if self.grad_norms:
            self.grad_norms = False
            off.append("per-layer gradient norms")
        if self.curve:
            self.curve = False
            off.append("gradient-through-time curve")
        if strategy.zero_stage_3 and self.gates:
            self.gates = False
            off.append("saturation statistics")
        if off and trainer.is_global_zero:
            print(f"distrnn: warning: Diagnostics: no {', '.join(off)} under DeepSpeed ZeRO (stage"
                  f" {strategy.config.get('zero_optimization', {}).get('stage')})", flush=True)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Callbacks run before the module's hook, which clips: these are the raw gradients. Logged
        # at the count of earlier updates, the step of a batch's train/* metrics when it is the last.
        step = trainer.global_step
        if not self.grad_norms or step % self.every_n_steps or not trainer.is_global_zero:
            return
        metrics = {f"diag/grad_norm/{k}": v for k, v in layer_grad_norms(pl_module.model).items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # the batch the step just trained on (with dataloader_iter steps, the start hook sees the
        # previous one), measured with the updated weights
        # a TBPTT batch makes several updates: measured after the batch that passed a multiple of n
        if not self._passed(trainer.global_step) or not trainer.is_global_zero or not isinstance(batch, dict):
            return
        if not (self.curve or self.gates):
            return
        rows = slice(None, self.batch_rows)
        x = batch["x"][rows, : self.window].to(pl_module.device)
        y = batch["y"][rows, : self.window].to(pl_module.device)
        if x.is_floating_point():
            x = x.to(pl_module.dtype)
        metrics: dict[str, float] = {}
        model = pl_module.model
        if self.gates:  # the probe is a reference loop without dropout
            try:
                with torch.no_grad():
                    stats = saturation(model.recurrence.probe(model.encoder(x)))
                metrics.update({f"diag/{k}": v for k, v in stats.items()})
            except NotImplementedError as e:  # a user's recurrence without a probe
                self.gates = False
                print(f"distrnn: warning: Diagnostics: no saturation statistics ({e})", flush=True)
        curve = None
        if self.curve:  # in training mode: cuDNN's RNN backward refuses eval mode
            with torch.enable_grad():
                curve = gradient_through_time(model, x, y, pl_module.task)
            T = curve.numel()
            metrics.update({f"diag/grad_h_t{t}": float(curve[t]) for t in sorted({0, T // 4, T // 2, 3 * T // 4, T - 1})})
            metrics["diag/grad_ratio"] = float(curve[0] / curve[-1].clamp_min(1e-30))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if curve is not None:
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
