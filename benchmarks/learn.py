"""Train one of jobs/configs on whatever device is there, with a time limit, and print the
validation metric after every validation: the learning results of benchmarks/RESULTS.md.

    python benchmarks/learn.py jobs/configs/selective_copy_mingru.yaml --seconds 200 --json out.json
    python benchmarks/learn.py CONFIG --seconds 500 --save out/sc                  # then, later:
    python benchmarks/learn.py CONFIG --seconds 500 --save out/sc2 --resume out/sc/last.ckpt
    kill -USR1 PID                # stop a call now: last.ckpt is written, the next call goes on from it

It builds the same objects as ``distrnn fit --config`` from the YAML's model/data/checkpoint/trainer
keys but needs neither jsonargparse nor MLflow (the GPU image has neither); use ``distrnn fit``
anywhere else. With ``--save`` the config's checkpoints (best and last, distrnn's ``Checkpoint``)
go to that folder, ``last.ckpt`` written when the time or update limit stops the call; ``--resume``
goes on from such a file exactly as ``distrnn fit --ckpt_path`` does (weights, optimizer, schedule,
data position, RNG), so one schedule longer than a device call runs over several calls; the
validation curve travels in the checkpoint too, so ``best`` and ``curve`` are the whole schedule's
(``best_this_call``: this call's alone).
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import time

import lightning as L
import torch
import yaml

from distrnn.checkpoint import CHECKPOINT_DEFAULTS, AtomicCheckpointIO, Checkpoint
from distrnn.config import NetworkConfig, OptimizerConfig, TBPTTConfig
from distrnn.denormals import flush_denormals
from distrnn.engine import TBPTTModule
from distrnn.host_memory import keep_freed_memory_on_cpu


class StopAfter(L.Callback):
    """Stops training after this process's seconds or updates, or when asked by SIGUSR1 (``kill
    -USR1 PID``: the update under way ends, and with ``--save`` last.ckpt is written as at a limit,
    so a long run on a shared machine stops at any time without losing the updates since its last
    validation). Not Lightning's ``max_time``: its timer is saved in the checkpoint, so a resumed
    call would count the earlier calls' time."""

    def __init__(self, seconds: float, updates: int | None) -> None:
        self.seconds, self.updates = seconds, updates
        self.t0 = time.perf_counter()
        self.first = 0
        self.asked = False
        signal.signal(signal.SIGUSR1, self._ask)

    def _ask(self, signum, frame) -> None:
        self.asked = True

    def on_train_start(self, trainer, pl_module) -> None:
        self.first = trainer.global_step  # restored by now when the call resumes

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        out_of_time = time.perf_counter() - self.t0 >= self.seconds
        if self.asked or out_of_time or (self.updates is not None and trainer.global_step - self.first >= self.updates):
            trainer.should_stop = True


class Report(L.Callback):
    """The validation curve. Saved in the checkpoint (a stateful callback), so a call that resumes
    reports the whole schedule's curve and best, not only its own (``call`` says which call
    measured a row)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()
        self.call = 1

    def state_dict(self) -> dict:
        return {"rows": self.rows, "call": self.call}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows, self.call = list(state_dict["rows"]), state_dict["call"] + 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        m = {k: round(float(v), 5) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        row = {"step": trainer.global_step, "call": self.call, "s": round(time.perf_counter() - self.t0, 1), **m}
        self.rows.append(row)
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--updates", type=int, default=None, help="stop after this many updates of this call")
    ap.add_argument("--json", default=None)
    ap.add_argument("--save", default=None, help="folder for the config's checkpoints (best and last.ckpt)")
    ap.add_argument("--resume", default=None, help="a last.ckpt of an earlier call to go on from")
    a = ap.parse_args()
    flush_denormals()  # as `distrnn fit` runs, before PyTorch starts its CPU threads (distrnn/denormals.py)
    cfg = yaml.safe_load(open(a.config))
    torch.set_float32_matmul_precision("high")
    L.seed_everything(cfg.get("seed_everything", 0))
    d = cfg["data"]
    module_name, cls_name = d["class_path"].rsplit(".", 1)
    data = getattr(importlib.import_module(module_name), cls_name)(**d.get("init_args", {}))
    m = cfg["model"]
    model = TBPTTModule(NetworkConfig(**m.get("network", {})), TBPTTConfig(**m.get("tbptt", {})),
                        OptimizerConfig(**m.get("optimizer", {})), data.task)
    t = {k: v for k, v in cfg.get("trainer", {}).items() if k not in ("logger", "callbacks")}
    rep = Report()
    callbacks: list[L.Callback] = [rep, StopAfter(a.seconds, a.updates)]
    if a.save:
        callbacks.append(Checkpoint(dirpath=a.save, **{**CHECKPOINT_DEFAULTS, **(cfg.get("checkpoint") or {})}))
    trainer = L.Trainer(**t, logger=False, enable_checkpointing=bool(a.save), enable_progress_bar=False,
                        callbacks=callbacks, plugins=[AtomicCheckpointIO()])
    keep_freed_memory_on_cpu(trainer)  # as `distrnn fit` runs (README, "Memory on a CPU")
    trainer.fit(model, data, ckpt_path=a.resume)
    key = "val/accuracy" if data.task.kind == "classification" else "val/loss"
    vals = [r[key] for r in rep.rows if key in r]
    pick = max if key == "val/accuracy" else min
    mine = [r[key] for r in rep.rows if key in r and r["call"] == rep.call]
    out = {"config": a.config, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "updates": trainer.global_step, "seconds": round(time.perf_counter() - rep.t0, 1), "metric": key,
           "best": pick(vals) if vals else None, "best_this_call": pick(mine) if mine else None,
           "last": vals[-1] if vals else None, "call": rep.call, "resumed_from": a.resume, "curve": rep.rows}
    print("RESULT", json.dumps({k: v for k, v in out.items() if k != "curve"}), flush=True)
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
