"""The gradient-through-time curve: a real property (a tanh Elman RNN forgets faster than an
LSTM), and the callback logging it (metrics and a PNG) into an MLflow run."""

import lightning as L
import mlflow
import torch

from distrnn.config import NetworkConfig, TaskSpec
from distrnn.data.synthetic import adding_problem
from distrnn.diagnostics import GradientThroughTime, gradient_through_time
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


def test_callback_logs_the_curve_to_mlflow(tmp_path):
    from distrnn.tracking import MLflowLogger

    from helpers import ListDataModule, make_module

    from distrnn.data.loaders import TensorLoader

    task = TaskSpec(kind="regression", output_dim=1, input_dim=2, seq_len=40)
    b = adding_problem(torch.Generator().manual_seed(0), 32, 40)
    module = make_module(task, recurrence="gru", hidden=16, mode="full", k1=40)
    logger = MLflowLogger(experiment_name="diag", checkpoint_dir=str(tmp_path / "ck"))
    L.Trainer(accelerator="cpu", max_steps=4, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
              callbacks=[GradientThroughTime(every_n_steps=2, window=20)]).fit(
        module, ListDataModule(TensorLoader({"x": b["x"], "y": b["y"], "mask": b["mask"]}, 8)))
    client = mlflow.MlflowClient()
    hist = client.get_metric_history(logger.run_id, "diag/grad_ratio")
    assert sorted(m.step for m in hist) == [2, 4] and all(m.value > 0 for m in hist)
    arts = [a.path for a in client.list_artifacts(logger.run_id, "diagnostics")]
    assert "diagnostics/grad_through_time_step2.png" in arts and "diagnostics/grad_through_time_step4.png" in arts
