"""Train one of jobs/configs on whatever device is there, with a time limit, and print the
validation metric after every validation: the learning results of benchmarks/RESULTS.md.

    python benchmarks/learn.py jobs/configs/selective_copy_mingru.yaml --seconds 200 --json out.json

It builds the same objects as ``distrnn fit --config`` from the YAML's model/data/trainer keys but
needs neither jsonargparse nor MLflow (the GPU image has neither); use ``distrnn fit`` anywhere else.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import time

import lightning as L
import torch
import yaml

from distrnn.config import NetworkConfig, OptimizerConfig, TBPTTConfig
from distrnn.engine import TBPTTModule


class Report(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        m = {k: round(float(v), 5) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        row = {"step": trainer.global_step, "s": round(time.perf_counter() - self.t0, 1), **m}
        self.rows.append(row)
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
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
    trainer = L.Trainer(**t, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        max_time=datetime.timedelta(seconds=a.seconds), callbacks=[rep])
    trainer.fit(model, data)
    key = "val/accuracy" if data.task.kind == "classification" else "val/loss"
    vals = [r[key] for r in rep.rows if key in r]
    best = (max if key == "val/accuracy" else min)(vals) if vals else None
    out = {"config": a.config, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "updates": trainer.global_step, "seconds": round(time.perf_counter() - rep.t0, 1), "metric": key,
           "best": best, "last": vals[-1] if vals else None, "curve": rep.rows}
    print("RESULT", json.dumps({k: v for k, v in out.items() if k != "curve"}), flush=True)
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
