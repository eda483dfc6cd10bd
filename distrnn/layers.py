"""Recurrent layers behind one stateful interface, and the registry that names them.

Every layer maps ``x_BTD`` and an optional state to ``(y_BTH, final_state)``; the state layout is
described in :mod:`distrnn.state`. ``step`` runs one time step, for streaming generation.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal, Optional

import torch
from torch import Tensor, nn

from distrnn.state import State

RECURRENCES: dict[str, type["Recurrence"]] = {}


def register_recurrence(name: str) -> Callable[[type["Recurrence"]], type["Recurrence"]]:
    def add(cls: type["Recurrence"]) -> type["Recurrence"]:
        if name in RECURRENCES:
            raise ValueError(f"recurrence {name!r} is already registered by {RECURRENCES[name].__qualname__}")
        RECURRENCES[name] = cls
        cls.registry_name = name
        return cls

    return add


def build_recurrence(name: str, **kwargs) -> "Recurrence":
    import distrnn.scan  # noqa: F401  (registers mingru and minlstm: it imports this module, so not above)

    if name not in RECURRENCES:
        raise ValueError(f"model.network.recurrence: unknown recurrence {name!r}; registered: {sorted(RECURRENCES)}")
    try:
        return RECURRENCES[name](**kwargs)
    except TypeError as e:  # an option the layer does not take
        raise ValueError(f"model.network.options: {name}: {e}") from None


class Recurrence(nn.Module):
    """Base class: ``forward(x_BTD, state=None) -> (y_BTH, final_state)``."""

    registry_name: str = ""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = dropout

    def forward(self, x_BTD: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        raise NotImplementedError

    def step(self, x_BD: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        y_B1H, state = self.forward(x_BD.unsqueeze(1), state)
        return y_B1H.squeeze(1), state

    def probe(self, x_BTD: Tensor, state: Optional[State] = None) -> dict[str, tuple[Tensor, str]]:
        """The layer's internals over a window, for diagnostics: ``{"l{layer}.{name}": (values_BTH,
        kind)}`` with kind ``sigmoid`` (a gate in (0, 1)), ``tanh`` (in (-1, 1)), ``relu`` or
        ``linear`` (unbounded), recomputed from the weights by a reference loop (cuDNN keeps its
        gates to itself). Includes every layer's hidden states ``h``, which equal ``forward``'s
        (the tests check that). Evaluation semantics: no dropout between layers."""
        raise NotImplementedError(f"{type(self).__name__} has no probe")


@functools.lru_cache(maxsize=None)
def _cpu_autocast_runs(rnn: type, dtype: torch.dtype) -> bool:
    """Whether this CPU runs ``rnn`` under autocast to ``dtype``: tried once on a tiny layer
    (whose initialization leaves the random stream as it was: a resumed run draws what an
    uninterrupted one does)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            rnn(2, 2, batch_first=True, dtype=torch.float32)(torch.zeros(1, 1, 2, dtype=torch.float32))
        return True
    except RuntimeError:
        return False


def _cast_state(state: Optional[State], dtype: torch.dtype) -> Optional[State]:
    if state is None:
        return None
    return state.to(dtype) if isinstance(state, Tensor) else tuple(s.to(dtype) for s in state)


class _CudnnRecurrence(Recurrence):
    """Shared body of the layers that run on ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (cuDNN on a GPU).

    cuDNN has been seen to stall for minutes on a single bf16 LSTM call at T=4096 (B=64, H=1024)
    while T=2048 takes 50 ms, so long inputs on CUDA are fed through in pieces of
    ``cuda_max_steps`` with the state carried: the result is the same as one long call.
    """

    cuda_max_steps: int = 2048
    rnn: nn.RNNBase

    def forward(self, x_BTD: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        T = x_BTD.shape[1]
        if not x_BTD.is_cuda and torch.is_autocast_enabled("cpu") and not _cpu_autocast_runs(type(self.rnn), torch.get_autocast_dtype("cpu")):
            # CPU autocast sends nn.LSTM to oneDNN's bf16/fp16 kernel, which CPUs without AVX-512
            # (AMD before Zen 4, most laptops) lack: "could not create a primitive descriptor for
            # the LSTM forward propagation primitive". The layer runs in its weights' dtype there
            # (float32 under bf16-mixed), as nn.GRU does under CPU autocast anyway.
            dtype = self.rnn.weight_ih_l0.dtype
            with torch.autocast("cpu", enabled=False):
                return self.rnn(x_BTD.to(dtype), _cast_state(state, dtype))
        if not x_BTD.is_cuda or T <= self.cuda_max_steps:
            return self.rnn(x_BTD, state)
        ys = []
        for start in range(0, T, self.cuda_max_steps):
            y, state = self.rnn(x_BTD[:, start : start + self.cuda_max_steps], state)
            ys.append(y)
        return torch.cat(ys, dim=1), state

    def probe(self, x_BTD: Tensor, state: Optional[State] = None) -> dict[str, tuple[Tensor, str]]:
        B, T = x_BTD.shape[:2]
        lstm = isinstance(self.rnn, nn.LSTM)
        if state is None:
            zeros = x_BTD.new_zeros(self.num_layers, B, self.hidden_size)
            state = (zeros, zeros) if lstm else zeros
        out: dict[str, tuple[Tensor, str]] = {}
        inp = x_BTD
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = (getattr(self.rnn, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            gx_BTG = inp @ w_ih.T + b_ih  # the input's share of every step at once
            h = state[0][layer] if lstm else state[layer]
            c = state[1][layer] if lstm else None
            rows: dict[str, list[Tensor]] = {}
            for t in range(T):
                new = self._cell(gx_BTG[:, t], h @ w_hh.T + b_hh, h, c)
                h, c = new["h"][0], new.get("c", (None,))[0]
                for k, (v, _) in new.items():
                    rows.setdefault(k, []).append(v)
            for k, vs in rows.items():
                out[f"l{layer}.{k}"] = (torch.stack(vs, dim=1), new[k][1])
            inp = out[f"l{layer}.h"][0]
        return out

    def _cell(self, gx: Tensor, gh: Tensor, h: Tensor, c: Optional[Tensor]) -> dict[str, tuple[Tensor, str]]:
        raise NotImplementedError


@register_recurrence("elman")
class ElmanRNN(_CudnnRecurrence):
    """Elman RNN, ``h_t = f(W x_t + U h_{t-1} + b)`` with f in {tanh, relu}.

    ``nn.RNN`` keeps two bias vectors (b_ih + b_hh); their sum is the b of the formula. The output
    ``y_t = g(V h_t + c)`` is the task head of :class:`distrnn.model.RecurrentModel`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        nonlinearity: Literal["tanh", "relu"] = "tanh",
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, dropout)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"model.network.nonlinearity: must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.rnn = nn.RNN(
            input_size, hidden_size, num_layers, nonlinearity=nonlinearity, batch_first=True, dropout=dropout
        )
        self.nonlinearity = nonlinearity

    def _cell(self, gx: Tensor, gh: Tensor, h: Tensor, c: Optional[Tensor]) -> dict[str, tuple[Tensor, str]]:
        pre = gx + gh
        return {"h": (torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre), self.nonlinearity)}


@register_recurrence("lstm")
class LSTM(_CudnnRecurrence):
    """LSTM on ``nn.LSTM``; state ``(h_LBH, c_LBH)``.

    ``forget_bias`` (default 1.0, ``network.options``) initializes the forget gates' bias so that
    the cell starts by keeping its memory (Jozefowicz et al. 2015; Keras' ``unit_forget_bias``):
    with PyTorch's zero-mean init the forget gate starts at 0.5 and gradients through the cell
    vanish as fast as a tanh RNN's. ``forget_bias: 0`` keeps PyTorch's initialization.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 forget_bias: float = 1.0) -> None:
        super().__init__(input_size, hidden_size, num_layers, dropout)
        self.rnn = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True, dropout=dropout)
        if forget_bias:
            H = hidden_size
            with torch.no_grad():
                for layer in range(num_layers):  # gate order i, f, g, o
                    getattr(self.rnn, f"bias_ih_l{layer}")[H : 2 * H].fill_(forget_bias)
                    getattr(self.rnn, f"bias_hh_l{layer}")[H : 2 * H].zero_()

    def _cell(self, gx: Tensor, gh: Tensor, h: Tensor, c: Optional[Tensor]) -> dict[str, tuple[Tensor, str]]:
        i, f, g, o = (gx + gh).chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        return {"h": (o * torch.tanh(c), "tanh"), "c": (c, "linear"), "i": (i, "sigmoid"), "f": (f, "sigmoid"),
                "g": (g, "tanh"), "o": (o, "sigmoid")}


@register_recurrence("gru")
class GRU(_CudnnRecurrence):
    """GRU on ``nn.GRU``; state ``h_LBH``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__(input_size, hidden_size, num_layers, dropout)
        self.rnn = nn.GRU(input_size, hidden_size, num_layers, batch_first=True, dropout=dropout)

    def _cell(self, gx: Tensor, gh: Tensor, h: Tensor, c: Optional[Tensor]) -> dict[str, tuple[Tensor, str]]:
        xr, xz, xn = gx.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return {"h": ((1 - z) * n + z * h, "tanh"), "r": (r, "sigmoid"), "z": (z, "sigmoid"), "n": (n, "tanh")}
