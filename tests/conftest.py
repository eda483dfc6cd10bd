import socket
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test runs in its own folder with its own MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # a URI set by an earlier test wins over the env
    torch.manual_seed(0)
    yield


@pytest.fixture
def float64():
    """Float64 by default for comparisons at 1e-10 against references."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_corpus(path: Path, n: int = 20_000, seed: int = 0) -> Path:
    """A small text with structure worth learning (repeated words), deterministic."""
    g = torch.Generator().manual_seed(seed)
    words = ["the ", "cat ", "sat ", "on ", "a ", "mat. ", "rnn ", "learns ", "long ", "streams\n"]
    idx = torch.randint(0, len(words), (n // 4,), generator=g).tolist()
    text = "".join(words[i] for i in idx)[:n]
    path.write_text(text)
    return path


def distrnn_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "distrnn.cli", *args]


def cuda_available() -> bool:
    return torch.cuda.is_available()


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
