"""Recurrent layers against naive loops and against themselves run in pieces (float64)."""

import pytest
import torch

from distrnn.config import NetworkConfig, TaskSpec
from distrnn.layers import RECURRENCES, Recurrence, build_recurrence, register_recurrence
from distrnn.model import RecurrentModel
from distrnn.state import mask_state

from conftest import gpu

B, T, D, H = 3, 17, 4, 5


pytestmark = pytest.mark.usefixtures("float64")


def _layer(name, **kw):
    torch.manual_seed(0)
    return build_recurrence(name, input_size=D, hidden_size=H, **kw).double()


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_elman_is_the_formula(nonlinearity):
    layer = _layer("elman", nonlinearity=nonlinearity)
    x = torch.randn(B, T, D)
    h0 = torch.randn(1, B, H)
    y, hT = layer(x, h0)
    W, U = layer.rnn.weight_ih_l0, layer.rnn.weight_hh_l0
    b = layer.rnn.bias_ih_l0 + layer.rnn.bias_hh_l0
    f = torch.tanh if nonlinearity == "tanh" else torch.relu
    h = h0[0]
    for t in range(T):
        h = f(x[:, t] @ W.T + h @ U.T + b)
        torch.testing.assert_close(y[:, t], h, rtol=0, atol=1e-12)
    torch.testing.assert_close(hT[0], h, rtol=0, atol=1e-12)


def test_lstm_matches_naive_cell_loop():
    layer = _layer("lstm")
    x = torch.randn(B, T, D)
    y, (hT, cT) = layer(x)
    r = layer.rnn
    h, c = torch.zeros(B, H), torch.zeros(B, H)
    for t in range(T):
        z = x[:, t] @ r.weight_ih_l0.T + r.bias_ih_l0 + h @ r.weight_hh_l0.T + r.bias_hh_l0
        i, f, g, o = z.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    torch.testing.assert_close(hT[0], h, rtol=0, atol=1e-12)
    torch.testing.assert_close(cT[0], c, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["elman", "lstm", "gru"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_state_carried_across_pieces_equals_one_pass(name, num_layers):
    layer = _layer(name, num_layers=num_layers)
    x = torch.randn(B, T, D)
    y_full, s_full = layer(x)
    y1, s = layer(x[:, :7])
    y2, s = layer(x[:, 7:], s)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=0, atol=1e-12)
    for a, b in zip(s if isinstance(s, tuple) else (s,), s_full if isinstance(s_full, tuple) else (s_full,)):
        assert a.shape == (num_layers, B, H)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["elman", "lstm", "gru"])
def test_step_equals_forward(name):
    layer = _layer(name)
    x = torch.randn(B, T, D)
    y_full, _ = layer(x)
    state = None
    for t in range(T):
        y_t, state = layer.step(x[:, t], state)
        torch.testing.assert_close(y_t, y_full[:, t], rtol=0, atol=1e-12)


def test_registry():
    assert {"elman", "lstm", "gru"} <= set(RECURRENCES)
    with pytest.raises(ValueError, match="model.network.recurrence: unknown recurrence 'nope'"):
        build_recurrence("nope", input_size=1, hidden_size=1)

    @register_recurrence("test_identity_rnn")
    class Identity(Recurrence):
        def forward(self, x, state=None):
            return x, x[:, -1][None]

    try:
        net = NetworkConfig(recurrence="test_identity_rnn", hidden_size=D)
        model = RecurrentModel(net, TaskSpec(kind="regression", output_dim=2, input_dim=D))
        y, s = model(torch.randn(B, T, D))
        assert y.shape == (B, T, 2) and s.shape == (1, B, D)
        with pytest.raises(ValueError, match="already registered"):
            register_recurrence("test_identity_rnn")(Identity)
    finally:
        RECURRENCES.pop("test_identity_rnn")


@pytest.mark.parametrize("name", ["elman", "lstm", "gru"])
def test_reset_mask_zeroes_exactly_the_rows_that_end(name):
    torch.manual_seed(0)
    model = RecurrentModel(NetworkConfig(recurrence=name, hidden_size=H, num_layers=2),
                           TaskSpec(kind="language_model", output_dim=7, vocab_size=7)).double()
    x = torch.randint(0, 7, (4, T))
    reset = torch.zeros(4, T, dtype=torch.bool)
    reset[1, 6] = True  # row 1 starts a new sequence at step 6
    reset[3, 11] = True
    state0 = tuple(s.clone() for s in (model(x[:, :3])[1] if name == "lstm" else (model(x[:, :3])[1],)))
    state0 = state0 if name == "lstm" else state0[0]
    y, _ = model(x, state0, reset)
    y_plain, _ = model(x, state0)
    # rows without a reset: untouched
    for r in (0, 2):
        torch.testing.assert_close(y[r], y_plain[r], rtol=0, atol=0)
    # rows with a reset: before it as if none, after it as if started from zero state there
    for r, t in ((1, 6), (3, 11)):
        torch.testing.assert_close(y[r, :t], y_plain[r, :t], rtol=0, atol=0)
        y_fresh, _ = model(x[r : r + 1, t:])
        torch.testing.assert_close(y[r, t:], y_fresh[0], rtol=0, atol=1e-12)
        assert not torch.allclose(y[r, t:], y_plain[r, t:])


def test_mask_state_zeroes_rows():
    s = (torch.ones(2, 4, 3), torch.ones(2, 4, 3))
    out = mask_state(s, torch.tensor([True, False, True, False]))
    for t in out:
        assert t[:, [1, 3]].abs().sum() == 0 and t[:, [0, 2]].abs().min() == 1


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["lstm", "gru", "elman"])
def test_cuda_long_inputs_run_in_pieces_equal_one_pass(name, monkeypatch):
    torch.manual_seed(0)
    layer = build_recurrence(name, input_size=8, hidden_size=16).cuda().float()
    x = torch.randn(2, 300, 8, device="cuda", dtype=torch.float32)
    y_ref, s_ref = layer.rnn(x)  # one cuDNN call
    monkeypatch.setattr(type(layer), "cuda_max_steps", 64)
    y, s = layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(s if isinstance(s, tuple) else (s,), s_ref if isinstance(s_ref, tuple) else (s_ref,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["lstm", "gru", "elman"])
def test_cpu_autocast_runs_on_any_cpu_and_falls_back_to_float32_exactly(name, monkeypatch):
    """Under CPU autocast (bf16-mixed on a CPU) every cuDNN-family layer runs, forward and
    backward, within bf16 of its float32 result, also on CPUs without AVX-512, where oneDNN has no
    low-precision LSTM and nn.LSTM fails. Where the layer falls back, it computes exactly its
    float32 result; finding out whether to fall back draws nothing from the random stream."""
    import distrnn.layers as layers

    torch.manual_seed(0)
    m = build_recurrence(name, input_size=5, hidden_size=12, num_layers=2).float()
    x = torch.randn(3, 9, 5, dtype=torch.float32)
    y32, _ = m(x)

    def run():
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, s = m(xg, None)
            y2, _ = m(xg, s)  # a carried state, as the next TBPTT window passes it
        y2.float().sum().backward()
        return y.float(), xg.grad

    y, g = run()
    torch.testing.assert_close(y, y32, atol=3e-2, rtol=3e-2)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    probe = layers._cpu_autocast_runs
    monkeypatch.setattr(layers, "_cpu_autocast_runs", lambda rnn, dtype: False)
    y_fallback, _ = run()
    assert torch.equal(y_fallback, y32)
    m.double()  # the fallback runs in the weights' dtype: a float64 model stays float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64, _ = m(x.double())
    assert y64.dtype == torch.float64 and torch.allclose(y64.float(), y32, atol=1e-5)
    rng = torch.get_rng_state()
    probe.__wrapped__(torch.nn.LSTM, torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), rng)
