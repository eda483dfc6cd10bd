"""Two CPU ranks of Lightning's DeepSpeed strategy (its refusal of a CPU lifted, the ranks forked)
against one process with the global batch: run by tests/test_deepspeed.py.

    DS_ACCELERATOR=cpu python tests/ds_two_ranks_check.py

Prints one ``RESULT {json}`` line: for each case the largest difference of the weights (and of
the last validation loss) from the single process's. Cases:
- ``micro_zero2``/``micro_zero3``: ``micro_batch_size`` 2 over labels that only some rows have
  (in one window rank 0's two groups have losses, rank 1's none): ZeRO reduces gradients in every
  backward, a collective, so each rank runs one per group (before, the ranks' counts differed and
  the run died in gloo);
- ``docs_zero3_lstm`` (truncated and checkpointed BPTT), ``docs_zero3_mingru``: streams of
  documents whose resets fall at other steps on each rank: under ZeRO-3 each module call gathers
  its parameters, so the ranks cut cuDNN layers at every rank's resets and run the head over the
  same steps (before, a partial label mask failed DeepSpeed's trace check and documents hung).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ds_lightning_check import CPUDeepSpeedStrategy  # noqa: E402
from helpers import make_module  # noqa: E402

from distrnn.config import TaskSpec  # noqa: E402
from distrnn.data import TimeSeriesDataModule  # noqa: E402
from distrnn.data.loaders import StreamLoader, TensorLoader  # noqa: E402
from distrnn.rendezvous import host_rendezvous_on_loopback, release_rendezvous  # noqa: E402

LM = TaskSpec(kind="language_model", output_dim=40, vocab_size=40, seq_len=16)

# a forked rank has none of the parent's OpenMP threads, and GNU OpenMP would wait for them in its
# next parallel region (as tests/conftest.py says): one thread per rank
os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))


class _GatheringLauncher(_MultiProcessingLauncher):
    """Lightning's fork launcher, whose rank 0 sends its module's weights to the main process:
    gathered first (every rank joins), as ZeRO-3 may have left them partitioned."""

    def _collect_rank_zero_results(self, trainer, results):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(trainer.lightning_module.parameters())):
            return super()._collect_rank_zero_results(trainer, results)


class ForkedCPUDeepSpeedStrategy(CPUDeepSpeedStrategy):
    def _configure_launcher(self) -> None:
        self._launcher = _GatheringLauncher(self, start_method="fork")


class Labels(L.LightningDataModule):
    """8 sequences of 16 steps, labels on some rows only (rank r takes samples 4r..4r+3)."""

    def __init__(self, per_rank: int) -> None:
        super().__init__()
        self.per_rank = per_rank

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 40, (8, 16), generator=g)
        mask = torch.zeros(8, 16, dtype=torch.bool)
        mask[0, 5] = mask[1, 2:7] = mask[3, 6] = True  # steps 4-7: both of rank 0's groups of 2
        mask[5, 12:] = mask[6, 9] = True
        return TensorLoader({"x": x, "y": torch.randint(0, 40, (8, 16), generator=g), "mask": mask}, self.per_rank,
                            rank=self.trainer.global_rank, world_size=self.trainer.world_size)


class Documents(L.LightningDataModule):
    def __init__(self, per_rank: int) -> None:
        super().__init__()
        self.per_rank = per_rank

    def _loader(self, seed: int) -> StreamLoader:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 40, (2001,), generator=g, dtype=torch.uint8)
        starts = torch.tensor([37, 100, 250, 333, 500, 777, 900, 1200, 1500, 1800])
        return StreamLoader(tokens, self.per_rank, 16, rank=self.trainer.global_rank,
                            world_size=self.trainer.world_size, doc_starts_D=starts)

    def train_dataloader(self):
        return self._loader(0)

    def val_dataloader(self):
        return self._loader(1)


def fit(data: L.LightningDataModule, stage: int | None, rec: str = "gru", mode: str = "tbptt", k1: int = 4,
        micro: int | None = None, task: TaskSpec = LM, **trainer) -> tuple[torch.nn.Module, float | None]:
    module = make_module(task, recurrence=rec, hidden=16, mode=mode, k1=k1, name="adamw", lr=0.05, seed=0,
                         micro_batch_size=micro)
    # (ZeRO-3 keeps parameters this small whole, but still traces the module calls and checks
    # that the ranks' traces agree; partitioned ones would be gathered per call)
    strategy = "auto" if stage is None else ForkedCPUDeepSpeedStrategy(stage=stage)
    t = L.Trainer(accelerator="cpu", devices=1 if stage is None else 2, strategy=strategy, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **trainer)
    if stage is not None:
        host_rendezvous_on_loopback(t)
    t.fit(module, data)
    release_rendezvous()
    val = t.callback_metrics.get("val/loss")
    return module, None if val is None else float(val)


def diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def main() -> None:
    result: dict = {}
    single, _ = fit(Labels(8), None, micro=2, max_epochs=2)
    for stage in (2, 3):
        ds, _ = fit(Labels(4), stage, micro=2, max_epochs=2)
        result[f"micro_zero{stage}"] = {"weights": diff(single, ds)}
    docs = dict(max_steps=12, val_check_interval=3, limit_val_batches=4, num_sanity_val_steps=0)
    for name, rec, mode, k1 in (("lstm", "lstm", "tbptt", 8), ("lstm_checkpointed", "lstm", "checkpointed", 5),
                                ("mingru", "mingru", "tbptt", 8)):
        single, val = fit(Documents(4), None, rec, mode, k1, **docs)
        ds, ds_val = fit(Documents(2), 3, rec, mode, k1, **docs)
        result[f"docs_zero3_{name}"] = {"weights": diff(single, ds), "val_loss": abs(val - ds_val)}
    # a table's validation windows (38, in batches of 8: 5 over 2 ranks) are served unevenly; under
    # ZeRO-3 the second rank gets a padded batch with nothing to score, or the first would wait
    # for it in its last batch's parameter gathers
    with tempfile.TemporaryDirectory() as d:
        t = np.arange(300, dtype=np.float64)
        path = Path(d) / "series.csv"
        pd.DataFrame({"a": np.sin(t / 7), "b": np.cos(t / 5)}).to_csv(path, index=False)

        def table(batch_size: int) -> TimeSeriesDataModule:
            dm = TimeSeriesDataModule(str(path), features=["a", "b"], window=20, horizon=3, batch_size=batch_size)
            dm.setup("fit")
            return dm

        task = table(8).task
        kw = dict(task=task, k1=20, max_steps=4, val_check_interval=4, num_sanity_val_steps=0)
        single, val = fit(table(16), None, **kw)
        ds, ds_val = fit(table(8), 3, **kw)
        result["uneven_validation_zero3"] = {"weights": diff(single, ds), "val_loss": abs(val - ds_val),
                                             "windows": len(table(8)._starts["val"])}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    main()
