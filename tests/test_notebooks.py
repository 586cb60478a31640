"""Every notebook runs top to bottom in quick mode (EVIT_QUICK=1), within about two minutes, shows a figure it
computed inline (not only the committed one), and is committed without outputs."""
import base64
import os
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
QUICK_LIMIT_S = 120  # the budget per notebook in quick mode
SLACK_S = 30  # kernel start-up and a loaded shared machine


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_is_a_notebook_per_analysis():
    names = " ".join(p.stem for p in NOTEBOOKS)
    for topic in ("memory_access", "mhsa", "head_similarity", "taylor", "family"):
        assert topic in names, f"no notebook for {topic}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in _code_cells(nb):
        assert not cell.outputs and cell.execution_count is None, f"{path.name}: commit notebooks without outputs"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "claim" in first.source.lower(), "starts with what the paper claims"
    assert any('os.environ.get("EVIT_QUICK"' in c.source for c in _code_cells(nb)), "has a quick-mode switch"
    assert "What our run shows" in nb.cells[-1].source, "ends with how to read the results"
    bootstrap = [c.source for c in _code_cells(nb) if "sys.path" in c.source or "os.chdir" in c.source]
    assert not bootstrap, "imports the installed package and reads results/ through evit.paths, from any folder"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_quick_mode(path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    # The kernel inherits this process's environment: quick sizes, one torch thread, inline figures.
    monkeypatch.setenv("EVIT_QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    assert os.environ["EVIT_QUICK"] == "1"
    start = time.perf_counter()
    # Started in notebooks/, as `make lab` does: the notebooks find the repository root themselves.
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    elapsed = time.perf_counter() - start
    assert elapsed < QUICK_LIMIT_S + SLACK_S, f"{path.name} took {elapsed:.0f} s in quick mode"
    outputs = [o for c in _code_cells(nb) for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    shown = [base64.b64decode(o["data"]["image/png"]) for o in outputs
             if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    committed = {p.read_bytes() for p in (ROOT / "results").rglob("*.png")}
    assert [png for png in shown if png not in committed], (
        f"{path.name}: shows no figure computed in this run (only committed ones: {len(shown)})")
