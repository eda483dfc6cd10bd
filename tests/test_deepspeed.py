"""DeepSpeed on CPU (DS_ACCELERATOR=cpu): Lightning's DeepSpeed strategy, with only its refusal of
a CPU skipped, trains distrnn's manual-optimization module with ZeRO-2 and ZeRO-3 (fp32 updates
equal the plain run's, bf16, resume from its checkpoint directory equal to an uninterrupted run),
and its directories convert to one fp32 file. The same checks run unmodified on a GPU in
tests/test_gpu.py."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, free_port, write_corpus

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def lightning_ds(tmp_path_factory):
    """One process (DeepSpeed starts slowly) runs tests/ds_lightning_check.py: Lightning's own
    DeepSpeed strategy (its refusal of a CPU skipped) around distrnn's module, ZeRO-2 and ZeRO-3,
    against plain Lightning runs; it leaves the checkpoint directories the strategy wrote."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("ds")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "tests" / "ds_lightning_check.py"), str(out), "--device", "cpu"],
                       capture_output=True, text=True, timeout=600, env=env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, (r.stdout + r.stderr)[-3000:]
    return json.loads(line.removeprefix("RESULT ")), out


@pytest.fixture
def ds_checkpoint(lightning_ds):
    return lightning_ds[1] / "zero2" / "step=8.ckpt"


@pytest.mark.parametrize("stage", [2, 3])
def test_lightning_deepspeed_updates_equal_plain_updates(lightning_ds, stage):
    """Six updates through Lightning's DeepSpeed strategy (fp32) equal the plain run's, with the
    clipping biting: ZeRO keeps gradients out of p.grad, so distrnn clips through DeepSpeed's config
    (before the fix the clip silently did nothing and the weights drifted by 3e-3)."""
    r = lightning_ds[0][f"equal_zero{stage}"]
    assert r["clip_bites"] and r["weights"] < 1e-6 and r["grad_norm"] < 1e-5, r


@pytest.mark.parametrize("stage", [2, 3])
def test_lightning_deepspeed_checkpointed_bptt_updates_equal_plain_updates(lightning_ds, stage):
    """The same with checkpointed BPTT (8 recomputed segments per update): ZeRO-2 gets each
    parameter's gradient once per update from the segments' autograd Function; ZeRO-3, whose
    parameters are empty outside forward (here all of them: no persistence threshold), runs the
    segments under torch.utils.checkpoint."""
    r = lightning_ds[0][f"equal_checkpointed_zero{stage}"]
    assert r["clip_bites"] and r["weights"] < 1e-6 and r["losses"] < 1e-6 and r["grad_norm"] < 1e-5, r


@pytest.mark.parametrize("stage", [2, 3])
def test_lightning_deepspeed_bf16_trains_bf16_weights(lightning_ds, stage):
    r = lightning_ds[0][f"bf16_zero{stage}"]
    # uniform random tokens over 50: the loss can only fall towards ln 50 = 3.912
    assert r["dtypes"] == ["torch.bfloat16"] and r["finite"] and r["last"] < r["first"] and r["last"] < 3.93, r
    # Diagnostics ran along: under ZeRO no gradient norms or curve (gradients live in DeepSpeed's
    # buffers, filled by hooks any backward fires); ZeRO-2 keeps saturation, ZeRO-3 (partitioned
    # parameters) not
    assert r["diagnostics"] == ([False, True, False] if stage == 2 else [False, False, False]), r
    # its checkpoint directory (DeepSpeed names a bf16 run's shards bf16_zero_pp_rank_*; before,
    # distrnn took that for the bf16 optimizer and dropped the optimizer state) converts to the
    # weights and Adam moments DeepSpeed's own universal-checkpoint converter reads from it
    assert r["universal"] == {"names": True, "weights": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}, r
    # resumed from its update-4 directory: the uninterrupted bf16 run's weights and (bf16) carried state
    assert r["resume"] == {"weights": 0.0, "state": 0.0, "state_dtypes": ["torch.bfloat16"]}, r


def test_deepspeeds_bf16_optimizer_checkpoint_converts_with_its_optimizer_state(lightning_ds):
    """ZeRO-1 with bf16 weights and fp32 gradient accumulation runs DeepSpeed's bf16 optimizer,
    whose shards DeepSpeed's zero_to_fp32 refuses ("not a zero checkpoint": before, a traceback
    from convert-checkpoint): distrnn joins its fp32 master weights and moments itself, equal to
    DeepSpeed's universal-checkpoint converter's."""
    r = lightning_ds[0]["bf16_optimizer"]
    assert r["optimizer"] == "BF16_Optimizer" and r["finite"], r
    # a plain run goes on from the file: 2 batches of 2 TBPTT updates each
    assert r["resumed_to"] == 12 and r["resumed_batches"] == 2 and r["resumed_finite"], r
    assert r["universal"] == {"names": True, "weights": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}, r


def test_a_two_rank_bf16_optimizer_checkpoint_joins_like_deepspeeds_own_converter(tmp_path):
    """Two ranks of DeepSpeed's bf16 optimizer (DeepSpeed alone: Lightning's strategy refuses a
    CPU), 3 updates, 1,154 parameters (the flat group padded at its end): the converted file's
    fp32 master weights and Adam moments, joined from the 2 shards, are those DeepSpeed's
    universal-checkpoint converter reads from them."""
    pytest.importorskip("deepspeed")
    from helpers import against_deepspeed_universal

    from distrnn.checkpoint_files import convert_deepspeed_checkpoint

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "tests" / "ds_bf16_two_ranks.py"), str(tmp_path / "ds"), str(free_port())],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert len(list((tmp_path / "ds" / "checkpoint").glob("bf16_zero_pp_rank_*_optim_states.pt"))) == 2
    converted = convert_deepspeed_checkpoint(tmp_path / "ds", tmp_path / "ds.pt", trusted=True)
    assert against_deepspeed_universal(tmp_path / "ds", converted) == {"names": True, "weights": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}


@pytest.mark.parametrize("stage", [2, 3])
def test_lightning_deepspeed_resume_equals_uninterrupted_run(lightning_ds, stage):
    """Resumed from the strategy's checkpoint directory at update 4 of 8 (cosine schedule): the same
    weights and carried state as the uninterrupted run; the directory converts to its weights and
    optimizer state (a run without DeepSpeed resumes from the file), and
    RegisterModel registers the best one (before, it read the directory as a file and failed)."""
    r = lightning_ds[0][f"resume_zero{stage}"]
    assert r["weights"] == 0 and r["state"] == 0 and r["converted"] == 0 and r["converted_keys"], r
    assert r["global_step"] == 8
    # The directory at update 4, converted with its optimizer state and resumed without DeepSpeed,
    # ends where the ZeRO run does; without its Adam moments, 2e-2 away
    assert r["optimizer_converted"], r
    assert r["plain_weights"] < 1e-6 and r["plain_state"] < 1e-6 and r["without_moments"] > 1e-3, r
    if stage == 2:  # RegisterModel registered the best checkpoint through its fp32 conversion
        assert r["registered"] == "1" and r["registered_file"] == 0, r


def test_deepspeed_gradient_clipping_must_agree_with_clip_norm(lightning_ds):
    assert "model.optimizer.clip_norm (0.05)" in lightning_ds[0]["clip_conflict"], lightning_ds[0]["clip_conflict"]


def test_weight_averaging_is_refused_under_deepspeed(lightning_ds):
    assert lightning_ds[0]["ema_refused"].startswith("trainer.callbacks: weight averaging"), lightning_ds[0]["ema_refused"]


@pytest.mark.parametrize("stage", [2, 3])
def test_lightning_deepspeed_micro_batches_equal_plain_updates(lightning_ds, stage):
    """``micro_batch_size`` 2: each update's 4 rows in 2 groups, forward and backward one at a
    time, their gradients accumulated in DeepSpeed's buffers (the engine told which backward ends
    the update) and one step: the plain run's weights. ZeRO-3 copied the second group's gradient
    partitions over the first's (weights off by 7e-2) until distrnn called the optimizer's
    per-micro-batch hook, which DeepSpeed's engine calls in its forward, once per Lightning batch."""
    r = lightning_ds[0][f"equal_micro_zero{stage}"]
    assert r["clip_bites"] and r["weights"] < 1e-6 and r["grad_norm"] < 1e-5, r
    # checkpointed BPTT in groups (ZeRO-2: the segments' autograd Function; ZeRO-3, every
    # parameter partitioned: torch.utils.checkpoint), against the plain run in groups. The
    # gradient norms agree to 1e-7; the groups' gradients, summed in another order, round
    # otherwise, and 6 Adam updates take that to 1.4e-6 in the weights (the plain run in groups
    # against the plain run at once: the same 1.4e-6)
    r = lightning_ds[0][f"equal_micro_checkpointed_zero{stage}"]
    assert r["clip_bites"] and r["weights"] < 3e-6 and r["grad_norm"] < 1e-5, r


@pytest.fixture(scope="module")
def two_ranks():
    """tests/ds_two_ranks_check.py: 2 forked CPU ranks of Lightning's DeepSpeed strategy against
    one process with the global batch (~25 s)."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
        env.pop(k, None)
    # a hang (what the cases guard against) ends at the timeout; its forked ranks go with the group
    r = subprocess.run([sys.executable, str(REPO / "tests" / "ds_two_ranks_check.py")], capture_output=True, text=True,
                       timeout=300, env=env, start_new_session=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, (r.stdout + r.stderr)[-3000:]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_micro_batches_under_deepspeed_equal_one_process(two_ranks, stage):
    """Labels on some rows only, groups of 2 rows: in one window rank 0's two groups have losses
    and rank 1's none. ZeRO reduces gradients in every backward, a collective, so each rank runs
    one backward per group (a group without a loss step a zero loss); before, the ranks' counts
    differed and the run died in gloo. Under ZeRO-3 each rank also runs the head over every step
    (the module calls must agree): with the head only where its own labels are, DeepSpeed's check
    that the ranks traced the same module calls failed."""
    assert two_ranks[f"micro_zero{stage}"]["weights"] < 1e-6, two_ranks


def test_zero3_ranks_with_uneven_validation_batches_equal_one_process(two_ranks):
    """A table's 38 validation windows in batches of 8: 5 batches over 2 ranks. Served unevenly
    (as under DDP), the second rank ran out of batches while the first waited in its last batch's
    ZeRO-3 parameter gathers, forever; the data module now pads the second with a batch that has
    nothing to score, and the validation loss is the one process's."""
    r = two_ranks["uneven_validation_zero3"]
    assert r["windows"] == 38 and r["weights"] < 1e-6 and r["val_loss"] < 1e-6, two_ranks


@pytest.mark.parametrize("case", ["lstm", "lstm_checkpointed", "mingru"])
def test_zero3_ranks_with_resets_and_labels_at_other_steps_equal_one_process(two_ranks, case):
    """Under ZeRO-3 every module call gathers its parameters, so every rank must call the same
    modules: streams of documents resetting at other steps on each rank (LSTM, truncated and
    checkpointed BPTT; minGRU, whose scan takes resets) train and validate as one process with
    the global batch. Before, cuDNN layers were cut at each rank's own resets and the run hung
    (in training, and in validation when only training cut at every rank's resets)."""
    r = two_ranks[f"docs_zero3_{case}"]
    assert r["weights"] < 1e-6 and r["val_loss"] < 1e-6, two_ranks


def _convert(src, out, *extra):
    from conftest import distrnn_cmd

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run(distrnn_cmd("convert-checkpoint", str(src), str(out), *extra), capture_output=True,
                          text=True, timeout=300, env=env)


def test_convert_deepspeed_checkpoint_to_one_fp32_file(ds_checkpoint, tmp_path):
    """`distrnn convert-checkpoint` on the strategy's ZeRO-2 directory: one file with the module's
    exact fp32 weights and Lightning's and distrnn's state, loadable with weights_only=True (checksum
    sidecar included), that generates with the module's logits."""
    import torch

    from distrnn.checkpoint_files import load_checkpoint_file
    from distrnn.generate import load_model

    out = tmp_path / "model.ckpt"
    r = _convert(ds_checkpoint, out, "--trust_deepspeed_checkpoint", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "and its optimizer state: a run without DeepSpeed resumes from it" in r.stdout, r.stdout
    ckpt = load_checkpoint_file(out)
    assert (tmp_path / "model.ckpt.sha256").is_file()
    expected = torch.load(ds_checkpoint.parent.parent / "zero2.expected.pt", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(expected)
    for k, v in expected.items():
        assert ckpt["state_dict"][k].dtype == torch.float32 and torch.equal(ckpt["state_dict"][k], v), k
    assert ckpt["global_step"] == 8 and ckpt["distrnn"]["world_size"] == 1
    assert not {"ds_config", "optimizer", "param_shapes"} & set(ckpt)
    (adam,) = ckpt["optimizer_states"]  # one state per parameter, shaped like it
    assert [tuple(s["exp_avg"].shape) for s in adam["state"].values()] == [tuple(v.shape) for v in expected.values()]
    model = load_model(str(out))
    reference = load_model(str(out))
    reference.load_state_dict({k.removeprefix("model."): v for k, v in expected.items()})
    x = torch.randint(0, 50, (2, 16))
    assert torch.equal(model(x)[0], reference(x)[0])


def test_deepspeed_checkpoint_needs_the_trust_flag_and_every_shard(ds_checkpoint, tmp_path, capsys):
    """Without --trust_deepspeed_checkpoint neither convert nor fit opens the directory (DeepSpeed
    unpickles); a missing rank shard fails naming the file; exit 2 and nothing written. (The
    refusals happen before DeepSpeed is imported, so the converter runs in this process.) A
    shard that no converter reads: one line too."""
    import shutil

    from conftest import cli
    from distrnn.checkpoint_files import convert_main

    out = tmp_path / "model.ckpt"
    assert convert_main([str(ds_checkpoint), str(out)]) == 2
    err = capsys.readouterr().err
    assert "--trust_deepspeed_checkpoint" in err and str(ds_checkpoint) in err
    assert not out.exists()
    # an output that cannot be written: found before every rank's shards are read and joined
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("")
    for output, line in ((tmp_path / "a_folder", f"{tmp_path / 'a_folder'} is a folder: name the file to write, e.g. {tmp_path / 'a_folder' / 'model.ckpt'}"),
                         (tmp_path / "a_file" / "m.ckpt", f"a_file is not a folder (the converted checkpoint would go to {tmp_path / 'a_file' / 'm.ckpt'})")):
        assert convert_main([str(ds_checkpoint), str(output), "--trust_deepspeed_checkpoint", "true"]) == 2
        assert capsys.readouterr().err.strip() == f"distrnn: error: output: {line}"
    assert list((tmp_path / "a_folder").iterdir()) == []
    write_corpus(tmp_path / "corpus.txt", 2000)
    tiny = ["--config", str(REPO / "jobs/configs/tiny.yaml"), "--ckpt_path", str(ds_checkpoint)]
    for stage in ("fit", "test", "predict"):  # evaluation stages handed it to Lightning unchecked
        code, _, err = cli(capsys, stage, *tiny)
        assert code == 2 and "--trust_deepspeed_checkpoint" in err and err.count("error:") == 1, (stage, err[-2000:])
        # trusted, but no DeepSpeed strategy to load it (CPU): one line, not torch.load's traceback
        code, _, err = cli(capsys, stage, *tiny, "--trust_deepspeed_checkpoint", "true")
        assert code == 2 and "only a DeepSpeed trainer.strategy loads" in err and "convert-checkpoint" in err, (stage, err[-2000:])
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
    # a shard of no layout DeepSpeed or distrnn knows: one line (it was zero_to_fp32's traceback)
    import torch

    torch.save({"optimizer_state_dict": {"something": 1}}, shard)
    assert convert_main([str(broken), str(out), "--trust_deepspeed_checkpoint", "true"]) == 2
    err = capsys.readouterr().err  # (after DeepSpeed's own progress bar)
    assert err.splitlines()[-1].startswith(f"distrnn: error: checkpoint {broken}: DeepSpeed cannot join its weights: ")
    assert "is not a zero checkpoint" in err and "Traceback" not in err and err.count("error:") == 1, err
    assert not out.exists()


def test_fp16_min_loss_scale_is_deepspeeds_minimum(monkeypatch):
    """Under DeepSpeed fp16 its own loss scaler skips overflowing updates and stops the run at its
    minimum scale: distrnn's model.optimizer.min_loss_scale becomes that minimum in the config
    Lightning hands DeepSpeed (before, DeepSpeed's 1 whatever distrnn said); a DeepSpeed config
    that says otherwise is refused naming both."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import lightning as L
    from ds_lightning_check import LM, CPUDeepSpeedStrategy

    from distrnn.config import ConfigError, NetworkConfig, OptimizerConfig, TBPTTConfig
    from distrnn.engine import TBPTTModule

    def formatted(strategy, min_loss_scale):
        m = TBPTTModule(NetworkConfig(recurrence="gru", hidden_size=8), TBPTTConfig(k1=8),
                        OptimizerConfig(min_loss_scale=min_loss_scale), LM)
        m.trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, precision="16-mixed", logger=False,
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        m.setup("fit")
        strategy._init_config_if_needed()  # what strategy.setup does next: Lightning formats the config
        return strategy.config["fp16"]["min_loss_scale"]

    assert formatted(CPUDeepSpeedStrategy(stage=2), 64.0) == 64.0
    given = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}
    assert formatted(CPUDeepSpeedStrategy(config={**given, "fp16": {"enabled": True, "min_loss_scale": 64}}), 64.0) == 64.0
    with pytest.raises(ConfigError, match=r"model.optimizer.min_loss_scale \(1\) and DeepSpeed's fp16 min_loss_scale \(8\)"):
        formatted(CPUDeepSpeedStrategy(config={**given, "fp16": {"enabled": True, "min_loss_scale": 8}}), 1.0)
    with pytest.raises(ConfigError, match=r"\(2\) and DeepSpeed's fp16 min_loss_scale \(16\)"):
        formatted(CPUDeepSpeedStrategy(stage=2, min_loss_scale=16), 2.0)
