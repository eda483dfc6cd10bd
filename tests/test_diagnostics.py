"""Diagnostics: the gradient-through-time curve (a real property: a tanh Elman RNN forgets faster
than an LSTM), gate and unit saturation from each layer's probe (checked against the layer's own
forward), per-layer gradient norms (checked against the clipped total), and the callback logging
them (metrics and PNGs) into an MLflow run."""

import math

import lightning as L
import mlflow
import pytest
import torch

from distrnn.config import NetworkConfig, TaskSpec
from distrnn.data.synthetic import adding_problem
from distrnn.diagnostics import Diagnostics, gradient_through_time, layer_grad_norms, saturation
from distrnn.layers import RECURRENCES, build_recurrence
from distrnn.model import RecurrentModel

TASK = TaskSpec(kind="regression", output_dim=1, input_dim=2, seq_len=60)


def _curve(rec, seed):
    batch = adding_problem(torch.Generator().manual_seed(seed), 16, 60)
    torch.manual_seed(seed)
    return gradient_through_time(RecurrentModel(NetworkConfig(recurrence=rec, hidden_size=32), TASK), batch["x"], batch["y"], TASK)


def test_elman_gradient_decays_faster_than_lstm():
    """On the same adding-problem batches, ||dL/dh_t|| at the window's start relative to its end is
    orders of magnitude smaller for a tanh Elman RNN than for an LSTM (forget bias 1)."""
    for seed in range(3):
        elman, lstm = _curve("elman", seed), _curve("lstm", seed)
        assert elman.shape == lstm.shape == (59,)
        assert torch.isfinite(elman).all() and (elman > 0).all() and (lstm > 0).all()
        assert elman[0] / elman[-1] < 1e-3 * (lstm[0] / lstm[-1])
        # both decay going back in time: the end of the window matters most
        assert elman[0] < elman[-1] and lstm[0] < lstm[-1]


def test_lstm_forget_bias_init():
    from distrnn.layers import build_recurrence

    layer = build_recurrence("lstm", input_size=3, hidden_size=4, num_layers=2)
    for l in range(2):
        assert torch.equal(getattr(layer.rnn, f"bias_ih_l{l}")[4:8], torch.ones(4))
        assert torch.equal(getattr(layer.rnn, f"bias_hh_l{l}")[4:8], torch.zeros(4))
    plain = build_recurrence("lstm", input_size=3, hidden_size=4, forget_bias=0.0)
    assert not torch.equal(plain.rnn.bias_ih_l0[4:8], torch.ones(4))


@pytest.mark.parametrize("name", sorted(RECURRENCES))
def test_probe_reproduces_forward(name):
    """The probe recomputes every gate from the weights by a reference loop; the hidden states it
    builds from those gates equal the layer's forward (cuDNN or scan), layer by layer, from a
    carried state, so a wrong or swapped gate cannot pass."""
    torch.manual_seed(0)
    layer = build_recurrence(name, input_size=3, hidden_size=5, num_layers=2).double()
    _, state = layer(torch.randn(4, 3, 3, dtype=torch.double))
    x = torch.randn(4, 7, 3, dtype=torch.double)
    y, _ = layer(x, state)
    probe = layer.probe(x, state)
    assert torch.allclose(probe["l1.h"][0], y, atol=1e-12)
    first, _ = build_recurrence(name, input_size=3, hidden_size=5, num_layers=1).double(), None
    first.load_state_dict({k: v for k, v in layer.state_dict().items() if "_l1" not in k and ".1." not in k}, strict=True)
    y0, _ = first(x, state[..., :1, :, :] if isinstance(state, torch.Tensor) else tuple(s[:1] for s in state))
    assert torch.allclose(probe["l0.h"][0], y0, atol=1e-12)
    for key, (v, kind) in probe.items():
        assert v.shape == (4, 7, 5), key
        if kind == "sigmoid":
            assert ((v > 0) & (v < 1)).all(), key


def test_saturation_follows_the_weights():
    """Large recurrent weights drive a tanh RNN's units and an LSTM's gates into saturation, small
    ones keep them in the linear range; the counts match a direct count."""
    x = torch.randn(8, 50, 3, generator=torch.Generator().manual_seed(1))
    for name, key in (("elman", "l0.h"), ("lstm", "l0.f")):
        torch.manual_seed(0)
        layer = build_recurrence(name, input_size=3, hidden_size=16, forget_bias=0.0) if name == "lstm" else \
            build_recurrence(name, input_size=3, hidden_size=16)
        shares = {}
        for scale in (0.01, 30.0):
            big = build_recurrence(name, input_size=3, hidden_size=16, **({"forget_bias": 0.0} if name == "lstm" else {}))
            big.load_state_dict({k: v * scale for k, v in layer.state_dict().items()})
            with torch.no_grad():
                probe = big.probe(x)
            stats = saturation(probe)
            v, kind = probe[key]
            direct = ((v - 0.5).abs() > 0.45) if kind == "sigmoid" else (v.abs() > 0.95)
            assert stats[f"sat/{key}"] == pytest.approx(direct.double().mean().item(), abs=1e-12)
            assert stats[f"mean/{key}"] == pytest.approx(v.double().mean().item(), abs=1e-9)
            shares[scale] = stats[f"sat/{key}"]
        assert shares[0.01] < 0.01 and shares[30.0] > 0.8, (name, shares)


def test_layer_grad_norms_partition_the_total():
    from distrnn.config import NetworkConfig

    task = TaskSpec(kind="language_model", output_dim=11, vocab_size=11, seq_len=9)
    for rec in ("lstm", "mingru"):
        torch.manual_seed(0)
        model = RecurrentModel(NetworkConfig(recurrence=rec, hidden_size=8, num_layers=3, embedding_dim=4), task)
        y, _ = model(torch.randint(0, 11, (2, 9)))
        y.square().mean().backward()
        norms = layer_grad_norms(model)
        assert sorted(norms) == ["encoder", "head", "l0", "l1", "l2"]
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
        assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(total, rel=1e-6)
        assert norms["l2"] == pytest.approx(math.sqrt(sum(
            p.grad.double().pow(2).sum().item() for n, p in model.named_parameters()
            if n.startswith("recurrence.") and ("_l2" in n or ".2." in n))), rel=1e-9)


def test_callback_logs_diagnostics_and_curves_to_mlflow(tmp_path):
    """Metrics at the configured steps (per-layer norms of the raw gradients: their total equals the
    engine's pre-clip norm), saturation statistics, the curve's PNGs, and the loss plot the
    logger draws when the run ends."""
    from distrnn.tracking import MLflowLogger

    from helpers import ListDataModule, make_module

    from distrnn.data.loaders import TensorLoader

    task = TaskSpec(kind="regression", output_dim=1, input_dim=2, seq_len=40)
    b = adding_problem(torch.Generator().manual_seed(0), 32, 40)
    module = make_module(task, recurrence="gru", hidden=16, layers=2, mode="full", k1=40, clip=1e-3)
    logger = MLflowLogger(experiment_name="diag", checkpoint_dir=str(tmp_path / "ck"))
    L.Trainer(accelerator="cpu", max_steps=4, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
              log_every_n_steps=1, callbacks=[Diagnostics(every_n_steps=2, window=20)]).fit(
        module, ListDataModule(TensorLoader({"x": b["x"], "y": b["y"], "mask": b["mask"]}, 8)))
    client = mlflow.MlflowClient()
    hist = client.get_metric_history(logger.run_id, "diag/grad_ratio")
    assert sorted(m.step for m in hist) == [2, 4] and all(m.value > 0 for m in hist)
    arts = [a.path for a in client.list_artifacts(logger.run_id, "diagnostics")]
    assert "diagnostics/grad_through_time_step2.png" in arts and "diagnostics/grad_through_time_step4.png" in arts
    run = client.get_run(logger.run_id)
    for gate in ("r", "z", "n", "h"):
        for layer in (0, 1):
            assert 0 <= run.data.metrics[f"diag/sat/l{layer}.{gate}"] <= 1
    pre_clip = {m.step: m.value for m in client.get_metric_history(logger.run_id, "train/grad_norm")}
    parts = {k: {m.step: m.value for m in client.get_metric_history(logger.run_id, f"diag/grad_norm/{k}")}
             for k in ("l0", "l1", "head")}
    assert sorted(parts["l0"]) == [0, 2]
    for step in (0, 2):
        total = math.sqrt(sum(parts[k][step] ** 2 for k in parts))
        assert total == pytest.approx(pre_clip[step], rel=1e-5) and total > 1e-3
    assert "plots/loss.png" in [a.path for a in client.list_artifacts(logger.run_id, "plots")]


def test_curve_follows_batches_that_make_several_updates(tmp_path):
    """TBPTT with 4 updates a batch (k1 10 of 40 steps), every 6 updates: the per-update norms of
    the updates made after 0 and 6 earlier ones, the curve after the batches that passed 6 and 12 (updates 8 and 12). Testing
    ``step % n`` at the batch's end, as Lightning's triggers do, measured only at 12."""
    from distrnn.tracking import MLflowLogger

    from helpers import ListDataModule, make_module

    from distrnn.data.loaders import TensorLoader

    task = TaskSpec(kind="regression", output_dim=1, input_dim=2, seq_len=40)
    b = adding_problem(torch.Generator().manual_seed(0), 32, 40)
    module = make_module(task, recurrence="gru", hidden=8, mode="tbptt", k1=10)
    logger = MLflowLogger(experiment_name="diag", checkpoint_dir=str(tmp_path / "ck"))
    mask = torch.ones_like(b["mask"])  # a loss at every step: every chunk makes an update
    L.Trainer(accelerator="cpu", max_steps=12, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
              log_every_n_steps=1, callbacks=[Diagnostics(every_n_steps=6, window=10)]).fit(
        module, ListDataModule(TensorLoader({"x": b["x"], "y": b["y"], "mask": mask}, 8)))
    client = mlflow.MlflowClient()
    assert sorted(m.step for m in client.get_metric_history(logger.run_id, "diag/grad_ratio")) == [8, 12]
    assert sorted(m.step for m in client.get_metric_history(logger.run_id, "diag/grad_norm/l0")) == [0, 6]
    # the engine's metrics of each batch at the index of its last update (Lightning's: the batch's)
    assert sorted(m.step for m in client.get_metric_history(logger.run_id, "train/grad_norm")) == [3, 7, 11]
