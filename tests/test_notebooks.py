"""Every notebook runs top to bottom in quick mode, and is committed without outputs."""
import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_is_a_notebook_per_analysis():
    names = " ".join(p.stem for p in NOTEBOOKS)
    for topic in ("memory_access", "mhsa", "head_similarity", "taylor", "family"):
        assert topic in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_quick_mode(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks without outputs"
    monkeypatch.setenv("EVIT_QUICK", "1")  # the kernel inherits the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    start = time.perf_counter()
    NotebookClient(nb, timeout=240, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    assert time.perf_counter() - start < 150, "quick mode must stay around two minutes"
    assert any(o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.outputs), "the figure is shown inline"
