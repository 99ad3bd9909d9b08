"""examples/quickstart.ipynb runs from top to bottom (nbclient), so it never rots."""
import os

import pytest

from conftest import ROOT


def test_quickstart_notebook_runs(model_dir):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend renders the plot as PNG
    os.environ["RESID_ROOT"] = str(ROOT)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the accuracy plot"
    text = "".join(o.get("text", "") for o in outputs)
    assert "toward fairness" in text
