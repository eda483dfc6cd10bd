"""glibc's malloc as distrnn sets it for training on a CPU (distrnn.host_memory), in fresh processes:
what glibc does with a large tensor before and after, by glibc's own count of its mmap-ed chunks."""

from pathlib import Path

import pytest

from distrnn import host_memory

from conftest import cli, write_corpus
from helpers import run_probe

pytestmark = pytest.mark.skipif(host_memory.mmapped_bytes() is None, reason="needs glibc 2.33+ (mallinfo2)")

MiB64 = 64 << 20
# bytes that a live 64 MiB tensor adds to glibc's mmap-ed chunks, before and after distrnn's
# setting (the function's own, or the one `distrnn fit` made, with a CLI's arguments)
PROBE = """
import json, sys, torch
from distrnn import host_memory

def mapped():
    before = host_memory.mmapped_bytes()
    t = torch.ones(64 << 20, dtype=torch.uint8)
    return host_memory.mmapped_bytes() - before

out = {"before": mapped()}
if sys.argv[1:]:
    from distrnn.cli import main
    main(sys.argv[1:])
else:
    out["result"] = host_memory.keep_freed_memory()
out["after"] = mapped()
print("PROBE " + json.dumps(out))
"""

JOB = """
trainer: {max_steps: 3, limit_val_batches: 0, logger: false, enable_progress_bar: false}
model:
  network: {recurrence: gru, hidden_size: 16}
  tbptt: {k1: 16}
data:
  class_path: distrnn.data.ByteCorpusDataModule
  init_args: {path: corpus.txt, batch_size: 4, seq_len: 32}
"""


def _probe(tmp_path: Path, *args: str, **env: str) -> dict:
    return run_probe(tmp_path, PROBE, *args, drop=lambda k: k.startswith("MALLOC_") or k == "DISTRNN_MALLOC", **env)


def test_keep_freed_memory_serves_large_tensors_from_the_heap_unless_told_not_to(tmp_path):
    """glibc as it is maps a 64 MiB tensor with mmap (and unmaps it when freed); after
    keep_freed_memory it comes from the heap. DISTRNN_MALLOC=system, or a MALLOC_*_ variable of
    the user's own, leaves glibc alone and says why."""
    got = _probe(tmp_path)
    assert got == {"before": pytest.approx(MiB64, abs=1 << 16), "result": "keep", "after": 0}, got
    for env, why in (({"DISTRNN_MALLOC": "system"}, "system: DISTRNN_MALLOC=system"),
                     ({"MALLOC_TOP_PAD_": "131072"}, "system: the environment sets MALLOC_TOP_PAD_")):
        got = _probe(tmp_path, **env)
        assert got["result"] == why and got["after"] == got["before"] >= MiB64, (env, got)


def test_cpu_fit_keeps_freed_memory(tmp_path):
    """`distrnn fit` on a CPU leaves its process with glibc set so (the steps' buffers reused:
    RESULTS.md, session 42)."""
    write_corpus(tmp_path / "corpus.txt", 4000)
    (tmp_path / "job.yaml").write_text(JOB)
    got = _probe(tmp_path, "fit", "--config", "job.yaml", "--trainer.accelerator", "cpu")
    assert got["before"] >= MiB64 and got["after"] == 0, got


@pytest.mark.fresh_store
def test_a_bad_distrnn_malloc_is_one_line_exit_2_before_anything_is_written(tmp_path, monkeypatch, capsys):
    write_corpus(tmp_path / "corpus.txt", 4000)
    (tmp_path / "job.yaml").write_text(JOB.replace("logger: false, ", ""))
    monkeypatch.setenv("DISTRNN_MALLOC", "jemalloc")
    code, _, err = cli(capsys, "fit", "--config", "job.yaml")
    assert code == 2 and err.strip().splitlines()[-1] == "distrnn: error: DISTRNN_MALLOC: must be one of keep, system, got 'jemalloc'", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "job.yaml"]
