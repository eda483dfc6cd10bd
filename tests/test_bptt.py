"""Gradient modes against independent references (float64)."""


import math

import lightning as L
import pytest
import torch

from distrnn.bptt import chunk_bounds, run_window
from distrnn.config import NetworkConfig, TaskSpec
from distrnn.data.loaders import StreamLoader, TensorLoader
from distrnn.model import RecurrentModel
from distrnn.state import slice_state, state_tensors

from helpers import GradRecorder, ListDataModule, make_module, trainer

LM = TaskSpec(kind="language_model", output_dim=11, vocab_size=11)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _full_reference(model, task, x, y, mask, reset):
    """Plain autograd through one long forward pass."""
    model.zero_grad()
    y_hat, _ = model(x, None, reset)
    if task.kind == "regression":
        per = (y_hat - y).pow(2).mean(-1)
    else:
        per = torch.nn.functional.cross_entropy(y_hat.flatten(0, 1), y.flatten(), reduction="none").view_as(mask)
    loss = (per * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("name,overlap", [("elman", False), ("lstm", False), ("gru", False), ("lstm", True), ("mingru", True)])
def test_checkpointed_bptt_gives_full_bptt_gradients(name, overlap):
    """Segments of 10 steps, a reset inside one, losses at 70% of the steps: full BPTT's loss and
    gradients (float64, 1e-10). ``overlap``: each segment recomputed before the backward of the
    segment after it (on a GPU on a side stream; here the same order, one after the other)."""
    torch.manual_seed(1)
    model = RecurrentModel(NetworkConfig(recurrence=name, hidden_size=7, num_layers=2), LM).double()
    B, T = 3, 53
    x, y = torch.randint(0, 11, (B, T)), torch.randint(0, 11, (B, T))
    mask = torch.rand(B, T) < 0.7
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = True
    reset[1, 20] = True
    ref_loss, ref = _full_reference(model, LM, x, y, mask, reset)
    model.zero_grad()
    res = run_window(model, LM, x, y, mask, reset, None, segment=10, overlap=overlap)
    (res.loss_sum / mask.sum()).backward()
    torch.testing.assert_close(res.loss_sum / mask.sum(), ref_loss, rtol=0, atol=1e-10)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, ref[n], rtol=0, atol=1e-10, msg=n)



@pytest.mark.parametrize("name", ["lstm", "mingru"])
@pytest.mark.parametrize("segment", [None, 8])
def test_with_the_mask_on_the_host_the_head_runs_only_where_the_loss_is_with_the_same_gradients(name, segment):
    """Losses at steps 30-35 of 40 only (a label at the end of a sequence): given the mask on the
    host, the head and the loss run over those steps alone, not at all in the pieces before them
    (checkpointed: segments 0-23 carry only the state), and the loss and every gradient equal one
    long forward pass's with the head everywhere (float64, 1e-12), from a given initial state."""
    torch.manual_seed(2)
    model = RecurrentModel(NetworkConfig(recurrence=name, hidden_size=6, num_layers=2), LM).double()
    B, T = 3, 40
    x, y = torch.randint(0, 11, (B, T)), torch.randint(0, 11, (B, T))
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 30:36] = torch.rand(B, 6) < 0.8
    mask[0, 30] = mask[2, 35] = True
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = True
    ref_loss, ref = _full_reference(model, LM, x, y, mask, reset)
    head_steps = []
    hook = model.head.register_forward_hook(lambda mod, inp, out: head_steps.append(inp[0].shape[1]))
    try:
        model.zero_grad()
        res = run_window(model, LM, x, y, mask, reset, None, segment=segment, mask_host=mask.clone())
        (res.loss_sum / mask.sum()).backward()
    finally:
        hook.remove()
    torch.testing.assert_close(res.loss_sum / mask.sum(), ref_loss, rtol=0, atol=1e-12)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, ref[n], rtol=0, atol=1e-12, msg=n)
    # one pass: steps 30-35; segments of 8: steps 30-31 of [24, 32) (again when recomputed), 32-35 of [32, 40)
    assert head_steps == ([6] if segment is None else [2, 4, 2])


def _segmented_reference(model, x, y, mask, state, segment):
    """The same segments run one after another under plain autograd, nothing recomputed."""
    total = 0.0
    for a in range(0, x.shape[1], segment):
        y_hat, state = model(x[:, a:a + segment], state)
        per = torch.nn.functional.cross_entropy(y_hat.flatten(0, 1), y[:, a:a + segment].flatten(), reduction="none")
        total = total + (per.view_as(mask[:, a:a + segment]) * mask[:, a:a + segment]).sum()
    return total, state


@pytest.mark.parametrize("name,overlap", [("lstm", False), ("mingru", False), ("lstm", True)])
def test_checkpointed_segments_replay_dropout_and_return_the_initial_state_gradient(name, overlap):
    """The recomputation sees the dropout masks of the first pass (the RNG is replayed), and the
    gradient reaches a carried initial state that requires it, as through the plain segments."""
    torch.manual_seed(2)
    model = RecurrentModel(NetworkConfig(recurrence=name, hidden_size=6, num_layers=3, dropout=0.4), LM).double()
    B, T = 3, 37
    x, y = torch.randint(0, 11, (B, T)), torch.randint(0, 11, (B, T))
    mask = torch.rand(B, T) < 0.8
    _, like = model(x[:, :1], None)
    init = tuple(torch.randn_like(s) for s in state_tensors(like))

    def leaf():
        s = tuple(t.clone().requires_grad_() for t in init)
        return s if len(s) > 1 else s[0]

    h0_ref = leaf()
    torch.manual_seed(9)
    ref_loss, ref_state = _segmented_reference(model, x, y, mask, h0_ref, 8)
    ref_loss.backward()
    ref = _grads(model)
    rng_after = torch.get_rng_state()
    model.zero_grad()
    h0 = leaf()
    torch.manual_seed(9)
    res = run_window(model, LM, x, y, mask, None, h0, segment=8, overlap=overlap)
    res.loss_sum.backward()
    # the generators are where the plain run left them: the next update draws the same masks
    assert torch.equal(torch.get_rng_state(), rng_after)
    torch.testing.assert_close(res.loss_sum, ref_loss, rtol=0, atol=1e-10)
    for a, b in zip(state_tensors(res.state), state_tensors(ref_state)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, ref[n], rtol=0, atol=1e-10, msg=n)
    for a, b in zip(state_tensors(h0), state_tensors(h0_ref)):
        assert b.grad.abs().max() > 1e-6
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)


class _NoiseUnderAutograd(torch.nn.Module):
    """Draws random numbers in grad mode only: the first pass (no autograd) and the recomputation
    would see different inputs."""

    def forward(self, e):
        return e + 1e-3 * torch.rand_like(e) if torch.is_grad_enabled() else e


def test_a_model_that_draws_only_under_autograd_is_refused_when_recomputed():
    """A first pass that drew nothing is recomputed without replaying the generators; if the
    recomputation draws after all, its gradients would not be the first pass's: a clear error."""
    torch.manual_seed(4)
    model = RecurrentModel(NetworkConfig(recurrence="mingru", hidden_size=6, embedding_dim=5), LM).double()
    model.encoder = torch.nn.Sequential(model.encoder, _NoiseUnderAutograd())
    x, y = torch.randint(0, 11, (2, 12)), torch.randint(0, 11, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    run_window(model, LM, x, y, mask, None, None).loss_sum.backward()  # full BPTT: fine
    res = run_window(model, LM, x, y, mask, None, None, segment=4)
    with pytest.raises(RuntimeError, match="drew random numbers when a segment was recomputed"):
        res.loss_sum.backward()


def test_checkpointed_segments_recompute_under_the_first_passes_autocast():
    """Under bf16 autocast the recomputation runs in bf16 too: its gradients are those of the
    plain segments under the same autocast, not of a float32 recomputation (which differs by
    ~1e-2 here). Without autocast's weight cache: with it, the plain graph casts each weight
    once for all segments and sums their gradients in bf16 there, where each recomputed segment
    casts its own and the sum is in float32 (closer to the float32 gradients)."""
    torch.manual_seed(3)
    model = RecurrentModel(NetworkConfig(recurrence="gru", hidden_size=32, num_layers=2), LM)
    B, T = 4, 40
    x, y = torch.randint(0, 11, (B, T)), torch.randint(0, 11, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        ref_loss, _ = _segmented_reference(model, x, y, mask, None, 10)
    ref_loss.backward()
    ref = _grads(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        res = run_window(model, LM, x, y, mask, None, None, segment=10)
    res.loss_sum.backward()
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, ref[n], rtol=0, atol=1e-6, msg=n)


def _sequence_batches(x, y, mask, batch_size):
    return TensorLoader({"x": x, "y": y, "mask": mask}, batch_size, shuffle=False)


@pytest.mark.parametrize("mode,k1,overlap", [("tbptt", 40, False), ("full", 40, False), ("checkpointed", 9, False),
                                             ("checkpointed", 9, True)])
def test_module_update_equals_full_bptt(mode, k1, overlap):
    """One optimizer step of the module (k1 = T for tbptt) sees the gradients of full BPTT
    (checkpointed: also with ``overlap_recompute``)."""
    task = TaskSpec(kind="regression", output_dim=2, input_dim=3, seq_len=40)
    B, T = 4, 40
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(B, T, 3, generator=g).double(), torch.randn(B, T, 2, generator=g).double()
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, -5:] = True
    module = make_module(task, recurrence="gru", mode=mode, k1=k1).double()
    module.tbptt_cfg.overlap_recompute = overlap
    ref_model = RecurrentModel(module.network_cfg, task).double()
    ref_model.load_state_dict(module.model.state_dict())
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = True
    _, ref = _full_reference(ref_model, task, x, y, mask.double(), reset)
    rec = GradRecorder()
    trainer(max_steps=1, precision="64-true", callbacks=[rec]).fit(module, ListDataModule(_sequence_batches(x, y, mask, B)))
    assert len(rec.grads) == 1
    for n, gr in rec.grads[0].items():
        torch.testing.assert_close(gr, ref[n.removeprefix("model.")], rtol=0, atol=1e-10, msg=n)


def _stream(n=400, B=3, seq_len=24):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 11, (n,), generator=g, dtype=torch.uint8)
    return tokens, StreamLoader(tokens, B, seq_len)


def _long_pass_state(model, loader, upto):
    """The state of one long forward pass over each stream's first `upto` inputs."""
    xs = torch.cat([loader.make_batch(0, i)["x"] for i in range(len(loader))], dim=1)
    _, s = model(xs[:, :upto])
    return s, xs


@pytest.mark.parametrize("k1,k2", [(6, 6), (6, 10), (4, 15)])
def test_carried_state_equals_one_long_pass(k1, k2):
    """With updates too small to move float64 weights, TBPTT's carried state (and, for k2 > k1,
    its window start and re-run history) equals the state of one uninterrupted forward pass."""
    tokens, loader = _stream()
    module = make_module(LM, recurrence="lstm", k1=k1, k2=k2, lr=1e-300).double()
    w0 = {k: v.clone() for k, v in module.state_dict().items()}
    trainer(max_epochs=1, precision="64-true").fit(module, ListDataModule(loader))
    for k, v in module.state_dict().items():
        # the weights did not move (entries that start at exactly 0, like the LSTM's hidden forget
        # bias, can take a denormal step)
        assert torch.allclose(v, w0[k], rtol=0, atol=1e-290), k
    ref = RecurrentModel(module.network_cfg, LM).double()
    ref.load_state_dict(module.model.state_dict())
    T_total = loader.stream_len
    keep = k2 - k1
    s_ref, xs = _long_pass_state(ref, loader, T_total - keep)
    for a, b in zip(state_tensors(module._carry.state), state_tensors(s_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    if keep:
        assert torch.equal(module._carry.history["x"], xs[:, T_total - keep :])
    else:
        assert module._carry.history is None


def test_logged_training_metrics_are_the_batchs_values_on_the_host():
    """What the progress bar and MLflow get at a logging step: the batch's mean loss over its
    updates (and in bits), the last update's gradient norm, the learning rate unrounded, all as
    host tensors (tests/test_gpu.py checks on a GPU that Lightning's reading them after every
    batch leaves the GPU working). Updates too small to move float64 weights: the losses are those of
    one long pass."""
    _, loader = _stream()
    module = make_module(LM, recurrence="gru", k1=6, lr=1e-300).double()
    rec, logged = GradRecorder(), []

    class Logged(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            logged.append({k: v.clone() for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    trainer(max_epochs=1, precision="64-true", log_every_n_steps=1, callbacks=[rec, Logged()]).fit(module, ListDataModule(loader))
    ref = RecurrentModel(module.network_cfg, LM).double()
    ref.load_state_dict(module.model.state_dict())
    batches = [loader.make_batch(0, i) for i in range(len(loader))]
    y_hat, _ = ref(torch.cat([b["x"] for b in batches], dim=1))
    y = torch.cat([b["y"] for b in batches], dim=1)
    ce_BT = torch.nn.functional.cross_entropy(y_hat.flatten(0, 1), y.flatten().long(), reduction="none").view(y.shape)
    ends = torch.tensor([b["x"].shape[1] for b in batches]).cumsum(0).tolist()  # the last batch is shorter
    updates = torch.tensor([math.ceil(b["x"].shape[1] / 6) for b in batches]).cumsum(0).tolist()
    assert len(logged) == len(batches) >= 4 and len(rec.grads) == updates[-1]
    for i, m in enumerate(logged):
        assert {v.device.type for v in m.values()} == {"cpu"}, m
        mean = ce_BT[:, ends[i - 1] if i else 0 : ends[i]].mean()
        torch.testing.assert_close(m["train/loss"], mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(m["train/bpb"], mean / math.log(2), rtol=0, atol=1e-12)
        last = rec.grads[updates[i] - 1]  # before clipping (clip_norm unset: never clipped)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in last.values()))
        torch.testing.assert_close(m["train/grad_norm"], norm, rtol=1e-12, atol=0)
        assert m["train/lr"].item() == 1e-300 and m["train/tokens_per_s"].item() > 0


@pytest.mark.parametrize("recurrence,mode,k1,k2", [("lstm", "tbptt", 6, 10), ("mingru", "full", 24, None),
                                                   ("gru", "checkpointed", 5, None)])
def test_micro_batches_give_the_whole_batchs_updates(recurrence, mode, k1, k2):
    """model.tbptt.micro_batch_size 2 of 5 streams (groups of 2, 2, 1), 2 layers: every update's gradients,
    the weights after 8 SGD updates and the carried state (and k2's re-run history) equal those of
    the whole batch at once, in float64. The corpus has file boundaries inside the streams, so
    rows reset mid-batch; each group carries its own rows of the state."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 11, (700,), generator=g, dtype=torch.uint8)
    doc_starts = torch.tensor([0, 95, 230, 231, 400, 555])
    runs = {}
    for micro in (None, 2):
        loader = StreamLoader(tokens, 5, 24, doc_starts_D=doc_starts)
        module = make_module(LM, recurrence=recurrence, hidden=7, layers=2, mode=mode, k1=k1, k2=k2, lr=0.3,
                             micro_batch_size=micro).double()
        rec = GradRecorder()
        trainer(max_steps=8, precision="64-true", callbacks=[rec]).fit(module, ListDataModule(loader))
        runs[micro] = module, rec.grads
    (whole, g_whole), (grouped, g_grouped) = runs[None], runs[2]
    assert len(g_whole) == len(g_grouped) == 8
    for i, (a, b) in enumerate(zip(g_whole, g_grouped)):
        for n in a:
            torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-12, msg=f"update {i} {n}")
    moved = max((p - q).abs().max().item() for p, q in zip(whole.parameters(), make_module(
        LM, recurrence=recurrence, hidden=7, layers=2, mode=mode, k1=k1, k2=k2).double().parameters()))
    assert moved > 1e-2
    for (n, a), b in zip(whole.state_dict().items(), grouped.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=n)
    for a, b in zip(state_tensors(whole._carry.state), state_tensors(grouped._carry.state)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    if k2:
        assert all(torch.equal(whole._carry.history[k], grouped._carry.history[k]) for k in ("x", "y", "reset"))
    # each group's rows of a 2-layer state are handed over contiguous, as cuDNN requires
    assert all(s.is_contiguous() for s in state_tensors(slice_state(whole._carry.state, slice(2, 4))))


@pytest.mark.parametrize("mode,k1", [("tbptt", 8), ("checkpointed", 8)])
def test_micro_batches_with_a_group_without_loss_steps(mode, k1):
    """Labels on some rows only, 5 rows in groups of 2, 2, 1: the first group never has a loss step
    (it only moves its state on), and in chunks where only the middle group has one, the last
    group runs without autograd and the middle group's backward is the update's last (under DDP,
    the one that all-reduces); chunks without any loss update nothing. The same gradients as the
    whole batch's at once, update by update (float64)."""
    task = TaskSpec(kind="regression", output_dim=2, input_dim=3, seq_len=32)
    B, T = 5, 32
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(2 * B, T, 3, generator=g).double(), torch.randn(2 * B, T, 2, generator=g).double()
    mask = torch.zeros(2 * B, T, dtype=torch.bool)
    mask[2:4, 10:20] = True  # first batch: the middle group, in chunks 1 and 2 of 4
    mask[4, 30] = True  # first batch: the last group, in chunk 3
    mask[7:10, 28:] = True  # second batch: the last two groups, in chunk 3
    grads = []
    for micro in (None, 2):
        module = make_module(task, recurrence="gru", mode=mode, k1=k1, lr=0.3, micro_batch_size=micro).double()
        rec = GradRecorder()
        trainer(max_epochs=1, precision="64-true", callbacks=[rec]).fit(module, ListDataModule(_sequence_batches(x, y, mask, B)))
        grads.append(rec.grads)
    assert len(grads[0]) == len(grads[1]) == (4 if mode == "tbptt" else 2)
    for i, (a, b) in enumerate(zip(*grads)):
        for n in a:
            torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-12, msg=f"update {i} {n}")


def test_micro_batches_keep_the_activations_of_one_group():
    """What autograd saves for backward between a forward and its backward (the activations):
    with 8 rows in groups of 2, about a quarter of the whole batch's, for an update of the same length."""
    saved = []

    class Peak(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            saved.append(live[0])
            live[0] = 0

    live = [0]

    def pack(t):
        live[0] += t.numel() * t.element_size()
        return t

    peaks = {}
    for micro in (None, 2):
        saved.clear()
        g = torch.Generator().manual_seed(1)
        loader = StreamLoader(torch.randint(0, 11, (2000,), generator=g, dtype=torch.uint8), 8, 50)
        module = make_module(LM, recurrence="lstm", hidden=32, mode="full", k1=50, micro_batch_size=micro)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer(max_steps=2, callbacks=[Peak()]).fit(module, ListDataModule(loader))
        assert len(saved) == (2 if micro is None else 8)
        peaks[micro] = max(saved)
    # a quarter of the rows, and the parameters (saved once per group: 0.29 with torch 2.13)
    assert 0.25 < peaks[2] / peaks[None] < 0.35, peaks


def test_tbptt_k1_k2_window_gradient():
    """TBPTT(k1, k2): the update after a chunk is the gradient of that chunk's loss through the
    last k2 steps, starting from the (detached) state k2 steps back."""
    tokens, loader = _stream(n=200, B=2, seq_len=6)
    k1, k2 = 6, 14
    module = make_module(LM, recurrence="gru", k1=k1, k2=k2, lr=1e-300).double()
    rec = GradRecorder()
    trainer(max_steps=4, precision="64-true", callbacks=[rec]).fit(module, ListDataModule(loader))
    ref = RecurrentModel(module.network_cfg, LM).double()
    ref.load_state_dict(module.model.state_dict())
    xs = torch.cat([loader.make_batch(0, i)["x"] for i in range(4)], dim=1)
    ys = torch.cat([loader.make_batch(0, i)["y"] for i in range(4)], dim=1)
    end = 4 * k1  # the 4th update covers steps [end - k2, end), loss on the last k1
    with torch.no_grad():
        _, s0 = ref(xs[:, : end - k2])
    ref.zero_grad()
    y_hat, _ = ref(xs[:, end - k2 : end], s0)
    loss = torch.nn.functional.cross_entropy(y_hat[:, -k1:].flatten(0, 1), ys[:, end - k1 : end].flatten())
    loss.backward()
    for n, gr in rec.grads[3].items():
        torch.testing.assert_close(gr, dict(ref.named_parameters())[n.removeprefix("model.")].grad, rtol=0, atol=1e-10)


def test_randomized_chunk_lengths():
    T, k = 5000, 70
    b1 = chunk_bounds(T, k, True, seed=3, epoch=1, index=2)
    assert b1 == chunk_bounds(T, k, True, seed=3, epoch=1, index=2)  # resumable
    assert b1 != chunk_bounds(T, k, True, seed=3, epoch=1, index=3)
    assert b1[0][0] == 0 and b1[-1][1] == T
    assert all(a2 == b for (_, b), (a2, _) in zip(b1[:-1], b1[1:]))
    lengths = [b - a for a, b in b1[:-1]]
    assert min(lengths) >= 5
    assert abs(sum(lengths) / len(lengths) - k) < 6  # ~ 0.95 k + 0.05 k/2
    assert any(l < 0.7 * k for l in lengths)  # the k/2 branch is taken sometimes
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_randomized_lr_is_scaled_by_length():
    """The optimizer sees lr * len / k1 during a randomized step and the base lr afterwards."""
    tokens, loader = _stream(n=600, B=2, seq_len=60)
    module = make_module(LM, k1=20, randomize=True, lr=0.5)
    seen = []

    class LR(GradRecorder):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])

    trainer(max_steps=6, callbacks=[LR()]).fit(module, ListDataModule(loader))
    bounds = chunk_bounds(60, 20, True, 0, 0, 0) + chunk_bounds(60, 20, True, 0, 0, 1)
    expect = [0.5 * (b - a) / 20 for a, b in bounds][: len(seen)]
    assert seen == pytest.approx(expect, rel=1e-12)
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.5)


@pytest.mark.parametrize("limit,total", [({"max_steps": 12}, 12), ({"max_epochs": 1}, 20)])
def test_cosine_schedule_with_warmup_steps_per_update(limit, total):
    """The scheduler advances once per optimizer update (several per batch under TBPTT)."""
    from distrnn.config import NetworkConfig, OptimizerConfig, TBPTTConfig
    from distrnn.engine import TBPTTModule

    tokens, loader = _stream(n=400, B=2, seq_len=40)  # 4 updates of k1=10 per batch
    task = TaskSpec(kind="language_model", output_dim=11, vocab_size=11, seq_len=40)
    module = TBPTTModule(NetworkConfig(hidden_size=4), TBPTTConfig(k1=10),
                         OptimizerConfig(name="sgd", lr=1.0, schedule="cosine", warmup_updates=3, min_lr_ratio=0.1), task)
    seen = []

    class LR(GradRecorder):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])

    trainer(callbacks=[LR()], **limit).fit(module, ListDataModule(loader))
    # max_steps counts updates; max_epochs: 5 batches x 4 updates of k1 = 10 per 40-step batch
    assert len(seen) == total
    expect = []
    for u in range(total):
        if u < 3:
            expect.append((u + 1) / 3)
        else:
            p = min(1.0, (u - 3) / (total - 3))
            expect.append(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
    assert seen == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("task", [LM, TaskSpec(kind="classification", output_dim=5, vocab_size=11)], ids=["lm", "classification"])
def test_validation_metrics_are_the_means_over_every_labelled_step(task):
    """val/loss (and val/bpb, val/accuracy) over batches with different label counts: the loss
    summed over every labelled step of the epoch divided by their count, computed here by hand
    from the model's outputs in float64, not a mean of the batches' means; test/* the same."""
    torch.manual_seed(5)
    module = make_module(task, recurrence="gru", hidden=8)
    B, T = 3, 10
    x = torch.randint(0, 11, (9, T))
    y = torch.randint(0, task.output_dim, (9, T))
    mask = torch.rand(9, T) < 0.5
    mask[3:6] = False
    mask[4, 2] = True  # the second batch: one label
    loader = TensorLoader({"x": x, "y": y, "mask": mask}, B, shuffle=False)

    class Data(L.LightningDataModule):
        def val_dataloader(self):
            return loader

        def test_dataloader(self):
            return loader

    with torch.no_grad():
        y_hat = module.model(x, None)[0].double()  # each batch's rows start from a fresh state, as here
    per = torch.nn.functional.cross_entropy(y_hat.flatten(0, 1), y.flatten(), reduction="none").view_as(mask)
    loss = (per * mask).sum() / mask.sum()
    correct = ((y_hat.argmax(-1) == y) & mask).sum() / mask.sum()
    for stage, run in (("val", trainer(limit_val_batches=1.0).validate), ("test", trainer().test)):
        metrics = run(module, Data(), verbose=False)[0]
        assert metrics[f"{stage}/loss"] == pytest.approx(loss.item(), rel=1e-6)
        if task.kind == "classification":
            assert metrics[f"{stage}/accuracy"] == pytest.approx(correct.item(), rel=1e-9)
            assert f"{stage}/bpb" not in metrics
        else:
            assert metrics[f"{stage}/bpb"] == pytest.approx(loss.item() / math.log(2), rel=1e-6)


@pytest.mark.parametrize("overlap", [False, True])
def test_overlap_recomputes_each_segment_before_the_backward_of_the_one_after_it(overlap, monkeypatch):
    """The order that lets a GPU run a recomputation beside a backward: with ``overlap`` the
    backward of segment i first recomputes segment i - 1 (R), then takes its own gradients (G);
    without it each segment is recomputed when its own backward comes."""
    import distrnn.bptt as bptt

    events = []
    recompute, grad = bptt._Segment.recompute, torch.autograd.grad
    monkeypatch.setattr(bptt._Segment, "recompute", lambda self, stream: events.append("R") or recompute(self, stream))
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: events.append("G") or grad(*a, **k))
    torch.manual_seed(0)
    model = RecurrentModel(NetworkConfig(recurrence="gru", hidden_size=5), LM)
    x, y = torch.randint(0, 11, (2, 53)), torch.randint(0, 11, (2, 53))
    run_window(model, LM, x, y, torch.ones(2, 53, dtype=torch.bool), None, None, segment=10, overlap=overlap).loss_sum.backward()
    # segments [0, 10) ... [40, 50) are recomputed; [50, 53) keeps its activations
    assert "".join(events) == ("RRGRGRGRGG" if overlap else "RGRGRGRGRG")


def test_checkpointed_cudnn_dropout_between_layers_is_refused_on_a_gpu():
    """cuDNN draws a multi-layer RNN's dropout from its own state, which a recomputation cannot
    rewind: checkpointed BPTT with it on a GPU is refused naming the key; with the min* layers
    (torch's generators, replayed), one layer, no dropout, another mode or a CPU it is not."""
    def module(recurrence="lstm", layers=2, dropout=0.3, mode="checkpointed"):
        return make_module(LM, recurrence=recurrence, layers=layers, dropout=dropout, mode=mode, k1=8)

    with pytest.raises(ValueError, match=r"^model\.network\.dropout: 0\.3 between the layers of the cuDNN lstm cannot be"
                                         r" replayed.*\(trainer\.accelerator: cuda\)$"):
        module().check_training_device("cuda")
    module("gru").check_training_device("cpu")
    for ok in (module("mingru"), module(layers=1), module(dropout=0.0), module(mode="full")):
        ok.check_training_device("cuda")
    with pytest.raises(ValueError, match="cuDNN gru"):
        module("gru").check_training_device("cuda")
