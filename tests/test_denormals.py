"""Subnormal floats flushed to zero as distrnn sets it (distrnn.denormals), in fresh processes: the
setting is per thread, so each probe asks PyTorch's CPU threads too, by multiplying a tensor of
subnormals over 2 OpenMP threads (each computes part of the product)."""

import platform
from pathlib import Path

import pytest

from conftest import cli, write_corpus
from helpers import run_probe

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"),
                                reason="PyTorch flushes subnormals on x86 and ARM64")

# the fraction of a product of subnormals by 1 that stays subnormal (1: computed, 0: flushed in
# every thread; in between: some of the threads flush), after the probe's step
PROBE = """
import json, sys, torch
torch.set_num_threads(2)
from distrnn import denormals

out = {}
args = sys.argv[1:]
if args[:1] == ["late"]:
    torch.ones(1 << 22).mul(2.0)  # starts PyTorch's OpenMP threads before the setting
    args = args[1:]
if args[:1] == ["generate"]:  # (distrnn.commands would exit after it)
    from distrnn.generate import main
    assert main(args[1:]) == 0
elif args:
    from distrnn.cli import main
    main(args)
else:
    out["result"] = denormals.flush_denormals()
x = denormals.subnormal_floats(1 << 22)
out["kept"] = (x.mul(1.0) != 0).float().mean().item()
out["subnormals"] = denormals.subnormals()
print("PROBE " + json.dumps(out))
"""

JOB = """
trainer: {max_steps: 3, limit_val_batches: 0, logger: false, enable_progress_bar: false}
model:
  network: {recurrence: mingru, hidden_size: 16}
  tbptt: {k1: 16}
data:
  class_path: distrnn.data.ByteCorpusDataModule
  init_args: {path: corpus.txt, batch_size: 4, seq_len: 32}
"""


def _probe(tmp_path: Path, *args: str, **env: str) -> dict:
    return run_probe(tmp_path, PROBE, *args, drop=lambda k: k in ("DISTRNN_DENORMALS", "OMP_NUM_THREADS"), **env)


def test_flush_denormals_reaches_the_threads_started_after_it_unless_told_not_to(tmp_path):
    """A fresh process computes subnormals; after flush_denormals, it and the OpenMP threads it
    starts flush them. DISTRNN_DENORMALS=keep leaves the CPU alone and says so. Threads started
    before keep computing them, and `subnormals()` (a run's environment tag) says so."""
    got = _probe(tmp_path)
    assert got == {"result": "flush", "kept": 0.0, "subnormals": "flushed"}, got
    got = _probe(tmp_path, DISTRNN_DENORMALS="keep")
    assert got == {"result": "keep: DISTRNN_DENORMALS=keep", "kept": 1.0, "subnormals": "computed"}, got
    # set after PyTorch started its threads, it reaches this thread alone: half the product
    got = _probe(tmp_path, "late")
    assert got["result"] == "flush" and 0 < got["kept"] < 1 and got["subnormals"] == "flushed in some threads", got


def test_fit_and_generate_flush_denormals_in_every_thread(tmp_path):
    """`distrnn fit` flushes before PyTorch starts its CPU threads (the training steps start them):
    flushed too late, the threads would keep computing subnormals (RESULTS.md, session 43: the
    selective-copy model from its trained weights trains 1.69x faster flushed). `distrnn generate` too."""
    write_corpus(tmp_path / "corpus.txt", 4000)
    (tmp_path / "job.yaml").write_text(JOB)
    got = _probe(tmp_path, "fit", "--config", "job.yaml", "--trainer.accelerator", "cpu")
    assert got == {"kept": 0.0, "subnormals": "flushed"}, got
    got = _probe(tmp_path, "fit", "--config", "job.yaml", "--trainer.accelerator", "cpu", DISTRNN_DENORMALS="keep")
    assert got == {"kept": 1.0, "subnormals": "computed"}, got
    # `distrnn generate` from that run's checkpoint, which does not go through the CLI class
    ckpt = str(next(tmp_path.glob("**/last.ckpt")))
    for env, want in (({}, {"kept": 0.0, "subnormals": "flushed"}), ({"DISTRNN_DENORMALS": "keep"}, {"kept": 1.0, "subnormals": "computed"})):
        got = _probe(tmp_path, "generate", "--checkpoint", ckpt, "--length", "20", **env)
        assert got == want, (env, got)


@pytest.mark.fresh_store
def test_a_bad_distrnn_denormals_is_one_line_exit_2_before_anything_is_written(tmp_path, monkeypatch, capsys):
    write_corpus(tmp_path / "corpus.txt", 4000)
    (tmp_path / "job.yaml").write_text(JOB.replace("logger: false, ", ""))
    monkeypatch.setenv("DISTRNN_DENORMALS", "daz")
    code, _, err = cli(capsys, "fit", "--config", "job.yaml")
    assert code == 2 and err.strip().splitlines()[-1] == "distrnn: error: DISTRNN_DENORMALS: must be one of flush, keep, got 'daz'", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "job.yaml"]
    code, _, err = cli(capsys, "generate", "--checkpoint", "missing.ckpt")
    assert code == 2 and err.strip().splitlines() == ["distrnn: error: DISTRNN_DENORMALS: must be one of flush, keep, got 'daz'"], err
