"""DeepSpeed on CPU (Lightning's DeepSpeed strategy refuses a CPU; DeepSpeed itself runs with
DS_ACCELERATOR=cpu): one ZeRO-2 engine step on distrnn's network and loss equals the plain AdamW
step with the same clipping."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, free_port, write_corpus

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


SAVE = r"""
import os, sys, lightning, torch
import deepspeed
from distrnn.bptt import run_window
from distrnn.config import NetworkConfig, OptimizerConfig, TaskSpec, TBPTTConfig
from distrnn.engine import TBPTTModule

out = sys.argv[1]
task = TaskSpec(kind="language_model", output_dim=256, vocab_size=256, seq_len=16)
torch.manual_seed(0)
module = TBPTTModule(NetworkConfig(recurrence="lstm", hidden_size=16, num_layers=2), TBPTTConfig(k1=16),
                     OptimizerConfig(lr=1e-2), task)
config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)
x, y = torch.randint(0, 256, (4, 16)), torch.randint(0, 256, (4, 16))
mask = torch.ones(4, 16, dtype=torch.bool)
for _ in range(2):
    r = run_window(engine.module.model, task, x, y, mask, None, None)
    engine.backward(r.loss_sum / mask.sum())
    engine.step()
# what Lightning's DeepSpeed strategy saves: its checkpoint dict minus the weights and optimizer
# (kept by DeepSpeed in its shards), under the tag "checkpoint"
client = {"epoch": 0, "global_step": 2, "pytorch-lightning_version": lightning.__version__,
          "hyper_parameters": dict(module.hparams), "loops": {}, "callbacks": {}, "mlflow_run_id": "abc"}
engine.save_checkpoint(out, client_state=client, tag="checkpoint")
torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, out + ".expected.pt")
torch.save(engine.module.model(x)[0].detach(), out + ".logits.pt")
torch.save(x, out + ".x.pt")
print("SAVED")
"""


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    """One process (DeepSpeed starts slowly) runs both scripts: three ZeRO-2 steps against plain
    AdamW, then a ZeRO-2 checkpoint directory in the layout Lightning's DeepSpeed strategy writes
    (tag folder, ``latest``, model states, one optimizer shard per rank) from a real engine on CPU."""
    pytest.importorskip("deepspeed")
    d = tmp_path_factory.mktemp("ds") / "step=2.ckpt"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", STEP + SAVE, str(d)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and "SAVED" in r.stdout, (r.stdout + r.stderr)[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT"))
    return line, d


@pytest.fixture
def ds_checkpoint(ds_run):
    return ds_run[1]


def test_zero2_engine_steps_equal_plain_adamw_steps(ds_run):
    err, moved = map(float, ds_run[0].split()[1:])
    assert err < 1e-6 and moved > 1e-4  # equal, and the three steps did change the weights


def _convert(src, out, *extra):
    from conftest import distrnn_cmd

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run(distrnn_cmd("convert-checkpoint", str(src), str(out), *extra), capture_output=True,
                          text=True, timeout=300, env=env)


def test_convert_deepspeed_checkpoint_to_one_fp32_file(ds_checkpoint, tmp_path):
    """The converted file holds the engine's exact fp32 weights and the client state, loads with
    weights_only=True (checksum sidecar included), and generates with the same logits."""
    import torch

    from distrnn.checkpoint import load_checkpoint_file
    from distrnn.generate import load_module

    out = tmp_path / "model.ckpt"
    r = _convert(ds_checkpoint, out, "--trust_deepspeed_checkpoint", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = load_checkpoint_file(out)
    assert (tmp_path / "model.ckpt.sha256").is_file()
    expected = torch.load(str(ds_checkpoint) + ".expected.pt", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(expected)
    for k, v in expected.items():
        assert ckpt["state_dict"][k].dtype == torch.float32 and torch.equal(ckpt["state_dict"][k], v), k
    assert ckpt["global_step"] == 2 and ckpt["mlflow_run_id"] == "abc"
    assert not {"ds_config", "optimizer", "param_shapes"} & set(ckpt)
    module = load_module(str(out))
    x = torch.load(str(ds_checkpoint) + ".x.pt", weights_only=True)
    assert torch.allclose(module.model(x)[0], torch.load(str(ds_checkpoint) + ".logits.pt", weights_only=True), atol=1e-6)


def test_deepspeed_checkpoint_needs_the_trust_flag_and_every_shard(ds_checkpoint, tmp_path, capsys):
    """Without --trust_deepspeed_checkpoint neither convert nor fit opens the directory (DeepSpeed
    unpickles); a missing rank shard fails naming the file; exit 2 and nothing written. (The
    refusals happen before DeepSpeed is imported, so the converter runs in this process.)"""
    import shutil

    from conftest import distrnn_cmd
    from distrnn.checkpoint import convert_main

    out = tmp_path / "model.ckpt"
    assert convert_main([str(ds_checkpoint), str(out)]) == 2
    err = capsys.readouterr().err
    assert "--trust_deepspeed_checkpoint" in err and str(ds_checkpoint) in err
    assert not out.exists()
    write_corpus(tmp_path / "corpus.txt", 2000)
    fit = subprocess.run(distrnn_cmd("fit", "--config", str(REPO / "jobs/configs/tiny.yaml"), "--ckpt_path", str(ds_checkpoint)),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert fit.returncode == 2 and "--trust_deepspeed_checkpoint" in fit.stderr, fit.stderr[-2000:]
    if (tmp_path / "mlflow.db").exists():  # no MLflow run was started
        import mlflow

        assert not mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
            [e.experiment_id for e in mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()])

    broken = tmp_path / "broken.ckpt"
    shutil.copytree(ds_checkpoint, broken)
    shard = broken / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.unlink()
    assert convert_main([str(broken), str(out), "--trust_deepspeed_checkpoint", "true"]) == 2
    assert f"checkpoint {shard}: missing" in capsys.readouterr().err
    assert not out.exists()
