"""WritePredictions (distrnn predict's writer) keeps about one batch in memory, however many
batches a prediction has. Its output against the model is tested in test_cli.py."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from distrnn.predict import WritePredictions

SPOOL = """
import re, sys, threading, time, torch
from pathlib import Path
from types import SimpleNamespace
from distrnn.predict import WritePredictions

def anon_mb():
    return int(re.search(r"RssAnon:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024

peak, done = [anon_mb()], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anon_mb())
        time.sleep(0.002)
before = anon_mb()
threading.Thread(target=watch, daemon=True).start()
trainer = SimpleNamespace(world_size=1, global_rank=0, is_global_zero=True, datamodule=None)
module = SimpleNamespace(task=SimpleNamespace(kind="language_model"))
writer = WritePredictions(sys.argv[1])
writer.on_predict_epoch_start(trainer, module)
for i in range(48):
    prediction = {"prediction": torch.full((256, 1024), i, dtype=torch.int64), "mask": torch.ones(256, 1024, dtype=torch.bool)}
    writer.write_on_batch_end(trainer, module, prediction, None, None, i, 0)
    del prediction
writer.on_predict_epoch_end(trainer, module)
done.set()
time.sleep(0.05)
print("GREW_MB", peak[0] - before)
"""


@pytest.mark.fresh_store  # checks what its folder holds
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_predictions_go_to_disk_batch_by_batch(tmp_path):
    """48 batches of 2.25 MB (108 MB of predictions): the process's own (anonymous) memory grows by
    far less than that (all of it before: 576 MB for 576 MB), the file holds every batch in order,
    and no parts are left beside it."""
    r = subprocess.run([sys.executable, "-c", SPOOL, str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    grew = int(r.stdout.split("GREW_MB")[1])
    assert grew < 40, f"the writer's process grew by {grew} MB for 108 MB of predictions"
    written = torch.load(tmp_path / "out.pt", mmap=True, weights_only=True)
    assert (written["task"], written["rank"], written["world_size"], len(written["batches"])) == ("language_model", 0, 1, 48)
    for i, batch in enumerate(written["batches"]):
        assert torch.equal(batch["prediction"], torch.full((256, 1024), i, dtype=torch.int64)) and batch["mask"].all()
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


def test_a_failed_prediction_leaves_nothing(tmp_path):
    """A prediction that fails midway (Lightning calls on_exception) leaves no parts and no file;
    one that runs again writes only its own batches."""
    trainer = SimpleNamespace(world_size=2, global_rank=1, is_global_zero=False, datamodule=None)
    module = SimpleNamespace(task=SimpleNamespace(kind="classification"))
    writer = WritePredictions(str(tmp_path / "sub" / "p.pt"))
    writer.on_predict_epoch_start(trainer, module)
    writer.write_on_batch_end(trainer, module, {"prediction": torch.zeros(3)}, None, None, 0, 0)
    assert len(list((tmp_path / "sub").iterdir())) == 1  # the parts folder
    writer.on_exception(trainer, module, RuntimeError("boom"))
    assert not list((tmp_path / "sub").iterdir())
    writer.on_predict_epoch_start(trainer, module)
    writer.write_on_batch_end(trainer, module, {"prediction": torch.ones(2)}, None, None, 0, 0)
    writer.on_predict_epoch_end(trainer, module)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["p.rank1.pt"] and writer.written == tmp_path / "sub" / "p.rank1.pt"
    written = torch.load(writer.written, weights_only=True)
    assert written["rank"] == 1 and len(written["batches"]) == 1 and torch.equal(written["batches"][0]["prediction"], torch.ones(2))


def test_a_padded_batch_is_left_out_of_the_predictions(tmp_path):
    """Under ZeRO-3 on several ranks an uneven loader pads a rank's last round with a stand-in
    batch (every rank must call the model as often): a real Lightning predict over rank 1's share
    of 5 batches on 2 ranks (padded to 3) writes its 2 batches, as the unpadded loader would."""
    import lightning as L

    from distrnn.config import TaskSpec
    from distrnn.data.loaders import TensorLoader

    from helpers import make_module

    g = torch.Generator().manual_seed(0)
    fields = {"x": torch.randn(18, 6, 3, generator=g), "y": torch.randn(18, 6, 1, generator=g)}
    task = TaskSpec(kind="regression", output_dim=1, input_dim=3, seq_len=6)
    module = make_module(task, recurrence="gru", hidden=8, k1=6)
    written = {}
    for pad in (False, True):
        loader = TensorLoader(fields, 4, rank=1, world_size=2, uneven=True)
        loader.pad_uneven = pad
        writer = WritePredictions(str(tmp_path / f"pad{pad}.pt"))
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[writer]).predict(module, dataloaders=loader, return_predictions=False)
        written[pad] = torch.load(writer.written, weights_only=True)["batches"]
    assert TensorLoader(fields, 4, rank=1, world_size=2, uneven=True).num_batches() == 2
    assert len(written[False]) == len(written[True]) == 2
    for a, b in zip(written[False], written[True]):
        assert torch.equal(a["prediction"], b["prediction"]) and b["mask"].all()
