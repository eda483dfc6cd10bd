"""The fused Triton scan of minGRU/minLSTM against the sequential loop in float64, forward and
backward (inputs and initial state). On CPU through Triton's interpreter, on a GPU natively."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytest.importorskip("triton")

CHECK = """
import torch
from distrnn.kernels.min_scan import min_scan
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
        z1, h1 = z.clone().requires_grad_(), h0.clone().requires_grad_()
        z2, h2 = z.double().clone().requires_grad_(), h0.double().clone().requires_grad_()
        out1 = min_scan(z1, h1, lstm)
        out2 = ref_layer.sequential(z2, h2)
        w = torch.randn(B, T, H, dtype=torch.float64, device=dev)
        (out1.double() * w).sum().backward()
        (out2 * w).sum().backward()
        for name, a, b in (("h", out1, out2), ("dz", z1.grad, z2.grad), ("dh0", h1.grad, h2.grad)):
            err = ((a.double() - b).abs() / (1 + b.abs())).max().item()
            worst = max(worst, err)
            assert err < 2e-5, (cls.__name__, B, T, H, name, err)
print("worst", worst)
"""


def test_kernel_equals_sequential_loop_in_triton_interpreter():
    shapes = [(2, 37, 5), (3, 70, 70), (1, 1, 3)]  # tails of tiles, H not a power of two, T = 1
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", CHECK.format(dev="cpu", shapes=shapes)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0 and "worst" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_equals_sequential_loop_on_gpu():
    shapes = [(4, 3001, 1000), (2, 64, 1024), (3, 1, 7)]
    r = subprocess.run([sys.executable, "-c", CHECK.format(dev="cuda", shapes=shapes)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and "worst" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rec", ["mingru", "minlstm"])
def test_triton_layer_equals_eager_layer_and_is_chosen_on_cuda(rec):
    from distrnn.layers import build_recurrence

    torch.manual_seed(0)
    fast = build_recurrence(rec, input_size=32, hidden_size=256, num_layers=2, norm=True, residual=True).cuda()
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
