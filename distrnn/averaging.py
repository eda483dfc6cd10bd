"""An exponential moving average of the weights whose updates never wait for the GPU.

Lightning's ``EMAWeightAveraging`` keeps the average in PyTorch's ``AveragedModel``, whose
``update_parameters`` reads its update count on the host twice per update (``n_averaged == 0``,
``n_averaged > 0``: a device tensor) and then averages parameter by parameter (one Python call and
kernel or two per tensor). On a GPU each read drains the queue: the next update's kernels wait for
the host to issue them. :class:`EMAWeightAveraging` takes the same arguments and writes the same
checkpoints (it *is* Lightning's callback: the engine's checkpoint and validation handling of weight
averaging apply unchanged) with an ``AveragedModel`` that counts on the host too and averages every
floating tensor in one ``torch._foreach_lerp_``.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging as _LightningEMA
from torch.optim.swa_utils import AveragedModel


class _QueuedEMA(AveragedModel):
    """``AveragedModel`` with an EMA update that reads nothing on the host: the count it needs
    (whether this is the first update, which copies) is kept beside ``n_averaged`` on the host,
    read from the buffer once, at the first update after a construction or a load."""

    def __init__(self, *args: Any, decay: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decay = decay
        self._count: Optional[int] = None

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._count = None  # n_averaged restored: read it again
        return super().load_state_dict(*args, **kwargs)

    def _pairs(self, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.use_buffers:
            mine = itertools.chain(self.module.parameters(), self.module.buffers())
            theirs = itertools.chain(model.parameters(), model.buffers())
        else:
            mine, theirs = self.parameters(), model.parameters()
        avg, cur = [], []
        for a, m in zip(mine, theirs):
            avg.append(a.detach())
            cur.append(m.detach().to(a.device))
        return avg, cur

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        if self._count is None:
            self._count = int(self.n_averaged)
        avg, cur = self._pairs(model)
        if self._count == 0:
            torch._foreach_copy_(avg, cur)
        else:
            floating = [(a, c) for a, c in zip(avg, cur) if a.is_floating_point()]
            if floating:
                # avg + (1 - decay) (cur - avg): PyTorch's get_ema_avg_fn, decay avg + (1 - decay) cur
                torch._foreach_lerp_([a for a, _ in floating], [c for _, c in floating], 1.0 - self.decay)
            for a, c in zip(avg, cur):
                if not a.is_floating_point():  # counters (BatchNorm's): averaged and truncated, as AveragedModel does
                    a.copy_(self.decay * a + (1.0 - self.decay) * c)
        self.n_averaged += 1
        self._count += 1


class EMAWeightAveraging(_LightningEMA):
    """Lightning's ``EMAWeightAveraging`` (same arguments, checkpoints and schedule of updates:
    ``update_every_n_steps``, ``update_starting_at_step``/``_epoch``) whose average updates never
    wait for the GPU. In a config::

        trainer:
          callbacks:
            - class_path: distrnn.averaging.EMAWeightAveraging
              init_args: {decay: 0.999}
    """

    def __init__(self, device: Optional[Union[torch.device, str, int]] = None, use_buffers: bool = True, decay: float = 0.999,
                 update_every_n_steps: int = 1, update_starting_at_step: Optional[int] = None,
                 update_starting_at_epoch: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(device=device, use_buffers=use_buffers, decay=decay, update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step,
                         update_starting_at_epoch=update_starting_at_epoch, **kwargs)
        self.decay = decay

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return super().setup(trainer, pl_module, stage)
        # what Lightning's setup builds, with the update above (avg_fn stays in the kwargs, unused)
        self._average_model = _QueuedEMA(model=pl_module, device=self._device or pl_module.device,
                                         use_buffers=self._use_buffers, decay=self.decay, **self._kwargs)
