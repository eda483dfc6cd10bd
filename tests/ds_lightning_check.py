"""Lightning's DeepSpeed strategy around distrnn's TBPTT module (manual optimization), against
plain Lightning runs of the same module: run by tests/test_deepspeed.py (CPU) and tests/test_gpu.py.

    python tests/ds_lightning_check.py OUT_DIR --device cpu|cuda

Prints one ``RESULT {json}`` line. On CPU (``DS_ACCELERATOR=cpu``) the strategy is Lightning's own
with only its CUDA checks skipped (it refuses a CPU; DeepSpeed itself runs there): engine set-up,
the precision plugin, the optimizer and scheduler wiring, and the checkpoint directory are real.
Checks:
- ``equal``: ZeRO-2 and ZeRO-3, fp32: 6 updates with gradient clipping that bites equal the plain
  run's weights, and the reported pre-clip gradient norm equals the plain run's; so do the same
  updates with ``model.tbptt.micro_batch_size`` 2 (``equal_micro``; checkpointed BPTT in groups:
  ``equal_micro_checkpointed``);
- ``bf16``: ZeRO-2 and ZeRO-3 with bf16: the weights are bf16 in the engine, and the loss falls;
  with the Diagnostics callback, which measures what ZeRO leaves measurable and says what not; the
  checkpoint directory, and one of DeepSpeed's bf16 optimizer (ZeRO-1, fp32 gradient
  accumulation), converted to one file, against DeepSpeed's universal-checkpoint reading of it;
  resumed at update 4 of 8, the uninterrupted bf16 run's weights and carried state;
- ``resume``: ZeRO-2 and ZeRO-3: 8 updates (cosine schedule with warm-up), checkpoint directory at
  update 4; a new run resumed from it ends with the uninterrupted run's weights and carried state;
  the final directory converts to one fp32 file with the module's weights; (ZeRO-2) with MLflow and
  RegisterModel, the best checkpoint (a DeepSpeed directory) is registered through such a file
  (where MLflow is installed: not on the GPU image);
- ``clip_conflict``: a DeepSpeed config whose gradient_clipping differs from clip_norm is refused;
- ``ema_refused``: weight averaging (EMAWeightAveraging), whose average DeepSpeed's checkpoints drop,
  is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import ListDataModule, against_deepspeed_universal  # noqa: E402

from distrnn.checkpoint_files import convert_deepspeed_checkpoint  # noqa: E402
from distrnn.config import ConfigError, NetworkConfig, OptimizerConfig, TaskSpec, TBPTTConfig  # noqa: E402
from distrnn.data.loaders import StreamLoader  # noqa: E402
from distrnn.diagnostics import Diagnostics  # noqa: E402
from distrnn.rendezvous import host_rendezvous_on_loopback  # noqa: E402
from distrnn.state import state_tensors  # noqa: E402

try:  # the GPU image has no MLflow: there the registration check is left to the CPU suite
    from distrnn.registry import RegisterModel
    from distrnn.tracking import MLflowLogger
except ImportError:
    RegisterModel = MLflowLogger = None
from distrnn.engine import TBPTTModule  # noqa: E402


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy minus its refusal of a CPU."""

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)  # DeepSpeed reads the device index as the local rank

    def setup_environment(self) -> None:
        super(DeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:  # as DeepSpeedStrategy's, without the CUDA device-index check
        reset_seed()
        self.set_world_ranks()
        without_shm_comm_op()
        self._init_deepspeed_distributed()


def without_shm_comm_op() -> None:
    """DeepSpeed's CPU accelerator compiles a shared-memory all-reduce (C++, ~40 s on 2 cores) when
    its communication backend starts. Only ``inference_all_reduce`` uses it, never training, and a
    GPU has NCCL instead: the CPU tests train without it, through torch.distributed as on a GPU."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class AllowDeepSpeedOnCPU(L.Callback):
    """For processes that build their DeepSpeed strategy themselves (Ray Train workers, in a
    ``trainer.callbacks`` entry of the config): makes Lightning's and Ray's DeepSpeed strategy
    classes in this process behave as :class:`CPUDeepSpeedStrategy`. Tests only."""

    def __init__(self) -> None:
        classes = [DeepSpeedStrategy]
        try:
            from ray.train.lightning import RayDeepSpeedStrategy

            classes.append(RayDeepSpeedStrategy)
        except ImportError:
            pass
        for cls in classes:
            cls.root_device = property(lambda self: torch.device("cpu", self.local_rank))
            cls.setup_environment = CPUDeepSpeedStrategy.setup_environment
            cls.setup_distributed = CPUDeepSpeedStrategy.setup_distributed


LM = TaskSpec(kind="language_model", output_dim=50, vocab_size=50, seq_len=64)


def loader() -> StreamLoader:
    g = torch.Generator().manual_seed(0)
    return StreamLoader(torch.randint(0, 50, (6000,), generator=g, dtype=torch.uint8), 4, 64)


def module(lr: float = 1e-2, mode: str = "tbptt", micro: int | None = None) -> TBPTTModule:
    torch.manual_seed(0)
    tbptt = TBPTTConfig(k1=32, micro_batch_size=micro) if mode == "tbptt" else TBPTTConfig(mode=mode, k1=8, micro_batch_size=micro)
    return TBPTTModule(NetworkConfig(recurrence="lstm", hidden_size=16, num_layers=2), tbptt,
                       OptimizerConfig(name="adamw", lr=lr, clip_norm=0.05, schedule="cosine", warmup_updates=2), LM)


class Record(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        m = trainer.callback_metrics
        self.losses.append(float(m["train/loss"]))
        self.norms.append(float(m["train/grad_norm"]))


def fit(device: str, stage: int | None, max_steps: int, precision: str = "32-true", out: Path | None = None,
        ckpt: Path | None = None, config: dict | None = None, extra: list | None = None,
        logger=False, mode: str = "tbptt", zero: dict | None = None, micro: int | None = None) -> tuple[TBPTTModule, Record]:
    m, rec = module(mode=mode, micro=micro), Record()
    if stage is None:
        strategy = "auto"
    else:
        cls = CPUDeepSpeedStrategy if device == "cpu" else DeepSpeedStrategy
        strategy = cls(config=config) if config else cls(stage=stage)
        strategy.config["zero_optimization"].update(zero or {})
    callbacks = [rec, *(extra or [])]
    if out is not None:
        callbacks.append(ModelCheckpoint(dirpath=out, every_n_train_steps=4, save_top_k=-1, filename="{step}"))
    t = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, strategy=strategy, precision=precision,
                  max_steps=max_steps, logger=logger, log_every_n_steps=1, enable_checkpointing=out is not None,
                  callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0, limit_val_batches=0)
    host_rendezvous_on_loopback(t)
    t.fit(m, ListDataModule(loader()), ckpt_path=ckpt)
    return m, rec


def gathered(params) -> list[torch.Tensor]:
    """Whole copies of parameters that ZeRO-3 may have left partitioned (empty here)."""
    params = list(params)
    if all(p.numel() for p in params):
        return params
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def max_diff(a, b) -> float:
    return max((x.float().cpu() - y.float().cpu()).abs().max().item() for x, y in zip(a, b))


def against_plain(plain: TBPTTModule, plain_rec: Record, ds: TBPTTModule, rec: Record) -> dict:
    """How far a DeepSpeed run's weights, losses and gradient norms are from the plain run's."""
    return {
        "weights": max_diff(plain.model.parameters(), gathered(ds.model.parameters())),
        "losses": max(abs(x - y) for x, y in zip(rec.losses, plain_rec.losses)),
        "grad_norm": max(abs(x - y) / y for x, y in zip(rec.norms, plain_rec.norms)),
        "clip_bites": min(plain_rec.norms) > 0.05,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    a = ap.parse_args()
    if a.device == "cuda":  # exact fp32 on the GPU, so that 1e-5 comparisons mean something
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    result: dict = {}

    plain, plain_rec = fit(a.device, None, 6)
    for stage in (2, 3):
        ds, rec = fit(a.device, stage, 6)
        result[f"equal_zero{stage}"] = against_plain(plain, plain_rec, ds, rec)
        # the batch's 4 rows in 2 groups, accumulated in DeepSpeed's buffers, one step
        ds, rec = fit(a.device, stage, 6, micro=2)
        result[f"equal_micro_zero{stage}"] = against_plain(plain, plain_rec, ds, rec)

    # checkpointed BPTT (8 recomputed segments per update): ZeRO-2's gradient hooks see each
    # parameter once per update; under ZeRO-3 every parameter stays partitioned (no persistence
    # threshold: by default DeepSpeed keeps parameters this small whole), so the segments take
    # torch.utils.checkpoint
    plain, plain_rec = fit(a.device, None, 6, mode="checkpointed")
    for stage in (2, 3):
        ds, rec = fit(a.device, stage, 6, mode="checkpointed", zero={"stage3_param_persistence_threshold": 0} if stage == 3 else None)
        result[f"equal_checkpointed_zero{stage}"] = against_plain(plain, plain_rec, ds, rec)
    # and in groups of 2 rows, against the plain run in groups
    plain, plain_rec = fit(a.device, None, 6, mode="checkpointed", micro=2)
    for stage in (2, 3):
        ds, rec = fit(a.device, stage, 6, mode="checkpointed", micro=2,
                      zero={"stage3_param_persistence_threshold": 0} if stage == 3 else None)
        result[f"equal_micro_checkpointed_zero{stage}"] = against_plain(plain, plain_rec, ds, rec)

    for stage in (2, 3):
        diag = Diagnostics(every_n_steps=10, window=16)
        ds, rec = fit(a.device, stage, 40, precision="bf16-mixed", extra=[diag])
        result[f"bf16_zero{stage}"] = {
            "dtypes": sorted({str(p.dtype) for p in ds.model.parameters()}),
            "first": sum(rec.losses[:5]) / 5, "last": sum(rec.losses[-5:]) / 5,
            "finite": all(x == x for x in rec.losses + rec.norms),
            "diagnostics": [diag.curve, diag.gates, diag.grad_norms],
        }
        # its checkpoint directory (bf16 weights, fp32 master weights and moments in the shards)
        # converted, against DeepSpeed's own per-parameter reading of it
        d = a.out / f"bf16_zero{stage}.ckpt"
        ds.trainer.save_checkpoint(d)
        converted = convert_deepspeed_checkpoint(d, a.out / f"bf16_zero{stage}.pt", trusted=True)
        result[f"bf16_zero{stage}"]["universal"] = against_deepspeed_universal(d, converted)

    # bf16 resumed from the update-4 directory (bf16 weights, fp32 master weights and moments,
    # the carried state) ends with the uninterrupted bf16 run's weights and state
    for stage in (2, 3):
        d = a.out / f"bf16_resume_zero{stage}"
        full, _ = fit(a.device, stage, 8, precision="bf16-mixed", out=d)
        resumed, _ = fit(a.device, stage, 8, precision="bf16-mixed", ckpt=d / "step=4.ckpt")
        result[f"bf16_zero{stage}"]["resume"] = {
            "weights": max_diff(gathered(full.model.parameters()), gathered(resumed.model.parameters())),
            "state": max_diff(full._carry.state, resumed._carry.state),
            "state_dtypes": sorted({str(t.dtype) for t in state_tensors(resumed._carry.state)}),
        }

    # DeepSpeed's bf16 optimizer (what ZeRO-1 with bf16 weights and fp32 gradient accumulation
    # runs), whose shards are laid out otherwise: the same check
    ds, rec = fit(a.device, 1, 8, precision="bf16-mixed",
                  config={"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"},
                          "train_micro_batch_size_per_gpu": 4})
    d = a.out / "bf16_optimizer.ckpt"
    ds.trainer.save_checkpoint(d)
    result["bf16_optimizer"] = {
        "optimizer": type(ds.trainer.strategy.deepspeed_engine.optimizer).__name__,
        "finite": all(x == x for x in rec.losses + rec.norms),
        "universal": against_deepspeed_universal(d, convert_deepspeed_checkpoint(d, a.out / "bf16_optimizer.pt", trusted=True)),
    }
    # and a plain bf16-mixed run takes the file up (weights, moments, schedule) and goes on
    plain, rec = fit(a.device, None, 12, precision="bf16-mixed", ckpt=a.out / "bf16_optimizer.pt")
    result["bf16_optimizer"].update(resumed_to=plain.trainer.global_step, resumed_finite=all(x == x for x in rec.losses),
                                    resumed_batches=len(rec.losses))

    for stage in (2, 3):
        d = a.out / f"zero{stage}"
        # ZeRO-2 with MLflow and RegisterModel: the best checkpoint, a DeepSpeed directory, is registered
        register = RegisterModel("ds-zero2") if stage == 2 and RegisterModel else None
        logger = MLflowLogger(experiment_name="ds", tracking_uri=f"sqlite:///{a.out}/mlflow.db",
                              checkpoint_dir=str(a.out)) if register else False
        full, _ = fit(a.device, stage, 8, out=d, extra=[register] if register else [], logger=logger)
        resumed, _ = fit(a.device, stage, 8, ckpt=d / "step=4.ckpt")
        converted = torch.load(convert_deepspeed_checkpoint(d / "step=8.ckpt", a.out / f"zero{stage}.pt", trusted=True),
                               weights_only=True)
        expected = {f"model.{k}": v for k, v in full.model.state_dict().items()}
        torch.save(full.state_dict(), a.out / f"zero{stage}.expected.pt")
        result[f"resume_zero{stage}"] = {
            "weights": max_diff(full.model.parameters(), resumed.model.parameters()),
            "state": max_diff(full._carry.state, resumed._carry.state),
            "converted": max_diff([converted["state_dict"][k] for k in expected], expected.values()),
            "converted_keys": sorted(converted["state_dict"]) == sorted(expected),
            "global_step": converted["global_step"],
            "optimizer_converted": "optimizer_states" in converted,
        }
        # the update-4 directory converted with its optimizer state (joined from the shards) and
        # resumed without DeepSpeed: the ZeRO run's weights at update 8 (ZeRO updates equal plain
        # ones); the same file without its Adam moments (what weights alone give) ends elsewhere
        half = convert_deepspeed_checkpoint(d / "step=4.ckpt", a.out / f"zero{stage}-step4.pt", trusted=True)
        plain_resumed, _ = fit(a.device, None, 8, ckpt=half)
        bare = torch.load(half, weights_only=True)
        for s in bare["optimizer_states"][0]["state"].values():
            s.update(exp_avg=torch.zeros_like(s["exp_avg"]), exp_avg_sq=torch.zeros_like(s["exp_avg_sq"]))
        torch.save(bare, a.out / f"zero{stage}-step4-bare.pt")
        bare_resumed, _ = fit(a.device, None, 8, ckpt=a.out / f"zero{stage}-step4-bare.pt")
        result[f"resume_zero{stage}"].update(
            plain_weights=max_diff(full.model.parameters(), plain_resumed.model.parameters()),
            plain_state=max_diff(full._carry.state, plain_resumed._carry.state),
            without_moments=max_diff(full.model.parameters(), bare_resumed.model.parameters()))
        if register:
            result[f"resume_zero{stage}"]["registered"] = register.version
            result[f"resume_zero{stage}"]["registered_file"] = max_diff(
                [torch.load(d / "step=8-fp32.ckpt", weights_only=True)["state_dict"][k] for k in expected], expected.values())

    try:
        fit(a.device, 2, 1, config={"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0,
                                    "train_micro_batch_size_per_gpu": 4})
        result["clip_conflict"] = "accepted"
    except ConfigError as e:
        result["clip_conflict"] = str(e)
    try:
        fit(a.device, 2, 1, extra=[EMAWeightAveraging()])
        result["ema_refused"] = "accepted"
    except ConfigError as e:
        result["ema_refused"] = str(e)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    main()
