"""GPU checks of the training engine (skipped without CUDA): a real Lightning fit on the GPU in
bf16 and fp32, and the engine's update equal to a reference computed on the CPU."""

import lightning as L
import pytest
import torch

from distrnn.config import TaskSpec
from distrnn.data.loaders import StreamLoader

from helpers import GradRecorder, ListDataModule, make_module

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
LM = TaskSpec(kind="language_model", output_dim=50, vocab_size=50, seq_len=64)


def _loader():
    g = torch.Generator().manual_seed(0)
    return StreamLoader(torch.randint(0, 50, (20_000,), generator=g, dtype=torch.uint8), 8, 64)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_fit_on_gpu_learns(precision):
    module = make_module(LM, recurrence="lstm", hidden=64, k1=32, name="adamw", lr=3e-3, clip=1.0)
    losses = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            losses.append(trainer.callback_metrics.get("train/loss"))

    # two epochs: the second starts with a carried state that the epoch-start reset (a host mask) zeroes
    L.Trainer(accelerator="gpu", devices=1, max_epochs=2, precision=precision, logger=False, log_every_n_steps=1,
              enable_checkpointing=False, enable_progress_bar=False, callbacks=[Rec()]).fit(module, ListDataModule(_loader()))
    vals = [float(v) for v in losses if v is not None]
    assert len(vals) > 10 and all(v == v for v in vals)
    assert sum(vals[-5:]) / 5 < sum(vals[:5]) / 5  # it learns the unigram distribution at least
    assert module._carry.state[0].is_cuda


def test_gpu_update_matches_cpu():
    grads = {}
    for dev in ("cpu", "gpu"):
        module = make_module(LM, recurrence="gru", hidden=32, k1=32, name="sgd", lr=0.1).double()
        rec = GradRecorder()
        L.Trainer(accelerator=dev, devices=1, max_steps=3, precision="64-true", logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, callbacks=[rec]).fit(module, ListDataModule(_loader()))
        grads[dev] = rec.grads
    for g_cpu, g_gpu in zip(grads["cpu"], grads["gpu"]):
        for k in g_cpu:
            torch.testing.assert_close(g_gpu[k].cpu(), g_cpu[k], rtol=1e-9, atol=1e-11)


def test_lightning_deepspeed_zero2_zero3_fp32_bf16_and_resume(tmp_path):
    """Lightning's DeepSpeed strategy, unmodified, on the GPU (the CPU suite runs the same script
    with the strategy's CUDA checks skipped): ZeRO-2/3 fp32 updates equal plain updates (truncated
    and checkpointed BPTT), bf16 trains bf16 weights, resume from the checkpoint directory equals
    the uninterrupted run, it converts (bf16 ones and DeepSpeed's bf16 optimizer's too, as
    DeepSpeed's universal-checkpoint converter reads them)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("deepspeed")
    from conftest import free_port

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, str(repo / "tests" / "ds_lightning_check.py"), str(tmp_path), "--device", "cuda"],
                       capture_output=True, text=True, timeout=600, env=env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, (r.stdout + r.stderr)[-4000:]
    res = json.loads(line.removeprefix("RESULT "))
    print(json.dumps(res))  # for benchmarks/RESULTS.md
    for stage in (2, 3):
        eq, bf, rs = res[f"equal_zero{stage}"], res[f"bf16_zero{stage}"], res[f"resume_zero{stage}"]
        assert eq["clip_bites"] and eq["weights"] < 1e-5 and eq["grad_norm"] < 1e-4, eq
        for mb in (res[f"equal_micro_zero{stage}"], res[f"equal_micro_checkpointed_zero{stage}"]):  # micro_batch_size 2
            assert mb["clip_bites"] and mb["weights"] < 1e-5 and mb["grad_norm"] < 1e-4, mb
        ck = res[f"equal_checkpointed_zero{stage}"]  # checkpointed BPTT, ZeRO-3 fully partitioned
        assert ck["clip_bites"] and ck["weights"] < 1e-5 and ck["grad_norm"] < 1e-4, ck
        assert bf["dtypes"] == ["torch.bfloat16"] and bf["finite"] and bf["last"] < bf["first"], bf
        assert bf["universal"] == {"names": True, "weights": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}, bf
        # resumed bf16 run vs uninterrupted: exact on CPU; here within one bf16 step, in case a kernel is not deterministic
        assert bf["resume"]["weights"] < 1e-2 and bf["resume"]["state"] < 1e-2, bf
        # cuDNN's kernels are deterministic for one configuration; allow float noise all the same
        assert rs["weights"] < 1e-6 and rs["state"] < 1e-6 and rs["converted"] < 1e-6 and rs["global_step"] == 8, rs
        # converted with its optimizer state, resumed without DeepSpeed
        assert rs["optimizer_converted"] and rs["plain_weights"] < 1e-5 and rs["without_moments"] > 1e-3, rs
    bo = res["bf16_optimizer"]
    assert bo["optimizer"] == "BF16_Optimizer" and bo["finite"] and bo["resumed_to"] == 12 and bo["resumed_finite"], bo
    assert bo["universal"] == {"names": True, "weights": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}, bo
    assert "model.optimizer.clip_norm" in res["clip_conflict"]
    assert res["ema_refused"].startswith("trainer.callbacks: weight averaging"), res["ema_refused"]


def test_sigterm_agreement_reads_back_without_draining_the_gpu(tmp_path, monkeypatch):
    """distrnn's per-batch SIGTERM agreement on CUDA (NCCL): its flags go to the GPU from pinned
    memory and its result comes back through pinned memory behind an event, so neither starting
    it waits for the GPU work queued before it (``torch.tensor(..., device="cuda")`` did) nor
    reading it for the work queued after it (a ``.item()`` would: a host sync per batch). And
    NCCL lets go of the agreement's tensor soon after: on gloo a worker thread that released it
    during interpreter shutdown aborted the rank (CheckpointOnSigterm._last_agreement waits for
    that on gloo; the CUDA path does not wait)."""
    import time
    import weakref

    import torch.distributed as dist
    from types import SimpleNamespace

    from distrnn.checkpoint import CheckpointOnSigterm

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    sent, all_reduce = [], dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (sent.append(weakref.ref(t)), all_reduce(t, *a, **k))[1])
    try:
        cb = CheckpointOnSigterm()
        trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", torch.cuda.current_device())))
        cb._start_agreement(trainer)
        assert cb._agreed() == (False, False)  # (a rank signalled, rank 0 asks for a checkpoint)
        cb._signalled = True
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU work queued before the agreement (the batch's update)
        cb._start_agreement(trainer, checkpoint_due=True)
        assert not torch.cuda.current_stream().query()  # starting it waited for none of that work
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU work queued behind the agreement (the next batch's)
        assert cb._agreed() == (True, True)
        assert not torch.cuda.current_stream().query()  # the host has its answer, the GPU is still busy
        torch.cuda.synchronize()
        deadline = time.monotonic() + 5
        while sent[-1]() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(sent) == 2 and sent[-1]() is None, "NCCL still holds the last agreement's tensor after 5 s"
    finally:
        dist.destroy_process_group()


def test_batches_reach_the_gpu_without_draining_it():
    """The engine copies a batch to the GPU from pinned memory: the copy is queued behind the GPU
    work already there instead of waiting for it (from pageable memory the driver may wait)."""
    module = make_module(LM, recurrence="gru", hidden=8).cuda()
    g = torch.Generator().manual_seed(0)
    corpus = torch.randint(0, 50, (8, 10_000), generator=g)
    batch = {"x": corpus[:, 100:164], "y": corpus[:, 101:165],  # views, as a loader may hand out
             "mask": torch.ones(8, 64, dtype=torch.bool), "reset": torch.zeros(8, 64, dtype=torch.bool)}
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU work
    x, y, mask, reset, mask_cpu = module._unpack(batch)
    assert not torch.cuda.current_stream().query()  # the host went on while the GPU is busy
    torch.cuda.synchronize()
    assert torch.equal(x.cpu(), batch["x"]) and torch.equal(y.cpu(), batch["y"]) and bool(mask.all())
    assert x.is_cuda and reset.device.type == "cpu" and mask_cpu.device.type == "cpu"


def test_a_gpu_run_gets_its_batches_pinned_by_the_loaders_prefetch_thread():
    """On CUDA the data module tells its loaders to pin: each batch reaches the engine already in
    page-locked memory, made in the prefetch thread, so the main thread copies nothing itself."""
    from distrnn.data import SyntheticDataModule

    dm = SyntheticDataModule("selective_copy", seq_len=64, num_tokens=4, alphabet=4, batch_size=8, train_batches=6,
                             val_batches=2)
    module = make_module(dm.task, recurrence="mingru", hidden=16, mode="full", k1=64, name="adamw")
    seen, unpack = [], module._unpack

    def recording(batch):
        seen.append([batch[k].is_pinned() for k in ("x", "y", "mask", "reset")])
        return unpack(batch)

    module._unpack = recording
    L.Trainer(accelerator="gpu", devices=1, max_steps=6, val_check_interval=3, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, num_sanity_val_steps=0).fit(module, dm)
    assert len(seen) >= 6 and all(all(s) for s in seen), seen  # training and validation batches


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_an_update_returns_to_the_host_while_the_gpu_still_works_on_it(precision):
    """stop_on_nonfinite (the default) reads no result of an update on the host before queueing the
    next: two seconds of GPU work queued before batch 3 are still running when batch 3's update
    (forward, backward, clipping, the finiteness check, AdamW's step) has been queued and its
    training step has returned. (Update 2's finiteness is read in update 3, update 3's in update 4.)
    Under fp16 loss scaling too: the scaler hands the fused step its overflow flag (an unfused
    step reads it on the host), and the scale is read one update late."""
    module = make_module(LM, recurrence="gru", hidden=16, mode="full", k1=64, name="adamw", clip=1.0)
    busy = {}

    class Sleep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 3:
                torch.cuda._sleep(4_000_000_000)  # ~2 s

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 3:
                busy["at the end of batch 3"] = not torch.cuda.current_stream().query()

    L.Trainer(accelerator="gpu", devices=1, max_steps=6, logger=False, log_every_n_steps=1000, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, precision=precision,
              callbacks=[Sleep()]).fit(module, ListDataModule(_loader()))
    assert busy == {"at the end of batch 3": True}
    assert module.trainer.optimizers[0].defaults["fused"] is True


def _documents(recurrence):
    """A stream corpus with a document starting every 97 tokens: most batches reset some rows
    mid-batch (cuDNN: the window cut there, the state masked; minGRU: the mask in the scan)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (20_000,), generator=g, dtype=torch.uint8)
    module = make_module(LM, recurrence=recurrence, hidden=16, k1=64, name="adamw", clip=1.0)
    return module, ListDataModule(StreamLoader(tokens, 8, 64, doc_starts_D=torch.arange(0, 20_000, 97)))


def _selective_copy(recurrence):
    """Full BPTT over batches of new sequences: every batch resets every row at its first step."""
    from distrnn.data import SyntheticDataModule

    dm = SyntheticDataModule("selective_copy", seq_len=64, num_tokens=4, alphabet=4, batch_size=8, train_batches=20,
                             val_batches=2)
    return make_module(dm.task, recurrence=recurrence, hidden=16, mode="full", k1=64, name="adamw", clip=1.0), dm


@pytest.mark.parametrize("data,recurrence", [(_documents, "lstm"), (_documents, "mingru"), (_selective_copy, "mingru")])
def test_the_progress_bar_logging_and_resets_leave_the_gpu_working(data, recurrence):
    """With the progress bar on (``distrnn fit``'s default) and metrics logged every 3 updates, a
    batch that logs nothing hands the GPU its work and goes on: two seconds of GPU work queued at
    the start of batch 4 are still running when batch 5 starts. Lightning reads the last logged
    progress-bar values with ``.item()`` after every batch (its logger connector, and the bar:
    device tensors there made every batch wait for the GPU), and a reset mask moved to the GPU
    from pageable memory waited for it too (every batch of new sequences, and every batch with a
    document start). The test above logs nothing and has no resets after the first batch: it
    could see neither."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    module, dm = data(recurrence)
    busy, shown, resets, unpack = {}, [], [], module._unpack
    module._unpack = lambda batch: (resets.append(batch["reset"].clone()), unpack(batch))[1]

    class Sleep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 4:
                torch.cuda._sleep(4_000_000_000)  # ~2 s
            elif batch_idx == 5:
                busy["at the start of batch 5"] = not torch.cuda.current_stream().query()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            shown.append(dict(trainer.progress_bar_metrics))

    L.Trainer(accelerator="gpu", devices=1, max_steps=7, logger=False, log_every_n_steps=3, enable_checkpointing=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              callbacks=[Sleep(), TQDMProgressBar()]).fit(module, dm)
    r = resets[4]  # batch 4 resets rows: some mid-batch (documents), or all at its first step (new sequences)
    assert bool((r.any(0) & ~r.all(0)).any()) if data is _documents else bool(r[:, 0].all())
    assert busy == {"at the start of batch 5": True}
    # logged at batches 2 and 5 (Lightning counts from 1): the bar shows batch 2's loss until then
    assert "train/loss" not in shown[1] and shown[2]["train/loss"] == shown[4]["train/loss"] != shown[5]["train/loss"]
    logged = {k: v.device.type for k, v in module.trainer.callback_metrics.items() if k.startswith("train/")}
    assert logged and set(logged.values()) == {"cpu"}, logged


@pytest.mark.parametrize("recurrence", ["lstm", "mingru"])
def test_micro_batches_on_gpu_equal_the_whole_batch(recurrence, monkeypatch):
    """model.tbptt.micro_batch_size on CUDA, 2 layers: cuDNN refuses a view of a multi-layer
    state's rows (each group gets a contiguous copy), the Triton scan takes each group's rows.
    Every update's gradients equal the whole batch's (fp32, TF32 off: both are sums of the same
    products, in another order)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    grads = []
    for micro in (None, 3):
        module = make_module(LM, recurrence=recurrence, hidden=32, layers=2, k1=32, name="sgd", lr=0.1,
                             micro_batch_size=micro)
        rec = GradRecorder()
        L.Trainer(accelerator="gpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, callbacks=[rec]).fit(module, ListDataModule(_loader()))
        grads.append(rec.grads)
    assert len(grads[0]) == len(grads[1]) == 4
    for whole, grouped in zip(*grads):
        for k in whole:
            torch.testing.assert_close(grouped[k], whole[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("recurrence,dropout", [("lstm", 0.0), ("mingru", 0.0), ("mingru", 0.3)])
def test_overlapped_recomputation_on_side_streams_gives_full_bptt_gradients(recurrence, dropout):
    """model.tbptt.overlap_recompute on a GPU, where the recomputations run on side streams beside
    the backward passes: float64, the gradients (parameters and initial state) of full BPTT
    (with dropout, whose masks depend on the segments: of distrnn's checkpointed BPTT without the
    overlap, the masks replayed on the CUDA generator); float32 at a size where the streams do
    overlap (the LSTM on cuDNN, the minGRU on the Triton kernel), those of checkpointed BPTT
    without the overlap; the generator left where that leaves it. (cuDNN's own dropout between
    layers cannot be replayed: refused, tests/test_bptt.py.)"""
    from distrnn.bptt import run_window
    from distrnn.config import NetworkConfig
    from distrnn.model import RecurrentModel
    from distrnn.state import state_tensors

    task = TaskSpec(kind="regression", output_dim=1, input_dim=8)
    for dtype, B, T, H, k, tol in ((torch.float64, 3, 70, 16, 8, 1e-10), (torch.float32, 32, 1024, 256, 128, 1e-5)):
        torch.manual_seed(0)
        model = RecurrentModel(NetworkConfig(recurrence=recurrence, hidden_size=H, num_layers=2, dropout=dropout),
                               task).to("cuda", dtype)
        x, y = torch.randn(B, T, 8, device="cuda", dtype=dtype), torch.randn(B, T, 1, device="cuda", dtype=dtype)
        mask = torch.zeros(B, T, dtype=torch.bool, device="cuda")
        mask[:, -3:] = True
        _, like = model(x[:, :1])
        h0 = [torch.randn_like(s) for s in state_tensors(like)]
        runs = {}
        for name, kw in (("full", {}), ("checkpointed", {"segment": k}), ("overlap", {"segment": k, "overlap": True})):
            model.zero_grad(set_to_none=True)
            leaf = [s.clone().requires_grad_() for s in h0]
            torch.cuda.manual_seed(7)
            res = run_window(model, task, x, y, mask, None, tuple(leaf) if len(leaf) > 1 else leaf[0], **kw)
            res.loss_sum.backward()
            torch.cuda.synchronize()
            runs[name] = ([p.grad.clone() for p in model.parameters()] + [s.grad.clone() for s in leaf],
                          torch.cuda.get_rng_state())
        ref = runs["full" if dtype == torch.float64 and not dropout else "checkpointed"]
        for a, b in zip(runs["overlap"][0], ref[0]):
            assert (a - b).abs().max() <= tol * (1 + b.abs().max()), (dtype, (a - b).abs().max())
        assert torch.equal(runs["overlap"][1], ref[1])
