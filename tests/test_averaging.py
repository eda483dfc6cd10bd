"""distrnn's EMA of the weights against PyTorch's AveragedModel (what Lightning's EMAWeightAveraging
runs), update by update, and the host reads of each update."""

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

from distrnn.averaging import EMAWeightAveraging, _QueuedEMA


class HostReads(TorchDispatchMode):
    """Counts the operators that copy a tensor's value to the host (on a GPU: a wait for it)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.LSTM(8, 16, batch_first=True))
    m.add_module("norm", torch.nn.BatchNorm1d(16))  # a float buffer and an integer counter
    return m


def test_the_ema_equals_pytorchs_and_reads_nothing_on_the_host():
    model = _model()
    theirs = AveragedModel(model, avg_fn=get_ema_avg_fn(0.8), use_buffers=True)
    mine = _QueuedEMA(model, decay=0.8, use_buffers=True)
    reads = {"theirs": 0, "mine": 0}
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        with torch.no_grad():  # an update of the model's weights and buffers
            for t in [*model.parameters(), model.norm.running_mean]:
                t.add_(torch.randn(t.shape, generator=g))
            model.norm.num_batches_tracked += 3
        for name, avg in (("theirs", theirs), ("mine", mine)):
            with HostReads() as spy:
                avg.update_parameters(model)
            reads[name] += spy.n
        for (k, a), (_, b) in zip(theirs.state_dict().items(), mine.state_dict().items()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=f"{k} at update {step}")
    assert int(mine.n_averaged) == 6
    assert reads == {"theirs": 12, "mine": 1}, reads  # mine: n_averaged once, at its first update


def test_a_loaded_average_reads_its_count_again():
    """After a load (a resume), the next update averages from the restored count; a fresh
    average's first update copies the weights."""
    model = _model()
    a = _QueuedEMA(model, decay=0.5, use_buffers=True)
    a.update_parameters(model)
    a.update_parameters(model)
    b = _QueuedEMA(model, decay=0.5, use_buffers=True)
    b.update_parameters(model)  # a copy: n_averaged 1
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    b.load_state_dict(a.state_dict())
    a.update_parameters(model)
    b.update_parameters(model)  # an average from the loaded count (2), not a copy
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=0, atol=0, msg=k)
    p, q = next(a.module.parameters()), next(model.parameters())
    assert not torch.allclose(p, q)  # averaged, not copied


def test_the_callback_takes_lightnings_arguments():
    cb = EMAWeightAveraging(decay=0.9, update_every_n_steps=3, update_starting_at_step=5)
    assert (cb.decay, cb.update_every_n_steps, cb.update_starting_at_step) == (0.9, 3, 5)
    assert not cb.should_update(step_idx=4) and cb.should_update(step_idx=6)


def test_a_fit_with_either_callback_ends_with_the_same_average():
    """The TBPTT module trained 9 updates (3 per batch) with Lightning's callback and with
    distrnn's, an average every 2 updates from update 3: the same weights at the end (the
    average, which the callback puts in the module when training ends)."""
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMA

    from distrnn.config import TaskSpec
    from distrnn.data.loaders import StreamLoader
    from helpers import ListDataModule, make_module, trainer

    task = TaskSpec(kind="language_model", output_dim=20, vocab_size=20, seq_len=12)
    ends = []
    for cls in (LightningEMA, EMAWeightAveraging):
        L.seed_everything(0)
        module = make_module(task, recurrence="gru", hidden=8, k1=4, name="adamw", lr=1e-2)
        tokens = torch.randint(0, 20, (400,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        t = trainer(max_steps=9, callbacks=[cls(decay=0.7, update_every_n_steps=2, update_starting_at_step=3)])
        t.fit(module, ListDataModule(StreamLoader(tokens, 2, 12)))
        ends.append(module.state_dict())
    init = make_module(task, recurrence="gru", hidden=8, k1=4).state_dict()
    assert max((ends[0][k] - init[k]).abs().max().item() for k in init) > 1e-3
    for k, a in ends[0].items():
        torch.testing.assert_close(ends[1][k], a, rtol=0, atol=1e-6, msg=k)
