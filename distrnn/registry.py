"""The best checkpoint as a registered MLflow model.

``RegisterModel(name)`` (a callback: ``trainer.callbacks: [{class_path: distrnn.registry.RegisterModel,
init_args: {name: byte-lstm}}]``) logs the best checkpoint's network as an MLflow PyTorch model
with a signature and an input example into the job's run when training ends, and registers it
under ``name``. What is logged is a :class:`Predictor`: its forward gives the predictions from a
fresh state, one tensor, which is what MLflow's pyfunc flavor (``mlflow.pyfunc.load_model(...)
.predict``, ``mlflow models serve``) requires; ``mlflow.pytorch.load_model("models:/NAME/VERSION")
.model`` is the stateful :class:`~distrnn.model.RecurrentModel`, from which
``distrnn generate --model models:/NAME/VERSION`` samples. MLflow stores the module with cloudpickle: load models only from a registry you
trust (see SECURITY.md); distrnn's own checkpoints stay ``weights_only``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from distrnn.checkpoint import deepspeed_strategy
from distrnn.checkpoint_files import convert_deepspeed_checkpoint, is_deepspeed_checkpoint
from distrnn.generate import load_model


def example_input(task: Any, T: int = 16) -> torch.Tensor:
    if task.vocab_size:
        return torch.arange(T, dtype=torch.long).remainder(task.vocab_size).unsqueeze(0)
    return torch.zeros(1, T, task.input_dim or 1)


class Predictor(torch.nn.Module):
    """What the registry holds: ``forward(x_BT) -> y_BTO`` from a fresh state; ``model`` is the
    stateful RecurrentModel (``forward(x, state) -> (y, final_state)``, ``step``) for streaming."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def log_and_register(model: torch.nn.Module, run_id: str, name: str) -> Any:
    """Log the RecurrentModel ``model`` (a copy in eval mode, on CPU) to ``run_id`` as ``model``
    and register it as ``name``."""
    import copy

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    import distrnn

    predictor = Predictor(copy.deepcopy(model).cpu().eval())
    x = example_input(model.task)
    with torch.no_grad():
        y = predictor(x)
    # any batch and any length (an inferred signature would fix the example's length)
    signature = ModelSignature(inputs=Schema([TensorSpec(x.numpy().dtype, (-1, -1, *x.shape[2:]))]),
                               outputs=Schema([TensorSpec(y.numpy().dtype, (-1, -1, *y.shape[2:]))]))
    # Named, the requirements are not inferred: MLflow would import the model's whole stack in a
    # new process (~8 s) to find what distrnn's own dependencies already say.
    requirements = [*mlflow.pytorch.get_default_pip_requirements(), f"distrnn=={distrnn.__version__}"]
    with mlflow.start_run(run_id=run_id):
        # "pickle", not MLflow's default "pt2": an exported graph has no streaming `step` (generation)
        # and no `task`; the price is that loading unpickles, so the registry must be trusted
        info = mlflow.pytorch.log_model(predictor, name="model", signature=signature, input_example=x.numpy(),
                                        registered_model_name=name, serialization_format="pickle",
                                        pip_requirements=requirements)
    return info


class RegisterModel(Callback):
    """Register the best checkpoint (else the final weights) under ``name`` when training ends.

    Args:
        name: the registered model's name.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.version: Optional[str] = None

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLFlowLogger) or not logger.run_id:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        if best and is_deepspeed_checkpoint(best):
            # this run's own DeepSpeed directory (shards, no loadable module): its weights as one
            # fp32 file beside it, the file `distrnn convert-checkpoint` writes
            single = str(best).rstrip("/").removesuffix(".ckpt") + "-fp32.ckpt"
            best = str(convert_deepspeed_checkpoint(best, single, trusted=True))
        elif not best and getattr(deepspeed_strategy(trainer), "zero_stage_3", False):
            print("distrnn: warning: RegisterModel: nothing registered: under DeepSpeed ZeRO-3 the final weights are"
                  " partitioned across ranks; keep checkpoints (checkpoint.every_n_train_steps) to register the best",
                  flush=True)
            return
        model = load_model(best) if best else pl_module.model
        info = log_and_register(model, logger.run_id, self.name)
        self.version = str(info.registered_model_version)
        print(f"distrnn: registered {'the best checkpoint ' + best if best else 'the final weights'} as "
              f"models:/{self.name}/{self.version}")
