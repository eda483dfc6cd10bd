"""MLflow tracking: one run per training job, the whole resolved config as params."""

from __future__ import annotations

import os
from typing import Any, Optional

import mlflow
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only


class MLflowLogger(MLFlowLogger):
    """Lightning's MLflow logger with MLflow's own default store.

    The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else MLflow's default (a SQLite file,
    ``mlflow.db``, in the working directory), never Lightning's file store. Checkpoints go to
    ``checkpoint_dir/<experiment id>/<run id>/checkpoints``; the best and last are logged to the
    run as artifacts when training ends. Loggers act on rank 0 only, so a job has one run.
    Metrics are logged asynchronously (``synchronous=False``): a training step never waits for
    the store; MLflow flushes the queue when the run ends.
    """

    def __init__(
        self,
        experiment_name: str = "distrnn",
        run_name: Optional[str] = None,
        tracking_uri: Optional[str] = None,
        tags: Optional[dict[str, Any]] = None,
        checkpoint_dir: str = "checkpoints",
        log_model: bool = True,
        synchronous: bool = False,
    ) -> None:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=uri,
            tags=tags,
            save_dir=checkpoint_dir,
            log_model=log_model,
            synchronous=synchronous,
        )
        self._checkpoint_dir = checkpoint_dir

    @property
    def save_dir(self) -> Optional[str]:
        # Lightning's ModelCheckpoint puts files under save_dir/<experiment id>/<run id>/checkpoints.
        return self._checkpoint_dir


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)) and d and all(isinstance(v, dict) for v in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


class LogConfigToMLflow(SaveConfigCallback):
    """Logs the resolved config to the job's MLflow run: every key as a param, the YAML as
    ``config.yaml``. Runs after instantiation, so a bad config never creates a run."""

    @rank_zero_only
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLFlowLogger):
            return
        text = self.parser.dump(self.config, skip_none=False)
        import yaml

        params = {k: ("null" if v is None else str(v))[:6000] for k, v in flatten(yaml.safe_load(text)).items()}
        params.pop("config", None)
        logger.log_hyperparams(params)
        logger.experiment.log_text(logger.run_id, text, "config.yaml")
