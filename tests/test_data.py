"""Data modules and loaders: coverage, order, resets, resume, formats."""

import gzip
import hashlib
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distrnn.config import ConfigError
from distrnn.data import (
    ByteCorpusDataModule,
    SequentialMNISTDataModule,
    StreamLoader,
    SyntheticDataModule,
    TensorLoader,
    TimeSeriesDataModule,
)
from distrnn.data.download import Corpus, DownloadError, fetch_corpus
from distrnn.data.mnist import read_idx
from distrnn.data.text import read_bytes
from distrnn.data.synthetic import adding_problem, copy_memory, selective_copy


@pytest.mark.parametrize("n,B,L,world", [(1000, 4, 32, 1), (1001, 3, 50, 2), (97, 2, 7, 3)])
def test_streams_read_every_token_once(n, B, L, world):
    tokens = torch.arange(n) % 251
    seen_inputs, seen_targets = [], []
    for rank in range(world):
        loader = StreamLoader(tokens.to(torch.uint8), B, L, rank=rank, world_size=world)
        for i, batch in enumerate(loader):
            pos = loader.stream_positions(i)
            m = batch["mask"]
            assert torch.equal(pos >= 0, m)
            assert torch.equal(batch["x"][m], tokens[pos[m]])
            assert torch.equal(batch["y"][m], tokens[pos[m] + 1])
            seen_inputs.append(pos[m])
            seen_targets.append(pos[m] + 1)
            assert batch["reset"][:, 0].all() == (i == 0)
    # across ranks: inputs 0..n-2 once each, targets 1..n-1 once each
    assert torch.equal(torch.cat(seen_inputs).sort().values, torch.arange(n - 1))
    assert torch.equal(torch.cat(seen_targets).sort().values, torch.arange(1, n))
    # every rank's batch says how many loss steps all ranks' rows have at each step
    loaders = [StreamLoader(tokens.to(torch.uint8), B, L, rank=rank, world_size=world) for rank in range(world)]
    for i in range(len(loaders[0])):
        batches = [ld.make_batch(0, i) for ld in loaders]
        total = sum(b["mask"].sum(dim=0) for b in batches)
        assert all(torch.equal(b["mask_total"], total) for b in batches), i


def test_streams_are_contiguous_in_order():
    tokens = torch.arange(1000)
    loader = StreamLoader(tokens, 4, 16)
    rows = torch.cat([b["x"] for b in loader], dim=1)
    for r in range(4):
        valid = rows[r][: int(loader.lengths_B[r])]
        assert torch.equal(valid, torch.arange(int(loader.offsets_B[r]), int(loader.offsets_B[r]) + valid.numel()))


def test_doc_starts_reset_the_rows_that_cross_them(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("a" * 50)
    (folder / "b.txt").write_text("b" * 70)
    dm = ByteCorpusDataModule(path=str(folder), batch_size=2, seq_len=10, val_fraction=0.1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    resets = []
    for i, batch in enumerate(loader):
        pos = loader.stream_positions(i)
        for r, t in zip(*torch.nonzero(batch["reset"], as_tuple=True)):
            resets.append((i, int(r), int(t), int(pos[r, t])))
    starts = {p for (i, r, t, p) in resets if i > 0 or t > 0}
    assert starts == {50}  # the first byte of b.txt, wherever its stream reads it


@pytest.mark.parametrize("world", [1, 2])
def test_resets_fall_where_the_files_start_as_a_mask_over_the_corpus_says(tmp_path, world):
    """Resets against a mask as long as the corpus (the independent reference): every step whose
    input is a file's first byte resets its row, no other step does (besides every row's first
    step of the epoch); files of random lengths, some shorter than a chunk, several per stream."""
    g = torch.Generator().manual_seed(3)
    folder = tmp_path / "docs"
    folder.mkdir()
    sizes = torch.randint(1, 40, (23,), generator=g).tolist()
    for i, n in enumerate(sizes):
        (folder / f"{i:02d}.txt").write_bytes(bytes([65 + i]) * n)
    starts_mask = torch.zeros(sum(sizes), dtype=torch.bool)
    starts_mask[torch.tensor([0] + sizes[:-1]).cumsum(0)] = True
    n_resets = 0
    for rank in range(world):
        dm = ByteCorpusDataModule(path=str(folder), batch_size=3, seq_len=7, val_fraction=0.2)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=0)
        dm.setup("fit")
        for name in ("train_dataloader", "val_dataloader"):
            loader = getattr(dm, name)()
            offset = 0 if name == "train_dataloader" else dm.splits["train"].tokens_N.numel()
            for i, batch in enumerate(loader):
                pos = loader.stream_positions(i)
                valid = pos >= 0
                expected = starts_mask[offset + pos.clamp(min=0)] & valid
                if i == 0:
                    expected[:, 0] = True
                assert torch.equal(batch["reset"], expected), (name, rank, i)
                n_resets += int(expected.sum())
    assert n_resets > 2 * world * 3  # more than the epochs' first steps


@pytest.mark.parametrize("layout,size", [("file", 2 << 30), ("folder", 1 << 29)])
def test_a_corpus_is_memory_mapped_not_read(tmp_path, layout, size):
    """A 2 GiB corpus file, or a folder of two 256 MiB files (sparse: no disk used), is set up and
    served without its bytes entering memory: the process grows by far less than the corpus
    (reading it, and a reset mask as long as it, cost 3x the corpus before: 6 GB for the file).
    Batches read what the files hold at their positions; the folder's second file resets its row."""
    import subprocess
    import sys

    marker = 3 * size // 8  # where stream 2 of 4 starts: 2/4 of the training part, 3/4 of the corpus
    parts = [(tmp_path / "big.bin", size)] if layout == "file" else [(tmp_path / "docs" / n, size // 2) for n in "ab"]
    for path, n in parts:
        path.parent.mkdir(exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(n)
    with open(parts[0][0], "r+b") as f:
        f.seek(marker)
        f.write(b"distrnn")
    code = f"""
import re, torch
from pathlib import Path
from distrnn.data import ByteCorpusDataModule
def rss_mb(key): return int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024
before = rss_mb("VmRSS")
dm = ByteCorpusDataModule(path={str(parts[0][0] if layout == "file" else tmp_path / "docs")!r}, batch_size=4, seq_len=64,
                          val_fraction=0.25, cache_dir={str(tmp_path / "cache")!r})
dm.check("fit")
loader = dm.train_dataloader()
assert loader.offsets_B[2] == {marker}, loader.offsets_B
batch = next(iter(loader))
assert bytes(batch["x"][2, :7].tolist()) == b"distrnn" and bytes(batch["y"][2, :6].tolist()) == b"istrnn"
assert not batch["x"][[0, 1, 3]].any() and batch["reset"][:, 0].all() and not batch["reset"][:, 1:].any()
if {layout!r} == "folder":  # b starts at {size // 2}, in stream 2: {size // 2 - marker} steps in
    t = {size // 2 - marker}
    later = loader.make_batch(0, t // 64)
    assert later["reset"][2, t % 64] and later["reset"].sum() == 1
print("GREW_MB", rss_mb("VmHWM") - before)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    grew = int(r.stdout.split("GREW_MB")[1])
    assert grew < 256, f"the process grew by {grew} MB for a {size >> 20} MB corpus"


def test_a_folder_is_copied_once_and_again_when_it_changes(tmp_path):
    """A folder corpus is served from one file under cache_dir holding its files' bytes in order;
    a second setup reuses it (not rewritten); a changed file makes a new copy and removes the old;
    an unwritable cache_dir is one error naming data.cache_dir."""
    folder = tmp_path / "docs"
    folder.mkdir()
    contents = {"b.txt": b"second file", "a.txt": b"first", "empty.txt": b"", "c/d.txt": b"nested, third"}
    for name, data in contents.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)

    def served(cache):  # what ByteCorpusDataModule splits into training and validation
        tokens, doc_starts = read_bytes(folder, "**/*", cache)
        return bytes(tokens.tolist()), doc_starts.tolist()

    cache = tmp_path / "cache"
    assert served(cache) == (b"first" + b"second file" + b"nested, third", [0, 5, 16])  # a, b, c/d; no empty
    (copy,) = (cache / "folders").glob("*.bin")
    stamp = copy.stat().st_mtime_ns, copy.stat().st_ino
    assert served(cache)[0].startswith(b"first") and (copy.stat().st_mtime_ns, copy.stat().st_ino) == stamp
    (folder / "a.txt").write_bytes(b"first, longer")
    assert served(cache) == (b"first, longer" + b"second file" + b"nested, third", [0, 13, 24])
    assert [p for p in (cache / "folders").glob("*.bin")] != [copy] and not copy.exists()
    left = sorted(p.name for p in (cache / "folders").iterdir())
    assert len(left) == 3 and left[0].endswith(".lock"), left  # the new copy, its starts and its lock
    # a cache inside the folder: its copies are not part of the corpus
    expected = (b"first, longer" + b"second file" + b"nested, third", [0, 13, 24])
    assert served(folder / "cache") == expected and served(folder / "cache") == expected
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="^data.cache_dir: cannot write a copy of the folder"):
        served(tmp_path / "a_file" / "cache")


def test_loader_resumes_at_the_saved_position():
    tokens = torch.arange(3000) % 200
    a = StreamLoader(tokens, 3, 20)
    it = iter(a)
    for _ in range(7):
        next(it)
    state = a.state_dict()
    assert state == {"epoch": 0, "next_index": 7, "layout": {"data.batch_size": 3, "data.seq_len": 20, "the data (tokens)": 3000}, "num_batches": 50}
    rest = list(it)
    b = StreamLoader(tokens, 3, 20)
    b.load_state_dict(state)
    resumed = list(b)
    assert len(resumed) == len(rest)
    for x, y in zip(rest, resumed):
        assert torch.equal(x["x"], y["x"]) and x["index"] == y["index"]
    assert list(b)[0]["index"] == 0  # the next epoch starts at the beginning


def _made_by_thread(loader):
    """Wrap ``loader.make_batch`` to record (index, thread name) of each batch made."""
    made, make = [], loader.make_batch

    def recording(epoch, index):
        made.append((index, threading.current_thread().name))
        return make(epoch, index)

    loader.make_batch = recording
    return made


def _loaders():
    tokens = torch.arange(3000) % 200
    synth = SyntheticDataModule("selective_copy", seq_len=64, batch_size=4, train_batches=9)
    series = {"x": torch.randn(50, 2), "label": torch.arange(50)}
    return [
        StreamLoader(tokens, 3, 20),
        synth.train_dataloader(),
        TensorLoader(series, 8, shuffle=True, seed=3, transform=lambda b: {"x": b["x"].unsqueeze(1), "y": b["label"]}),
    ]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


def test_the_next_batch_is_made_in_a_thread_ahead_and_the_batches_and_position_are_as_without():
    for loader in _loaders():
        assert not loader.prefetch  # on a CPU run; the data module turns it on for CUDA runs
        plain = [list(loader), list(loader)]  # two epochs
        loader.prefetch, loader._own_epoch = True, -1
        made = _made_by_thread(loader)
        it = iter(loader)
        first = next(it)
        _same(first, plain[0][0])
        # batch 1 is being made (or made) while batch 0 is consumed, in another thread
        deadline = time.monotonic() + 10
        while len(made) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [i for i, _ in made] == [0, 1]
        assert all(name.startswith("distrnn-prefetch") for _, name in made)
        assert threading.current_thread().name not in {name for _, name in made}
        # the saved position counts what was consumed, not what was made ahead
        assert loader.state_dict()["next_index"] == 1
        for got, want in zip([first, *it], plain[0]):
            _same(got, want)
        for got, want in zip(loader, plain[1]):
            _same(got, want)
        assert len(plain[0]) == len(loader)


def test_a_prefetched_loader_resumes_where_it_was_saved_and_drops_the_batch_made_ahead():
    tokens = torch.arange(3000) % 200
    a = StreamLoader(tokens, 3, 20)
    a.prefetch = True
    made = _made_by_thread(a)
    it = iter(a)
    for _ in range(7):
        next(it)
    state = a.state_dict()
    assert state["next_index"] == 7 and max(i for i, _ in made) >= 7 - 1
    it.close()  # a run stopped mid-epoch: the thread ends, the batch made ahead is gone
    assert not [t for t in threading.enumerate() if t.name.startswith("distrnn-prefetch")]
    b = StreamLoader(tokens, 3, 20)
    b.prefetch = True
    b.load_state_dict(state)
    c = StreamLoader(tokens, 3, 20)
    want = list(c)[7:]
    got = list(b)
    assert [x["index"] for x in got] == list(range(7, 50))
    for x, y in zip(got, want):
        _same(x, y)


def test_an_error_making_a_batch_ahead_reaches_the_consumer_at_that_batch():
    loader = StreamLoader(torch.arange(3000) % 200, 3, 20)
    loader.prefetch = True
    make = loader.make_batch

    def failing(epoch, index):
        if index == 3:
            raise ConfigError("data.path: batch 3 is unreadable")
        return make(epoch, index)

    loader.make_batch = failing
    it = iter(loader)
    assert [next(it)["index"] for _ in range(3)] == [0, 1, 2]  # batch 3 has been tried by now
    assert loader.state_dict()["next_index"] == 3
    with pytest.raises(ConfigError, match="batch 3 is unreadable"):
        next(it)
    assert loader.state_dict()["next_index"] == 3


def test_pinned_copies_a_view_alone_and_leaves_pinned_or_device_tensors(monkeypatch):
    """On CUDA runs batches go to page-locked memory (``pinned``): a view is copied alone, not the
    storage it lives in. This machine has no CUDA, so page-locked memory is stood in for by plain
    memory that reports itself pinned."""
    from distrnn.data import loaders

    empty = torch.empty
    made = []

    def fake_empty(*shape, pin_memory=False, **kw):
        t = empty(*shape, **kw)
        made.append((pin_memory, t))
        return t

    monkeypatch.setattr(loaders.torch, "empty", fake_empty)
    corpus = torch.arange(1000).view(10, 100)
    view = corpus[:, 10:20]
    out = loaders.pinned(view)
    assert made and made[0][0] is True and made[0][1] is out
    assert torch.equal(out, view) and out.is_contiguous() and out.untyped_storage().nbytes() == view.numel() * 8
    already, meta = torch.zeros(3), torch.zeros(3, device="meta")
    made.clear()
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: self is already)
    assert loaders.pinned(already) is already and loaders.pinned(meta) is meta and not made


def test_tensor_loader_shuffles_per_epoch_and_shards():
    x = torch.arange(40)[:, None].repeat(1, 3)
    loaders = [TensorLoader({"x": x, "y": x}, 4, shuffle=True, seed=1, rank=r, world_size=2) for r in range(2)]
    e0 = torch.cat([b["x"][:, 0] for ld in loaders for b in ld])
    assert torch.equal(e0.sort().values, torch.arange(40))
    e1 = torch.cat([b["x"][:, 0] for ld in loaders for b in ld])
    assert not torch.equal(e0, e1)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_evaluation_shards_serve_every_sample_once(world):
    """42 samples in batches of 4 make 11 global batches: training ranks serve the same count (the
    rounds that do not fill up are left out); evaluation ranks serve all 11 between them."""
    x = torch.arange(42)[:, None]
    even = [TensorLoader({"x": x, "y": x}, 4, rank=r, world_size=world) for r in range(world)]
    assert {len(ld) for ld in even} == {11 // world}
    uneven = [TensorLoader({"x": x, "y": x}, 4, rank=r, world_size=world, uneven=True) for r in range(world)]
    assert sum(len(ld) for ld in uneven) == 11 and max(map(len, uneven)) - min(map(len, uneven)) <= 1
    served = torch.cat([b["x"][:, 0] for ld in uneven for b in ld])
    assert torch.equal(served.sort().values, torch.arange(42))


def test_adding_problem():
    g = torch.Generator().manual_seed(0)
    b = adding_problem(g, 64, 1000)
    x, y, m = b["x"], b["y"], b["mask"]
    assert x.shape == (64, 1000, 2) and y.shape == (64, 1000, 1)
    assert (x[..., 1].sum(1) == 2).all()
    assert (x[:, :500, 1].sum(1) == 1).all()
    torch.testing.assert_close(y[:, -1, 0], (x[..., 0] * x[..., 1]).sum(1))
    assert m[:, -1].all() and m.sum() == 64
    # always answering 1 scores about 1/6
    assert abs(((y[:, -1, 0] - 1) ** 2).mean() - 1 / 6) < 0.05


def test_copy_memory_and_selective_copy():
    g = torch.Generator().manual_seed(0)
    c = copy_memory(g, 8, 120)
    assert c["x"].shape == (8, 120)
    assert torch.equal(c["y"][:, -10:], c["x"][:, :10])
    assert (c["x"][:, 10:] != 0).sum(1).eq(1).all()  # only the delimiter
    s = selective_copy(g, 8, 200, num_tokens=16, alphabet=8)
    for r in range(8):
        data = s["x"][r, :184]
        assert torch.equal(data[data != 0], s["y"][r, 184:])
    assert s["mask"][:, 184:].all() and s["mask"].sum() == 8 * 16


def test_synthetic_batches_come_from_the_seed():
    dm = SyntheticDataModule("selective_copy", seq_len=64, batch_size=4, train_batches=3, seed=5)
    a = [b["x"] for b in dm.train_dataloader()]
    b = [b["x"] for b in SyntheticDataModule("selective_copy", seq_len=64, batch_size=4, train_batches=3, seed=5).train_dataloader()]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ConfigError, match="data.seq_len"):
        SyntheticDataModule("copy_memory", seq_len=15)


def test_content_digest_reads_small_data_whole_and_large_data_in_spans():
    """Up to its limit every byte counts; beyond it the spans from the first byte to the last do
    (a change between two spans goes unseen: the price of not reading a corpus of gigabytes)."""
    from distrnn.data.base import content_digest

    t = torch.arange(10_000, dtype=torch.int64).to(torch.uint8)
    base = content_digest([t])
    assert content_digest([t.clone()]) == base and content_digest([t.to(torch.int16)]) != base  # dtype counts
    assert content_digest([t.view(100, 100)]) != base and content_digest([t, "x"]) != content_digest([t, "y"])
    for at in (0, 5_000, 9_999):
        u = t.clone()
        u[at] += 1
        assert content_digest([u]) != base
        # sampled: 4 spans of 10 bytes at 0, 3330, 6660, 9990 (the last ends at the last byte)
        assert (content_digest([u], whole_up_to=1_000, spans=4, span=10) != content_digest([t], whole_up_to=1_000, spans=4, span=10)) == (at != 5_000)


def test_data_modules_describe_their_splits_for_mlflow(tmp_path):
    """Each module's splits as MLflow datasets: generated tasks by their arguments (another seed,
    another digest), tables and MNIST by their content (the permutation included)."""
    import pandas as pd

    from distrnn.data.base import content_digest

    def digests(dm):
        return {k: content_digest(d.content) for k, d in dm.datasets().items()}

    sc = SyntheticDataModule("selective_copy", seq_len=64, batch_size=4, train_batches=3, seed=5)
    d = sc.datasets()["train"]
    assert (d.name, d.source_type, d.profile) == ("selective_copy", "code", {"batches_per_epoch": 3, "batch_size": 4})
    assert d.uri == "distrnn.data.synthetic.SyntheticDataModule(name='selective_copy', seq_len=64, seed=5, num_tokens=16, alphabet=16)"
    same = SyntheticDataModule("selective_copy", seq_len=64, batch_size=8, train_batches=3, seed=5)
    assert digests(sc) == digests(same) and digests(sc) != digests(SyntheticDataModule("selective_copy", seq_len=64, seed=6))
    assert len(set(digests(sc).values())) == 2  # training and validation are drawn apart

    frame = pd.DataFrame({"a": np.sin(np.arange(300) / 7), "b": np.arange(300) / 300})
    frame.to_csv(tmp_path / "s.csv", index=False)
    ts = TimeSeriesDataModule(str(tmp_path / "s.csv"), features=["a", "b"], targets=["a"], window=20, horizon=3)
    assert ts.datasets() == {}  # before the table is read
    ts.setup("fit")
    assert ts.datasets()["val"].profile == {"windows": 38, "rows": 300} and ts.datasets()["train"].name == "s.csv"
    before = digests(ts)
    frame.loc[150, "b"] = 7.0
    frame.to_csv(tmp_path / "s.csv", index=False)
    changed = TimeSeriesDataModule(str(tmp_path / "s.csv"), features=["a", "b"], targets=["a"], window=20, horizon=3)
    changed.setup("fit")
    assert digests(changed)["train"] != before["train"]

    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, (30,), dtype=np.uint8), False)
    mnist = {}
    for permuted in (False, True):
        dm = SequentialMNISTDataModule(str(tmp_path), permuted=permuted, val_size=10)
        dm.setup("fit")
        mnist[permuted] = dm.datasets()
    assert mnist[False]["train"].profile == {"samples": 20} and mnist[True]["val"].name == "permuted-mnist"
    assert content_digest(mnist[False]["val"].content) != content_digest(mnist[True]["val"].content)


def test_tensor_batches_carry_every_ranks_loss_count_where_the_loader_knows_it():
    """``mask_total`` of a TensorLoader training batch under DDP: the loss steps of every rank's
    rows at each step (a short last global batch included), from no mask, a mask field, or a
    transform's mask declared the same for every row; not made up from a transform's own mask,
    nor for one process or evaluation (no collective per batch there)."""
    g = torch.Generator().manual_seed(0)
    n, B, T, W = 23, 4, 6, 3  # 6 global batches of which the last has 3 rows: 2 rounds of 3 ranks
    x = torch.randn(n, T, 2, generator=g)
    row_masks = torch.rand(n, T, generator=g) > 0.5
    last_step = torch.zeros(T, dtype=torch.bool)
    last_step[-1] = True

    def label_at_the_end(b):
        return {"x": b["x"], "y": b["x"][..., :1], "mask": last_step.expand(b["x"].shape[0], T).clone()}

    cases = {
        "no mask": ({"x": x, "y": x[..., :1]}, {}),
        "mask field": ({"x": x, "y": x[..., :1], "mask": row_masks}, {}),
        "declared": ({"x": x}, {"transform": label_at_the_end, "mask_same_every_row": True}),
        "undeclared": ({"x": x}, {"transform": label_at_the_end}),
    }
    for name, (fields, kw) in cases.items():
        loaders = [TensorLoader(fields, B, shuffle=True, seed=2, rank=r, world_size=W, **kw) for r in range(W)]
        assert len(loaders[0]) == 2
        for i in range(2):
            batches = [ld.make_batch(1, i) for ld in loaders]
            if name == "undeclared":
                assert all("mask_total" not in b for b in batches)
                continue
            total = sum(b["mask"].long().sum(dim=0) for b in batches)
            assert all(torch.equal(b["mask_total"], total) for b in batches), (name, i)
        assert sum(b["x"].shape[0] for b in batches) == 11  # the round with the short batch
    assert "mask_total" not in TensorLoader({"x": x, "y": x}, B).make_batch(0, 0)
    assert "mask_total" not in TensorLoader({"x": x, "y": x}, B, rank=1, world_size=W, uneven=True).make_batch(0, 0)


@pytest.mark.parametrize("name", ["adding", "copy_memory", "selective_copy"])
def test_synthetic_masks_depend_on_the_step_alone(name):
    """Every rank's rows have their loss steps where this rank's do: ``mask_total`` (the count over
    all ranks, which spares DDP an all-reduce per batch) is world size x this rank's count."""
    from types import SimpleNamespace

    dm = SyntheticDataModule(name, seq_len=64, batch_size=4, train_batches=2, seed=5)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=3, current_epoch=0)
    masks = [dm.generate(torch.Generator().manual_seed(s), 4)["mask"] for s in range(3)]
    assert all(torch.equal(m, m[:1].expand_as(m)) for m in masks) and all(torch.equal(m, masks[0]) for m in masks)
    batch = dm.generate(torch.Generator().manual_seed(7), 4)
    assert torch.equal(batch["mask_total"], 3 * masks[0].sum(dim=0))


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    code = {np.uint8: 0x08}[arr.dtype.type]
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (30,), dtype=np.uint8)
    sfx = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", images, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", labels, gz)
    assert np.array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{sfx}"), images)
    for permuted in (False, True):
        dm = SequentialMNISTDataModule(str(tmp_path), permuted=permuted, batch_size=5, val_size=10, seed=3)
        dm.setup("fit")
        batch = next(iter(dm.val_dataloader()))
        assert batch["x"].shape == (5, 784, 1) and batch["mask"][:, -1].all() and batch["mask"].sum() == 5
        pixels = torch.from_numpy(images[20:25].reshape(5, 784)).float() / 255
        assert torch.allclose(batch["x"][..., 0], pixels[:, dm.permutation])
        assert torch.equal(batch["y"][:, -1], torch.from_numpy(labels[20:25].astype(np.int64)))
        assert permuted == (not torch.equal(dm.permutation, torch.arange(784)))


def test_mnist_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte"):
        SequentialMNISTDataModule(str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28) + b"\0" * 100)
    with pytest.raises(ConfigError, match="truncated"):
        read_idx(tmp_path / "train-images-idx3-ubyte")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_time_series_windows(tmp_path, fmt):
    import pandas as pd

    t = np.arange(300, dtype=np.float64)
    frame = pd.DataFrame({"a": np.sin(t / 7), "b": np.cos(t / 5), "c": t / 300})
    path = tmp_path / f"s.{fmt}"
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path)
    dm = TimeSeriesDataModule(str(path), features=["a", "b", "c"], targets=["a"], window=20, horizon=3, batch_size=8)
    dm.setup("fit")
    assert dm.task.input_dim == 3 and dm.task.output_dim == 1
    batch = next(iter(dm.val_dataloader()))
    x, y = batch["x"], batch["y"]
    assert x.shape == (8, 20, 3) and y.shape == (8, 20, 1)
    # the target at step t is feature a at t + horizon (same standardization)
    torch.testing.assert_close(y[:, :-3, 0], x[:, 3:, 0])
    with pytest.raises(ConfigError, match="columns"):
        TimeSeriesDataModule(str(path), features=["zz"]).setup("fit")


def test_time_series_errors_name_the_column_and_row(tmp_path):
    import pandas as pd

    t = np.arange(200, dtype=np.float64)
    frame = pd.DataFrame({"when": pd.date_range("2020-01-01", periods=200, freq="h").astype(str), "a": np.sin(t), "b": t})
    frame.loc[123, "b"] = np.nan
    frame.loc[150, "a"] = np.inf
    path = tmp_path / "s.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"^data.features: column 'when' of .*s.csv is not numeric"):
        TimeSeriesDataModule(str(path), features=["a", "when"], window=20).setup("fit")
    with pytest.raises(ConfigError, match=r"^data.targets: column 'when'"):
        TimeSeriesDataModule(str(path), features=["a"], targets=["when"], window=20).setup("fit")
    # a NaN would train into a non-finite loss, steps later, naming neither the file nor the row
    with pytest.raises(ConfigError, match=r"^data.path: column 'b' of .*s.csv has 1 missing or non-finite values \(the first at row index 123, from 0\)"):
        TimeSeriesDataModule(str(path), features=["b"], window=20).setup("fit")
    with pytest.raises(ConfigError, match=r"column 'a' .* 1 missing or non-finite values \(the first at row index 150, from 0\)"):
        TimeSeriesDataModule(str(path), features=["a"], window=20).setup("fit")
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match=rf"^data.val_fraction: must be in \(0, 1\), got {bad}"):
            TimeSeriesDataModule(str(path), features=["a"], val_fraction=bad)


def test_download_verifies_and_caches(tmp_path):
    payload = b"hello corpus\n" * 100
    src = tmp_path / "remote.txt"
    src.write_bytes(payload)
    good = Corpus(src.as_uri(), None, hashlib.sha256(payload).hexdigest(), "c.txt")
    path = fetch_corpus("c", tmp_path / "cache", good)
    assert path.read_bytes() == payload
    src.unlink()  # cached: no second download
    assert fetch_corpus("c", tmp_path / "cache", good) == path
    src.write_bytes(payload)
    bad = Corpus(src.as_uri(), None, "0" * 64, "d.txt")
    with pytest.raises(DownloadError, match="SHA-256"):
        fetch_corpus("d", tmp_path / "cache", bad)
    assert not (tmp_path / "cache" / "d.txt").exists()


def test_distrnn_download_prints_the_cached_file_or_one_error_line(tmp_path, monkeypatch, capsys):
    from distrnn.data import download

    payload = b"hello corpus\n" * 100
    src = tmp_path / "remote.txt"
    src.write_bytes(payload)
    monkeypatch.setitem(download.CORPORA, "good", Corpus(src.as_uri(), None, hashlib.sha256(payload).hexdigest(), "g.txt"))
    monkeypatch.setitem(download.CORPORA, "bad", Corpus(src.as_uri(), None, "0" * 64, "b.txt"))
    assert download.main(["good", "--cache_dir", str(tmp_path / "cache")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cache" / "g.txt")
    assert download.main(["bad", "--cache_dir", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"distrnn: error: bad: SHA-256 of {src.as_uri()} is ") and err.count("\n") == 1, err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["g.txt"]


def test_byte_corpus_errors():
    with pytest.raises(ConfigError, match="data.path: no such file"):
        ByteCorpusDataModule(path="nope.txt")
    with pytest.raises(ConfigError, match="data.corpus"):
        ByteCorpusDataModule(corpus="nope")


def test_token_files_are_served_as_written_every_token_once_and_checked(tmp_path):
    """uint16 ids (above 32767 too) come out as written, at the positions the streams say, every
    token once per epoch across 2 ranks; a file whose size is not a whole number of ids, an id
    outside the vocabulary (a wrong dtype) and a vocabulary the dtype cannot hold are one error
    each, naming the key or file."""
    from distrnn.data import TokenFileDataModule

    ids = np.random.default_rng(0).integers(0, 50_000, 5_001).astype(np.uint16)
    ids[[0, 777, 5_000]] = [65_535, 40_000, 32_768]
    ids.tofile(tmp_path / "train.bin")
    seen = []
    for rank in range(2):
        dm = TokenFileDataModule(path=str(tmp_path / "train.bin"), vocab_size=65_536, batch_size=3, seq_len=40,
                                 val_fraction=0.1)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=0)
        loaders = dm.check("fit")
        train = loaders["train_dataloader"]
        for i, batch in enumerate(train):
            pos, m = train.stream_positions(i), batch["mask"]
            assert torch.equal(batch["x"][m], torch.from_numpy(ids[pos[m]].astype(np.int64)))
            assert torch.equal(batch["y"][m], torch.from_numpy(ids[pos[m] + 1].astype(np.int64)))
            seen.append(pos[m])
        assert dm.task.vocab_size == 65_536 and dm.task.bits_metric == "bpt"
    split = 5_001 - int(5_001 * 0.1)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(split - 1))

    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02\x00\x03")
    with pytest.raises(ConfigError, match=r"^data.path: .*odd.bin is 5 bytes, not a whole number of uint16 tokens"):
        TokenFileDataModule(path=str(tmp_path / "odd.bin"), vocab_size=10).setup("fit")
    small = TokenFileDataModule(path=str(tmp_path / "train.bin"), vocab_size=50_000, batch_size=2, seq_len=16)
    with pytest.raises(ConfigError, match=r"^data.path .*train.bin: token id 65535 at position 0 is not below data.vocab_size 50000"):
        small.check("fit")
    TokenFileDataModule(path=str(tmp_path / "train.bin"), vocab_size=65_536, val_path=str(tmp_path / "train.bin"),
                        val_fraction=0)  # unused with its own validation file
    with pytest.raises(ConfigError, match=r"^data.val_fraction: must be in \(0, 1\), got 0"):
        TokenFileDataModule(path=str(tmp_path / "train.bin"), vocab_size=65_536, val_fraction=0)
    with pytest.raises(ConfigError, match=r"^data.path: .* is not a file of token ids"):
        TokenFileDataModule(path=str(tmp_path), vocab_size=10).setup("fit")
    with pytest.raises(ConfigError, match="^data.vocab_size: 70000 ids do not fit data.dtype uint16"):
        TokenFileDataModule(path=str(tmp_path / "train.bin"), vocab_size=70_000)


def test_token_file_documents_reset_the_state_at_each_end_of_text(tmp_path, monkeypatch, capsys):
    """With data.eot_token the state is zeroed before every end-of-text token, exactly where the
    file holds it (a per-batch comparison against the ids at each step's position, 2 ranks,
    training and the held-out tail, and a validation file of its own), and nowhere else but each
    stream's first step. The positions come from one chunked scan (equal to numpy's over the whole
    file, chunks of 7), cached: a second setup does not scan, a rewritten file is scanned again and
    its older positions removed."""
    from distrnn.data import TokenFileDataModule, tokens

    eot = 999
    ids = np.random.default_rng(1).integers(0, eot, 4_001).astype(np.uint16)
    ids[[0, 1, 500, 1_234, 3_600, 3_700, 4_000]] = eot
    ids[np.random.default_rng(2).random(4_001) < 0.01] = eot
    ids.tofile(tmp_path / "train.bin")
    ids[::-1].copy().tofile(tmp_path / "val.bin")
    assert np.array_equal(tokens.find_token(tmp_path / "train.bin", "uint16", eot, chunk=7), np.flatnonzero(ids == eot))
    scans, real = [], tokens.find_token
    monkeypatch.setattr(tokens, "find_token", lambda *a: scans.append(a[0].name) or real(*a))
    cache = tmp_path / "cache"

    def check(val_path, rank):
        dm = TokenFileDataModule(path=str(tmp_path / "train.bin"), vocab_size=1_000, eot_token=eot, batch_size=3,
                                 seq_len=40, val_fraction=0.1, val_path=val_path, cache_dir=str(cache))
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=0)
        loaders = dm.check("fit")
        resets = 0
        for loader, split in ((loaders["train_dataloader"], "train"), (loaders["val_dataloader"], "val")):
            source = ids[::-1] if split == "val" and val_path else ids[4_001 - int(4_001 * 0.1):] if split == "val" else ids
            for i, batch in enumerate(loader):
                pos, m = loader.stream_positions(i), batch["mask"]
                expected = torch.zeros_like(m)
                expected[m] = torch.from_numpy(source[pos[m]] == eot)
                expected[:, 0] |= i == 0
                assert torch.equal(batch["reset"], expected), (split, rank, i)
                resets += int(batch["reset"][:, 1:].sum())
        return resets

    assert sum(check(None, rank) for rank in range(2)) > 40 and scans == ["train.bin"]
    assert sum(check(str(tmp_path / "val.bin"), rank) for rank in range(2)) > 40
    assert scans == ["train.bin", "val.bin"]  # each file once, then from the cache
    ids[2] = eot
    ids.tofile(tmp_path / "train.bin")
    check(str(tmp_path / "val.bin"), 0)
    assert scans[2:] == ["train.bin"] and len(list((cache / "documents").glob("train.bin-*.npy"))) == 1

    with pytest.raises(ConfigError, match="^data.eot_token: must be an id below data.vocab_size 1000, got 1000"):
        TokenFileDataModule(path=str(tmp_path / "train.bin"), vocab_size=1_000, eot_token=1_000)
    capsys.readouterr()
    TokenFileDataModule(path=str(tmp_path / "train.bin"), vocab_size=1_001, eot_token=1_000,
                        cache_dir=str(cache)).setup("fit")
    assert "data.eot_token: id 1000 does not occur in" in capsys.readouterr().err


def test_processes_that_start_together_copy_a_folder_once(tmp_path, monkeypatch):
    """Ranks started together (torchrun) all find no copy of a folder corpus: one copies while the
    others wait on the copy's lock, then find it (4 at once, each copy made slow: 1 copy, 4 equal
    corpora). Each open of the lock file is its own lock, so threads stand in for processes."""
    import threading
    import time

    from distrnn.data import text

    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_bytes(bytes([65 + i]) * 1000)
    copies, real = [], text._copy

    def slow_copy(*args):
        copies.append(args[2].name)
        time.sleep(0.3)  # every other caller has looked for the copy by now
        real(*args)

    monkeypatch.setattr(text, "_copy", slow_copy)
    results = []
    threads = [threading.Thread(target=lambda: results.append(read_bytes(folder, "**/*", tmp_path / "cache")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(copies) == 1 and len(results) == 4, copies
    assert all(torch.equal(r[0], results[0][0]) and torch.equal(r[1], torch.tensor([0, 1000, 2000])) for r in results)


def test_an_uneven_loader_padded_gives_every_rank_as_many_batches():
    """5 batches of 4 over 2 ranks: unevenly 3 and 2; padded (ZeRO-3, whose forward is a
    collective) 3 each, the second rank's third a copy of the last batch with no step to score."""
    fields = {"x": torch.arange(18 * 3).view(18, 3), "mask": torch.ones(18, 3, dtype=torch.bool)}
    loaders = [TensorLoader(fields, 4, rank=r, world_size=2, uneven=True) for r in (0, 1)]
    assert [lo.num_batches() for lo in loaders] == [3, 2]
    for lo in loaders:
        lo.pad_uneven = True
    assert [lo.num_batches() for lo in loaders] == [3, 3]
    last, pad = loaders[0].make_batch(0, 2), loaders[1].make_batch(0, 2)
    assert torch.equal(pad["x"], last["x"]) and last["x"].shape[0] == 2
    assert last["mask"].all() and not pad["mask"].any()
    assert pad["padding"] and "padding" not in last
    assert loaders[1].make_batch(0, 1)["mask"].all()
