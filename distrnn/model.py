"""The model wrapper: input encoder, recurrent stack, task head.

It knows nothing of distributed training: strategies wrap it from outside.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from distrnn.config import NetworkConfig, TaskSpec
from distrnn import scan as _scan  # noqa: F401  (registers mingru and minlstm)
from distrnn.layers import build_recurrence
from distrnn.state import State, mask_state


class RecurrentModel(nn.Module):
    """``forward(x, state=None, reset_BT=None) -> (y_BTO, final_state)``.

    ``x`` is ``x_BT`` (token ids) or ``x_BTD`` (features). ``reset_BT[b, t]`` True zeroes row b's
    state before step t: a sequence ended there and another begins.
    """

    def __init__(self, network: NetworkConfig, task: TaskSpec) -> None:
        super().__init__()
        self.network = network
        self.task = task
        if task.vocab_size is not None:
            in_dim = network.embedding_dim or network.hidden_size
            self.encoder: nn.Module = nn.Embedding(task.vocab_size, in_dim)
        else:
            in_dim = task.input_dim
            self.encoder = nn.Identity()
        extra = dict(network.options)
        if network.nonlinearity:
            extra["nonlinearity"] = network.nonlinearity
        self.recurrence = build_recurrence(
            network.recurrence,
            input_size=in_dim,
            hidden_size=network.hidden_size,
            num_layers=network.num_layers,
            dropout=network.dropout,
            **extra,
        )
        self.head = nn.Linear(network.hidden_size, task.output_dim)

    def forward(
        self, x: Tensor, state: Optional[State] = None, reset_BT: Optional[Tensor] = None,
        cuts_T: Optional[Tensor] = None,
    ) -> tuple[Tensor, State]:
        h_BTH, state = self.hidden(x, state, reset_BT, cuts_T)
        return self.head(h_BTH), state

    def hidden(
        self, x: Tensor, state: Optional[State] = None, reset_BT: Optional[Tensor] = None,
        cuts_T: Optional[Tensor] = None, outputs: bool = True,
    ) -> tuple[Optional[Tensor], State]:
        """The last layer's hidden states; ``reset_BT`` (on the host) zeroes a row's state before a
        step: inside the scan for the layers that take resets, else by cutting the input there.
        ``cuts_T`` (host bools, with ``reset_BT``): more steps to cut at where the input is cut
        (the result is the same), so that processes whose rows reset at different steps call the
        layers equally often: under ZeRO-3 each call gathers the layer's parameters, a collective.
        ``outputs=False``: only the final state is read, and a layer that can (``skips_outputs``:
        the min* layers' Triton kernel, outside autograd) may skip writing the states (None)."""
        e = self.encoder(x)
        T = e.shape[1]
        kw = {"outputs": False} if not outputs and getattr(self.recurrence, "skips_outputs", False) else {}
        if reset_BT is None:
            return self.recurrence(e, state, **kw)
        if state is not None and reset_BT[:, 0].any():  # (all rows: the state is dropped, no device work)
            state = mask_state(state, ~reset_BT[:, 0])
        cut_T = reset_BT.any(dim=0) if cuts_T is None else reset_BT.any(dim=0) | cuts_T
        if T == 1 or not cut_T[1:].any():
            return self.recurrence(e, state, **kw)
        takes = getattr(self.recurrence, "takes_resets", None)
        if takes is not None and takes(e):
            # the scan zeroes the rows' states at their resets itself: one call, however many
            return self.recurrence(e, state, reset_BT=reset_BT, **kw)
        # cuDNN takes no resets: the input runs in as many pieces as there are steps where a row
        # resets (sequence boundaries: rare in long documents; each piece is a call per layer)
        starts = torch.nonzero(cut_T).flatten().tolist()
        bounds = sorted(set([0, *starts, T]))
        ys = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a > 0 and state is not None and reset_BT[:, a].any():  # (step 0: above)
                state = mask_state(state, ~reset_BT[:, a])
            y, state = self.recurrence(e[:, a:b], state)
            ys.append(y)
        return torch.cat(ys, dim=1), state

    @torch.no_grad()
    def step(self, x_B: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        """One step for streaming: ``x_B`` tokens (or ``x_BD`` features) -> ``(y_BO, state)``."""
        e = self.encoder(x_B)
        h, state = self.recurrence.step(e, state)
        return self.head(h), state
