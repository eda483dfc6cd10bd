"""minGRU and minLSTM: the log-space parallel scan and the loop with its hand-written backward
against the sequential reference loop (float64)."""

import pytest
import torch

from distrnn.config import NetworkConfig, TaskSpec
from distrnn.layers import build_recurrence
from distrnn.model import RecurrentModel
from distrnn.scan import g, log_g, scan_log

from helpers import ListDataModule, make_module, trainer


pytestmark = pytest.mark.usefixtures("float64")


def test_log_g_is_log_of_g():
    x = torch.linspace(-20, 20, 1001)
    torch.testing.assert_close(log_g(x), torch.log(g(x)), rtol=0, atol=1e-12)
    assert (g(x) > 0).all()


def test_scan_log_equals_loop():
    torch.manual_seed(0)
    a = torch.rand(3, 50, 4) * 0.9 + 0.05
    b = torch.rand(3, 50, 4)
    h0 = torch.rand(3, 4) + 0.1
    h, hs = h0, []
    for t in range(50):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    torch.testing.assert_close(scan_log(a.log(), b.log(), h0), torch.stack(hs, 1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", ["eager", "loop"])
@pytest.mark.parametrize("name", ["mingru", "minlstm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parallel_equals_sequential_forward_and_backward(name, seed, backend):
    torch.manual_seed(seed)
    B, T, D, H, L = torch.randint(1, 5, ()).item(), torch.randint(2, 90, ()).item(), 3, 5, torch.randint(1, 4, ()).item()
    layer = build_recurrence(name, input_size=D, hidden_size=H, num_layers=L, norm=bool(seed % 2), residual=True,
                             scan_chunk=int(torch.randint(3, 40, ()).item()), backend=backend)
    x = torch.randn(B, T, D, requires_grad=True)
    h0 = (torch.rand(L, B, H) + 0.05).requires_grad_()

    def run(parallel):
        layer.parallel = parallel
        layer.zero_grad()
        x.grad = h0.grad = None
        y, hT = layer(x, h0)
        (y.pow(2).sum() + hT.sin().sum()).backward()
        return y.detach(), hT.detach(), x.grad.clone(), h0.grad.clone(), [p.grad.clone() for p in layer.parameters()]

    par, seq = run(True), run(False)
    for a, b in zip(par[:4], seq[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert seq[3].abs().sum() > 0  # the initial state's gradient is really there
    for a, b in zip(par[4], seq[4]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", ["eager", "loop"])
@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_stream_in_chunks_equals_one_long_scan_and_step(name, backend):
    torch.manual_seed(0)
    layer = build_recurrence(name, input_size=4, hidden_size=6, num_layers=2, backend=backend)
    x = torch.randn(2, 200, 4)
    y_full, s_full = layer(x)
    ys, s = [], None
    for a in range(0, 200, 37):
        y, s = layer(x[:, a : a + 37], s)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=0, atol=1e-10)
    torch.testing.assert_close(s, s_full, rtol=0, atol=1e-10)
    s = None
    for t in range(200):
        y_t, s = layer.step(x[:, t], s)
    torch.testing.assert_close(y_t, y_full[:, -1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["mingru", "minlstm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_resets_inside_the_scan_equal_cutting_the_input(name, seed):
    """A window whose rows reset at random steps (documents in a stream) runs as one call per
    layer in the loops (the CPU's scan and the sequential reference): outputs, final state and
    the gradients of the input, the initial state and every weight equal those of the input cut
    at the resets and run piece by piece through the log-space scan (float64), which is what the
    model does for layers that take no resets. A reset at step 0 zeroes the initial state's
    gradient for that row."""
    torch.manual_seed(seed)
    B, T, D, H, L = 4, int(torch.randint(20, 80, ()).item()), 3, 5, 2
    task = TaskSpec(kind="regression", output_dim=2, input_dim=D)
    models = {}
    for backend in ("loop", "sequential", "eager"):
        opts = {"norm": True, "residual": True, "backend": "loop" if backend == "sequential" else backend}
        models[backend] = RecurrentModel(NetworkConfig(recurrence=name, hidden_size=H, num_layers=L, options=opts), task)
        models[backend].load_state_dict(models["loop"].state_dict())
    models["sequential"].recurrence.parallel = False
    x = torch.randn(B, T, D)
    h0 = torch.rand(L, B, H) + 0.05
    reset = torch.rand(B, T) < 0.08
    reset[0, 0], reset[1, 0] = True, False
    calls, outs = [], {}
    for backend, model in models.items():
        forward = model.recurrence.forward
        model.recurrence.forward = lambda *a, _f=forward, _b=backend, **k: (calls.append(_b), _f(*a, **k))[1]
        xi, hi = x.clone().requires_grad_(), h0.clone().requires_grad_()
        y, hT = model(xi, hi, reset)
        (y.pow(2).sum() + hT.sin().sum()).backward()
        outs[backend] = [y, hT, xi.grad, hi.grad, *[p.grad for p in model.parameters()]]
    pieces = int(reset[:, 1:].any(0).sum()) + 1
    assert pieces > 3 and calls == ["loop", "sequential"] + ["eager"] * pieces
    for backend in ("loop", "sequential"):
        for got, want in zip(outs[backend], outs["eager"]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    dh0 = outs["loop"][3]
    assert dh0[:, 0].abs().max() == 0 and dh0[:, 1].abs().min() > 0


@pytest.mark.parametrize("T", [1, 2, 15, 16, 41, 300])
def test_linear_scan_equals_the_loop_with_autograd_and_is_the_cpu_default(T):
    """The chunked scan and its hand-written backward against autograd through the plain loop,
    with a gradient that does not need every input (no dL/da) and coefficients that are 0 (a
    reset) or 1; lengths that are stepped alone (1, 2, 15), chunked exactly (16 forward: 2 chunks
    of 8) or with steps left over (41 forward: 5 chunks of 8 and 1 step; 300 backward, 299 steps:
    24 chunks of 12 and 11 steps); float32 on a CPU picks it."""
    from distrnn.scan import linear_scan

    torch.manual_seed(T)
    a = torch.rand(3, T, 5) * 0.98 + 0.01
    a[0, T // 2, :2], a[1, T // 3, 3], a[2, -1, 4], a[2, :T // 4, 1] = 0, 0, 1, 1
    a.requires_grad_()
    b = torch.randn(3, T, 5, requires_grad=True)
    h0 = torch.randn(3, 5, requires_grad=True)
    w = torch.randn(3, T, 5)
    h, hs = h0, []
    for t in range(T):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    ref = torch.stack(hs, 1)
    ref_grads = torch.autograd.grad((ref * w).sum(), (a, b, h0), retain_graph=True)
    out = linear_scan(a, b, h0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for got, want in zip(torch.autograd.grad((out * w).sum(), (a, b, h0)), ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    db, = torch.autograd.grad((linear_scan(a.detach(), b, h0.detach()) * w).sum(), (b,))
    torch.testing.assert_close(db, ref_grads[1], rtol=0, atol=1e-12)
    # the upstream gradient of a sum is one number expanded (strides 0): read as autograd hands it
    dh0, = torch.autograd.grad(linear_scan(a.detach(), b.detach(), h0).sum(), (h0,))
    want, = torch.autograd.grad(ref.sum(), (h0,))
    torch.testing.assert_close(dh0, want, rtol=0, atol=1e-12)
    layer = build_recurrence("mingru", input_size=2, hidden_size=3)
    assert layer._backend(torch.zeros(1, 1, 6, dtype=torch.float32)) == "loop"
    assert layer._backend(torch.zeros(1, 1, 6, dtype=torch.float64)) == "eager"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_cpu_compile_backend_compiles_the_gates_of_the_loop(name, monkeypatch):
    """``backend: compile`` on a CPU: the loop with its gates compiled (C++ from torch.compile)
    equals the sequential reference in float64 (outputs, final state, the gradients of the input,
    the initial state and every weight), with rows that reset inside the window, across shapes that
    share one compilation (a batch or a window of one: eager gates, no compilation more); float32
    stays within rounding of the uncompiled loop. Without a C++ compiler it is refused before a
    run, naming the option."""
    from torch._dynamo.utils import counters

    from distrnn import scan

    torch.manual_seed(3)
    layer = build_recurrence(name, input_size=3, hidden_size=5, num_layers=2, norm=True, residual=True, backend="compile")
    graphs = None
    for B, T in ((3, 41), (2, 67), (1, 30), (3, 1)):
        if B == 1 and graphs is None:
            graphs = counters["stats"]["unique_graphs"]
        x = torch.randn(B, T, 3)
        h0 = torch.rand(2, B, 5) + 0.05
        reset = torch.rand(B, T) < 0.1
        reset[0, min(5, T - 1)] = True
        outs = []
        for parallel in (True, False):
            layer.parallel = parallel
            layer.zero_grad()
            xi, hi = x.clone().requires_grad_(), h0.clone().requires_grad_()
            y, hT = layer(xi, hi, reset_BT=reset)
            (y.pow(2).sum() + hT.sin().sum()).backward()
            outs.append([y, hT, xi.grad, hi.grad, *[p.grad.clone() for p in layer.parameters()]])
        for got, want in zip(*outs):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert type(layer).linear_coefficients in scan._COMPILED  # the gates really went through torch.compile
    assert counters["stats"]["unique_graphs"] == graphs  # sizes of one compiled nothing more
    layer32 = build_recurrence(name, input_size=3, hidden_size=5, num_layers=2, backend="compile").float()
    loop32 = build_recurrence(name, input_size=3, hidden_size=5, num_layers=2, backend="loop").float()
    loop32.load_state_dict(layer32.state_dict())
    x32 = torch.randn(2, 50, 3, dtype=torch.float32)
    torch.testing.assert_close(layer32(x32)[0], loop32(x32)[0], rtol=1e-5, atol=1e-6)
    assert build_recurrence(name, input_size=3, hidden_size=5)._backend(x32) == "loop"  # still the CPU's default
    layer.check_device("cpu")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(ValueError, match=r"model.network.options.backend: compile on a CPU .*C\+\+ compiler"):
        layer.check_device("cpu")


def test_cuda_without_triton_runs_the_plain_scan_and_refuses_compile(monkeypatch):
    """torch.compile generates GPU code with Triton: on CUDA without it the default is the plain
    log-space scan (compile would fail in the first forward, inside training), and an explicit
    ``compile`` or ``triton`` is refused before a run, naming the option."""
    from types import SimpleNamespace

    from distrnn import scan

    monkeypatch.setattr(scan, "_triton_available", lambda: False)
    cuda_z = SimpleNamespace(dtype=torch.float32, is_cuda=True)  # what _backend reads of a CUDA tensor
    assert build_recurrence("mingru", input_size=2, hidden_size=3)._backend(cuda_z) == "eager"
    for backend in ("compile", "triton"):
        layer = build_recurrence("mingru", input_size=2, hidden_size=3, backend=backend)
        with pytest.raises(ValueError, match=f"model.network.options.backend: {backend} .*(not installed|pip install triton)"):
            layer.check_device("cuda")
    monkeypatch.setattr(scan, "_triton_available", lambda: True)
    assert build_recurrence("mingru", input_size=2, hidden_size=3)._backend(cuda_z) == "triton"
    build_recurrence("mingru", input_size=2, hidden_size=3, backend="compile").check_device("cuda")


def test_bf16_and_fp16_stay_finite_and_close():
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    layer = build_recurrence("mingru", input_size=8, hidden_size=16, num_layers=2)
    x = torch.randn(2, 3000, 8)
    ref, _ = layer(x)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            y, s = layer(x)
        assert torch.isfinite(y).all() and torch.isfinite(s).all()
        assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_mingru_trains_through_the_engine_and_options_are_checked():
    task = TaskSpec(kind="regression", output_dim=1, input_dim=2, seq_len=50)
    from distrnn.data.loaders import GeneratedLoader
    from distrnn.data.synthetic import adding_problem

    loader = GeneratedLoader(lambda gen, B: adding_problem(gen, B, 50), 16, 30, seed=0)
    module = make_module(task, recurrence="mingru", hidden=16, mode="full", k1=50, name="adamw", lr=3e-3)
    trainer(max_epochs=2).fit(module, ListDataModule(loader))
    assert module._carry.state.shape == (1, 16, 16)
    with pytest.raises(ValueError, match="model.network.options"):
        RecurrentModel(NetworkConfig(recurrence="mingru", options={"bogus": 1}), task)


@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_chrono_init_spreads_retention_and_carries_gradients_back_through_time(name):
    torch.manual_seed(0)
    T, H, chrono = 1000, 32, 1000.0
    layer = build_recurrence(name, input_size=2, hidden_size=H, num_layers=2, norm=True, residual=True,
                             chrono=chrono)
    # the first layer reads the raw input: no LayerNorm there (it would reduce 2 features to a sign)
    assert isinstance(layer.norms[0], torch.nn.Identity) and isinstance(layer.norms[1], torch.nn.LayerNorm)
    for p in layer.proj:  # with a zero input the retention is the bias's alone: u / (1 + u), 1 <= u <= chrono - 1
        a, _ = layer.linear_coefficients(p.bias.view(1, 1, -1))
        u = a / (1 - a)
        assert u.min() >= 1 - 1e-9 and u.max() <= chrono - 1 + 1e-6 and u.max() > chrono / 2
    # what chrono is for: the last output still depends on the first input, where PyTorch's
    # initialization (every gate near 0.5) forgets it within a few dozen steps
    def dependence(module):
        x = torch.rand(4, T, 2, requires_grad=True)
        y, _ = module(x)
        y[:, -1].sum().backward()
        return (x.grad[:, 0].abs().sum() / x.grad[:, -1].abs().sum()).item()

    plain = build_recurrence(name, input_size=2, hidden_size=H, num_layers=2, norm=True, residual=True)
    assert dependence(layer) > 1e-3 and dependence(plain) < 1e-12
    with pytest.raises(ValueError, match="model.network.options.chrono"):
        build_recurrence(name, input_size=2, hidden_size=H, chrono=2)
