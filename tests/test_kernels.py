"""The fused Triton scan of minGRU/minLSTM against the sequential loop in float64, forward and
backward (inputs and initial state). On CPU through Triton's interpreter, on a GPU natively."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytest.importorskip("triton")

def _python(code: str, interpret: bool, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """``python -c code`` with the repository importable, through Triton's interpreter or not."""
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    base.update(PYTHONPATH=str(REPO), **({"TRITON_INTERPRET": "1"} if interpret else {}), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=base)


CHECK = """
import torch
{prelude}
from distrnn.kernels.min_scan import min_scan, min_scan_final
from distrnn.scan import MinGRU, MinLSTM
torch.manual_seed(0)
dev = "{dev}"
worst = 0.0
for cls, lstm in ((MinGRU, False), (MinLSTM, True)):
    for B, T, H in {shapes}:
        n = 3 if lstm else 2
        ref_layer = cls(4, H).double()
        z = (torch.randn(B, T, n * H) * 3).to(dev)
        h0 = (torch.rand(B, H) + 0.1).to(dev)
        keep = None
        if {resets}:  # resets (a row's state zeroed before the step) at random steps, row 0 at step 0 too
            keep = torch.rand(B, T) > 0.2
            keep[0, 0] = False
            keep = keep.to(dev)
        # the final state's own gradient (checkpointed BPTT: from the next segment) joins the
        # gradient of the last step's output
        w, v = torch.randn(B, T, H, dtype=torch.float64, device=dev), torch.randn(B, H, dtype=torch.float64, device=dev)
        z2, h2 = z.double().clone().requires_grad_(), h0.double().clone().requires_grad_()
        out2 = ref_layer.sequential(z2, h2, keep)  # the reference once, every configuration against it
        ((out2 * w).sum() + (out2[:, -1] * v).sum()).backward()
        for config in {configs}:
            z1, h1 = z.clone().requires_grad_(), h0.clone().requires_grad_()
            out1, last1 = min_scan(z1, h1, lstm, config, keep, {split})
            ((out1.double() * w).sum() + (last1.double() * v).sum()).backward()
            assert last1.dtype == torch.float32
            if config == {configs}[0]:  # without writing the states: the same final state, bit for bit
                with torch.no_grad():       # (one configuration: the interpreter's time)
                    assert torch.equal(min_scan_final(z, h0, lstm, config, keep, {split}), last1), (config, cls.__name__, B, T, H)
            if config == {configs}[0] and {only_last}:
                # only the final state read (a checkpointed segment's recomputation without a
                # loss): the kernel gets no gradient of the states, and dz, dh0 are the loop's
                z3, h3 = z.clone().requires_grad_(), h0.clone().requires_grad_()
                _, last3 = min_scan(z3, h3, lstm, config, keep, {split})
                (last3.double() * v).sum().backward()
                z4, h4 = z.double().clone().requires_grad_(), h0.double().clone().requires_grad_()
                (ref_layer.sequential(z4, h4, keep)[:, -1] * v).sum().backward()
                for name, a, b in (("dz only last", z3.grad, z4.grad), ("dh0 only last", h3.grad, h4.grad)):
                    err = ((a.double() - b).abs() / (1 + b.abs())).max().item()
                    worst = max(worst, err)
                    assert err < 2e-5, (config, cls.__name__, B, T, H, name, err)
            for name, a, b in (("h", out1, out2), ("last", last1, out2[:, -1]), ("dz", z1.grad, z2.grad), ("dh0", h1.grad, h2.grad)):
                err = ((a.double() - b).abs() / (1 + b.abs())).max().item()
                worst = max(worst, err)
                assert err < 2e-5, (config, cls.__name__, B, T, H, name, err)
print("worst", worst)
"""


HALF = """
import torch
from distrnn.kernels.min_scan import min_scan
torch.manual_seed(0)
dev, exact_bf16 = "{dev}", {exact_bf16}
# one configuration for both dtypes: the autotuner may choose differently per dtype, and another
# tile shape rounds differently
cfg = {config}
for lstm in (False, True):
    for dt in (torch.bfloat16, torch.float16):
        for B, T, H in {shapes}:
            z = (torch.randn(B, T, (3 if lstm else 2) * H) * 3).to(dev, dt)
            h0 = torch.rand(B, H, device=dev) + 0.1
            za, ha = z.clone().requires_grad_(), h0.clone().requires_grad_()
            zb, hb = z.float().requires_grad_(), h0.clone().requires_grad_()
            (oa, la), (ob, lb) = min_scan(za, ha, lstm, cfg), min_scan(zb, hb, lstm, cfg)
            w = torch.randn(B, T, H, device=dev)
            (oa.float() * w).sum().backward()
            (ob * w).sum().backward()
            case = (lstm, dt, B, T, H)
            # the same float32 arithmetic on the same values: the states rounded once to z's
            # dtype, the final state (float32, carried by TBPTT) equal
            assert oa.dtype == dt and la.dtype == torch.float32 and torch.equal(la, lb), case
            if dt == torch.float16 or exact_bf16:
                assert torch.equal(oa, ob.to(dt)), case
            else:  # Triton's interpreter converts float32 to bf16 by truncation: within one bf16 ulp
                ulp = 2.0 ** (torch.floor(torch.log2(ob.abs().clamp_min(1e-30))) - 7)
                assert ((oa.float() - ob).abs() <= ulp).all(), case
            # the backward reads the rounded states back (dL/da = G (h_prev - g)): dz and dh0 close
            # to the float32 path's, not equal
            assert za.grad.dtype == dt, case
            for a, b in ((za.grad.float(), zb.grad), (ha.grad, hb.grad)):
                assert (a - b).abs().max() <= 2e-2 * b.abs().max(), (case, (a - b).abs().max(), b.abs().max())
# In a layer under bf16 autocast, what the backward keeps of z and h is bf16 (before: a float32
# copy of z made for the kernel, and float32 states)
from distrnn.scan import MinGRU
layer = MinGRU(8, 16, backend="triton").to(dev)
x = torch.randn(2, 33, 8, device=dev)
saved = []
with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
    with torch.autocast(dev, dtype=torch.bfloat16):
        y, state = layer(x)
assert (torch.bfloat16, (2, 33, 32)) in saved and (torch.float32, (2, 33, 32)) not in saved, saved
assert (torch.bfloat16, (2, 33, 16)) in saved and (torch.float32, (2, 33, 16)) not in saved, saved
assert y.dtype == torch.bfloat16 and state.dtype == torch.float32, (y.dtype, state.dtype)
y.float().sum().backward()
assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
print("half ok")
"""


def test_kernel_reads_bf16_and_fp16_inputs_as_they_are():
    """Under autocast the projected input z is bf16/fp16: the kernel reads it without a float32
    copy and writes dz in that dtype, with the results of the float32 path (dz rounded once)."""
    # one shape (the interpreter's time grows with the T tiles: 31 s at T = 70, 13 s at 22): batch
    # strides, 5 T tiles of the interpreter's BLOCK_T 4 with a tail of 2, H not a power of two
    r = _python(HALF.format(dev="cpu", exact_bf16=False, shapes=[(2, 22, 5)], config=None), interpret=True)
    assert r.returncode == 0 and "half ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_reads_bf16_and_fp16_inputs_as_they_are_on_gpu():
    r = _python(HALF.format(dev="cuda", exact_bf16=True, shapes=[(4, 3001, 1000), (3, 1, 7)], config=(4, 128, 4, True)),
                interpret=False)
    assert r.returncode == 0 and "half ok" in r.stdout, r.stderr[-3000:]


def test_kernel_equals_sequential_loop_in_triton_interpreter():
    # tails of tiles (BLOCK_T 32, BLOCK_H 64: three T tiles, two H blocks; BLOCK_T 4: a tail of 1), H not a power of two, T = 1;
    # batch strides in the first (the interpreter runs every program in Python: B=1 for the largest)
    shapes = [(2, 37, 5), (1, 70, 70), (1, 1, 3)]
    # both ways of loading (PREFETCH on and off) and both tile shapes the autotuner chooses from
    configs = [(32, 64, 4, False), (4, 128, 4, True)]
    r = _python(CHECK.format(dev="cpu", shapes=shapes, configs=configs, prelude="", resets=False, split=1, only_last=True),
                interpret=True)
    assert r.returncode == 0 and "worst" in r.stdout, r.stderr[-3000:]


def test_kernel_with_resets_equals_sequential_loop_in_triton_interpreter():
    """Resets inside the scan (``h_t = a_t keep_t h_{t-1} + b_t``): states, final state and the
    gradients of z and h0 (0 for a row reset at step 0) equal the loop's, both ways of loading,
    tiles with a tail."""
    configs = [(32, 64, 4, False), (4, 128, 4, True)]
    r = _python(CHECK.format(dev="cpu", shapes=[(3, 21, 5)], configs=configs, prelude="", resets=True, split=1,
                             only_last=True), interpret=True)
    assert r.returncode == 0 and "worst" in r.stdout, r.stderr[-3000:]


def test_split_kernel_equals_sequential_loop_in_triton_interpreter():
    """The time axis in chunks scanned by programs of their own and joined (``split``): states,
    final state and gradients equal the loop's, with only the final state read too, with and
    without resets, in chunks that end inside a tile, of one step, and a last one shorter."""
    prelude = "import distrnn.kernels.min_scan as _ms; _ms.SPLIT_STEP = 1"
    for resets, shapes, split in ((False, [(2, 14, 3)], 3), (True, [(1, 6, 3)], 6)):
        r = _python(CHECK.format(dev="cpu", shapes=shapes, configs=[(4, 128, 4, True)], prelude=prelude, resets=resets,
                                 split=split, only_last=True), interpret=True)
        assert r.returncode == 0 and "worst" in r.stdout, r.stderr[-3000:]
    # through a 2-layer model (norm, residual): checkpointed BPTT's gradients equal full BPTT's, and
    # the final state moved on without the states equals a plain forward's (both from the join)
    r = _python(CHECKPOINTED.format(rec="mingru", split=3, T=16), interpret=True)
    assert r.returncode == 0 and "moved" in r.stdout, r.stderr[-3000:]


def test_split_chunks_and_when_auto_splits():
    from distrnn.kernels import min_scan as ms

    assert ms._chunks(4096, 1) == (4096, 1) and ms._chunks(20, 4) == (20, 1)  # shorter than a chunk's step
    assert ms._chunks(4096, 5) == (832, 5) and ms._chunks(100, 3) == (64, 2)  # whole tiles of 32 steps
    # H100/H200 (132 SMs): the selective-copy model's B=64, H=128 splits in 5; B=64, H=1024 (512
    # programs) and short sequences do not; one long row of 1024 units in chunks of >= 256 steps
    assert ms.auto_split(64, 128, 4096, 132) == 5
    assert ms.auto_split(64, 1024, 4096, 132) == 1 and ms.auto_split(64, 128, 500, 132) == 1
    assert ms.auto_split(1, 1024, 65536, 132) == 33 and ms.auto_split(1, 1024, 2048, 132) == 8


CHECKPOINTED = """
import torch
from distrnn.bptt import run_window
from distrnn.config import NetworkConfig, TaskSpec
from distrnn.kernels import min_scan as ms
from distrnn.model import RecurrentModel
calls = {{"states": 0, "final": 0}}
full_fn, final_fn = ms.min_scan, ms.min_scan_final
ms.min_scan = lambda *a, **k: (calls.__setitem__("states", calls["states"] + 1), full_fn(*a, **k))[1]
ms.min_scan_final = lambda *a, **k: (calls.__setitem__("final", calls["final"] + 1), final_fn(*a, **k))[1]
torch.manual_seed(0)
task = TaskSpec(kind="regression", output_dim=1, input_dim=3)
ms.SPLIT_STEP = 1
options = {{"backend": "triton", "norm": True, "residual": True, "kernel_split": {split}}}
model = RecurrentModel(NetworkConfig(recurrence="{rec}", hidden_size=6, num_layers=2, options=options), task)
B, T = 2, {T}
x, y = torch.randn(B, T, 3), torch.randn(B, T, 1)
mask = torch.zeros(B, T, dtype=torch.bool)
mask[:, -1] = True  # a loss at the last step: segments [0, 8) and [8, 16) only carry the state
grads = []
for segment in (None, 8):
    model.zero_grad()
    before = dict(calls)
    res = run_window(model, task, x, y, mask, None, None, segment=segment, mask_host=mask.clone())
    res.loss_sum.backward()
    grads.append([p.grad.clone() for p in model.parameters()])
    print(segment, {{k: calls[k] - before[k] for k in calls}})
for a, b in zip(*grads):
    assert (a - b).abs().max() <= 1e-6 * (1 + b.abs().max()), (a - b).abs().max()
# a window that only moves the state on, as TBPTT does without a loss: the last layer writes no states
with torch.no_grad():
    before = dict(calls)
    moved = run_window(model, task, x, y, torch.zeros_like(mask), None, None, mask_host=torch.zeros_like(mask)).state
    print("moved", {{k: calls[k] - before[k] for k in calls}})
    ref = model(x, None)[1]
assert torch.equal(moved, ref), (moved - ref).abs().max()
"""


def test_checkpointed_first_pass_writes_no_states_in_triton_interpreter():
    """The first pass of a checkpointed segment without a loss reads only its final state: the
    last layer's kernel runs without writing the states of the steps (``min_scan_final``), and
    the gradients equal full BPTT's (2 layers, norm and residual); a window that only moves the
    state on does the same, with the final state of a plain forward, bit for bit."""
    # minGRU only (the interpreter takes ~15 s a model); minLSTM's final state: CHECK above
    r = _python(CHECKPOINTED.format(rec="mingru", split=1, T=24), interpret=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    # full BPTT: one call a layer; checkpointed: the 2 loss-free segments' first passes (layer 1
    # with states, layer 2 without), their recomputation (both with), the last segment (both with)
    assert lines[0] == "None {'states': 2, 'final': 0}", r.stdout
    assert lines[1] == "8 {'states': 8, 'final': 2}", r.stdout
    assert lines[2] == "moved {'states': 1, 'final': 1}", r.stdout


AUTOTUNED = """
from distrnn.kernels import min_scan as ms
# The GPU's launch path (the autotuner, not the interpreter's one configuration) with a stand-in
# for its timer that makes the third configuration the fastest: every configuration runs, the
# autotuner keeps the third, and its results are checked below
def fake_bench(fn, quantiles=None):
    fn()
    t = 0.0 if (fake_bench.calls % len(ms.CONFIGS)) == 2 else 1.0
    fake_bench.calls += 1
    return [t, t, t]
fake_bench.calls = 0
ms._fwd_tuned, ms._bwd_tuned = ms._autotuned(ms._fwd_kernel, fake_bench), ms._autotuned(ms._bwd_kernel, fake_bench)
ms.INTERPRETER_CONFIG = None  # the interpreter runs the autotuner too
import atexit
atexit.register(lambda: print("tuned", ms.tuned_configs(), "timed", fake_bench.calls))
"""


def test_autotuned_launch_in_triton_interpreter():
    """The autotuner's launch (grid from the chosen BLOCK_H) runs the kernels right. It times the
    configurations once per hidden size, cell and size class of the launch: T = 20 reuses the
    choice made at T = 17 (uneven TBPTT chunks), T = 1 (a one-step streaming call) makes its own,
    which the disk cache would otherwise have handed to every later run of that hidden size."""
    from distrnn.kernels.min_scan import CONFIGS

    shapes = [(2, 17, 5), (2, 20, 5), (1, 1, 5), (1, 9, 130)]  # 17 and 20: one size class (shape_key)
    r = _python(CHECK.format(dev="cpu", shapes=shapes, configs=[None], prelude=AUTOTUNED, resets=False, split=1,
                             only_last=False), interpret=True)
    assert r.returncode == 0 and "worst" in r.stdout, r.stderr[-3000:]
    bt, bh, w, p = CONFIGS[2]
    assert f"BLOCK_T: {bt}, BLOCK_H: {bh}, PREFETCH: {p}, num_warps: {w}" in r.stdout, r.stdout
    # 3 of the 4 shapes tune: x 2 cells x (forward, backward) x every configuration
    assert f"timed {3 * 2 * 2 * len(CONFIGS)}" in r.stdout, r.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_equals_sequential_loop_on_gpu():
    from distrnn.kernels.min_scan import CONFIGS

    # every configuration the autotuner may pick, and the autotuner itself (None)
    shapes = [(4, 3001, 1000), (2, 64, 1024), (3, 1, 7)]
    r = _python(CHECK.format(dev="cuda", shapes=shapes, configs=[*CONFIGS, None], prelude="", resets=False, split=1,
                             only_last=True), interpret=False, timeout=600)
    assert r.returncode == 0 and "worst" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_split_kernel_equals_the_loop_on_gpu():
    from distrnn.kernels.min_scan import CONFIGS

    # both kinds of tile (the time axis across threads; whole columns per thread) and the autotuner
    for resets, split in ((False, 7), (True, 3)):
        r = _python(CHECK.format(dev="cuda", shapes=[(4, 3001, 130), (2, 700, 1000)], configs=[*CONFIGS[:2], None],
                                 prelude="", resets=resets, split=split, only_last=True), interpret=False, timeout=600)
        assert r.returncode == 0 and "worst" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_with_resets_equals_sequential_loop_on_gpu():
    from distrnn.kernels.min_scan import CONFIGS

    r = _python(CHECK.format(dev="cuda", shapes=[(4, 1001, 1000), (3, 1, 7)], configs=[*CONFIGS, None], prelude="",
                             resets=True, split=1, only_last=True), interpret=False, timeout=600)
    assert r.returncode == 0 and "worst" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rec", ["mingru", "minlstm"])
@pytest.mark.parametrize("split", [1, "auto"])
def test_triton_layer_equals_eager_layer_and_is_chosen_on_cuda(rec, split):
    from distrnn.layers import build_recurrence

    torch.manual_seed(0)
    fast = build_recurrence(rec, input_size=32, hidden_size=256, num_layers=2, norm=True, residual=True,
                            kernel_split=split).cuda()
    if split == "auto":  # 8 rows x 2 blocks of units: 16 programs, fewer than any GPU's multiprocessors
        assert fast._split(torch.empty(8, 777, fast.gates * 256, device="cuda")) > 1
    slow = build_recurrence(rec, input_size=32, hidden_size=256, num_layers=2, norm=True, residual=True,
                            backend="eager", scan_chunk=100).cuda()
    slow.load_state_dict(fast.state_dict())
    assert fast._backend(torch.zeros(1, device="cuda")) == "triton"
    x = torch.randn(8, 777, 32, device="cuda")
    h0 = torch.rand(2, 8, 256, device="cuda") + 0.1
    outs = []
    for layer in (fast, slow):
        xi, hi = x.clone().requires_grad_(), h0.clone().requires_grad_()
        y, h = layer(xi, hi)
        (y.square().mean() + h.mean()).backward()
        outs.append((y, h, xi.grad, hi.grad, [p.grad.clone() for p in layer.parameters()]))
    (y1, h1, gx1, gh1, gp1), (y2, h2, gx2, gh2, gp2) = outs
    for a, b in [(y1, y2), (h1, h2), (gx1, gx2), (gh1, gh2), *zip(gp1, gp2)]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = fast(x)
    assert torch.isfinite(y).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rec", ["mingru", "minlstm"])
def test_triton_layer_takes_resets_like_the_eager_layer_cut_at_them(rec):
    """A window with rows resetting at random steps: the Triton layer's one call per layer (the
    mask read in the kernel) equals the eager log-space layer run piece by piece between resets."""
    from distrnn.config import NetworkConfig, TaskSpec
    from distrnn.model import RecurrentModel

    torch.manual_seed(0)
    task = TaskSpec(kind="regression", output_dim=3, input_dim=32)
    models = [RecurrentModel(NetworkConfig(recurrence=rec, hidden_size=256, num_layers=2,
                                           options={"norm": True, "residual": True, **opts}), task).cuda()
              for opts in ({}, {"backend": "eager", "scan_chunk": 100})]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(8, 777, 32, device="cuda")
    h0 = torch.rand(2, 8, 256, device="cuda") + 0.1
    reset = torch.rand(8, 777) < 0.01
    reset[0, 0] = True
    assert models[0].recurrence.takes_resets(x) and not models[1].recurrence.takes_resets(x)
    outs = []
    for model in models:
        xi, hi = x.clone().requires_grad_(), h0.clone().requires_grad_()
        y, h = model(xi, hi, reset)
        (y.square().mean() + h.mean()).backward()
        outs.append((y, h, xi.grad, hi.grad, [p.grad.clone() for p in model.parameters()]))
    (y1, h1, gx1, gh1, gp1), (y2, h2, gx2, gh2, gp2) = outs
    for a, b in [(y1, y2), (h1, h2), (gx1, gx2), (gh1, gh2), *zip(gp1, gp2)]:
        # float32 sums over 6,216 steps in another order (linear against log space: 3.5e-5 of a
        # weight gradient whose largest entry is 0.05, without resets too, on CPU); a reset
        # mishandled is off by the size of the values
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 + 2e-3 * b.abs().max().item())


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from distrnn.kernels import min_scan as ms
FP32 = {"H0", "Hlast", "dLast", "dH0", "Aprod"}
done = 0
# fp32 and bf16 without resets; bf16 with them (the reset mask is bytes) in the two kinds of tile
# (the time axis across threads, and whole columns per thread with prefetching)
for dtype, keep in (("bf16", False), ("fp32", False), ("bf16", True)):
    for lstm in (False, True):
        for bt, bh, w, p in ms.CONFIGS if not keep else [ms.CONFIGS[0], ms.CONFIGS[1]]:
            # the backward also without a gradient of the states (only the final state read) in fp32,
            # and a split scan's first passes (no states, no dz: each chunk's map) in bf16, both in
            # the two kinds of tile
            split = [(ms._fwd_kernel, {"STORE_H": False, "STORE_A": True}), (ms._bwd_kernel, {"STORE_DZ": False, "STORE_A": True})]
            for fn, flags in ((ms._fwd_kernel, {}), (ms._bwd_kernel, {"HAS_DH": True}),
                              *(((ms._bwd_kernel, {"HAS_DH": False}),) if dtype == "fp32" and (bt, bh, w, p) in ms.CONFIGS[:2]
                                else ()),
                              *(split if (bt, bh, w, p) in ms.CONFIGS[:2] and dtype == "bf16" else ())):
                const = {"LSTM": lstm, "BLOCK_T": bt, "BLOCK_H": bh, "PREFETCH": p, "HAS_KEEP": keep, **flags}
                sig = {a: "constexpr" if a in const else "i32" if a[0] in "Ts" or a in ("Hdim", "CHUNK") else "*fp32" if a in FP32
                       else ("*u8" if keep else "*fp32") if a == "Keep" else "*" + dtype
                       for a in fn.arg_names}
                k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                                   options={"num_warps": w})
                assert k.asm["cubin"], (fn.__name__, dtype, lstm, bt, bh, w, p)
                done += 1
for reverse in (False, True):  # the pass that joins a split scan's chunks
    sig = {a: "constexpr" if a in ("REVERSE", "BLOCK") else "i32" if a in ("n", "BH") else "*fp32" for a in ms._chain.arg_names}
    k = triton.compile(ASTSource(fn=ms._chain, signature=sig, constexprs={"REVERSE": reverse, "BLOCK": 1024}),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert k.asm["cubin"]
    done += 1
print("compiled", done)
"""


@pytest.mark.slow
def test_every_autotuner_candidate_compiles_for_hopper():
    """Triton's compiler, down to ptxas, for sm_90 (no GPU needed): what the interpreter cannot
    catch (an operation or layout the GPU backend refuses) fails here rather than in a rare GPU
    session."""
    r = _python(COMPILE, interpret=False, timeout=600, TRITON_DEFAULT_FP_FUSION="1")
    assert r.returncode == 0 and "compiled 62" in r.stdout, r.stderr[-3000:]


def test_scan_config_from_the_environment():
    """DISTRNN_SCAN_CONFIG fixes the kernel configuration (runs that must repeat bit for bit on
    other machines); a malformed value fails the kernel module's import naming the variable.
    (One process: each value is read by a fresh import of the module.)"""
    code = """
import importlib, os, sys
for value in ("4,128", "4,100,4,1", "4,128,4,2", "a,b,c,d", "32,64,4,0"):
    os.environ["DISTRNN_SCAN_CONFIG"] = value
    sys.modules.pop("distrnn.kernels.min_scan", None)
    try:
        ms = importlib.import_module("distrnn.kernels.min_scan")
        print("fixed", value, ms.FIXED_CONFIG)
    except ValueError as e:
        print("refused", value, e)
"""
    r = _python(code, interpret=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fixed 32,64,4,0 (32, 64, 4, False)" in r.stdout, r.stdout
    for bad in ("4,128", "4,100,4,1", "4,128,4,2", "a,b,c,d"):
        assert f"refused {bad} DISTRNN_SCAN_CONFIG: '{bad}' is not" in r.stdout, (bad, r.stdout)
