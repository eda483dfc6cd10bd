"""Both notebooks run top to bottom on small settings (outputs are not committed)."""


import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["vanishing_gradients", "compare_runs"])
def test_notebook_executes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTRNN_NB_SMALL", "1")
    monkeypatch.setenv("DISTRNN_NB_DEMO", "1")
    monkeypatch.setenv("DISTRNN_REPO", str(REPO))
    nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 1
    if name == "compare_runs":
        assert "narrow" in text and "wide" in text and "model.network.hidden_size" in text
    else:
        assert "elman" in text and "mingru" in text
