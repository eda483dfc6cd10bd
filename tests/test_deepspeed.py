"""DeepSpeed on CPU (Lightning's DeepSpeed strategy refuses a CPU; DeepSpeed itself runs with
DS_ACCELERATOR=cpu): one ZeRO-2 engine step on distrnn's network and loss equals the plain AdamW
step with the same clipping."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, free_port

pytestmark = pytest.mark.slow

STEP = r"""
import copy, os, torch
import deepspeed
from distrnn.bptt import run_window
from distrnn.config import NetworkConfig, TaskSpec
from distrnn.model import RecurrentModel

task = TaskSpec(kind="language_model", output_dim=40, vocab_size=40, seq_len=16)
torch.manual_seed(0)
model = RecurrentModel(NetworkConfig(recurrence="lstm", hidden_size=16), task)
ref = copy.deepcopy(model)
init = copy.deepcopy(model)
x, y = torch.randint(0, 40, (4, 16)), torch.randint(0, 40, (4, 16))
mask = torch.ones(4, 16, dtype=torch.bool)
config = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True, "weight_decay": 0.01}}}
deepspeed.init_distributed(dist_backend="gloo")
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
for _ in range(3):
    r = run_window(engine.module, task, x, y, mask, None, None)
    engine.backward(r.loss_sum / mask.sum())
    engine.step()
opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01)
for _ in range(3):
    opt.zero_grad()
    r = run_window(ref, task, x, y, mask, None, None)
    (r.loss_sum / mask.sum()).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()
moved = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), init.parameters()))
err = max((a - b).abs().max().item() for a, b in zip(engine.module.parameters(), ref.parameters()))
print("RESULT", err, moved)
"""


def test_zero2_engine_steps_equal_plain_adamw_steps():
    pytest.importorskip("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", STEP], capture_output=True, text=True, timeout=600, env=env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert r.returncode == 0 and line, (r.stdout + r.stderr)[-3000:]
    err, moved = map(float, line.split()[1:])
    assert err < 1e-6 and moved > 1e-4  # equal, and the three steps did change the weights
