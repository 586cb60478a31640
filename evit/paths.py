"""The project's own folders, found from this file rather than from the working directory, so that a notebook
started in notebooks/ (`make lab`) or anywhere else reads the same committed results."""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
COMMITTED_RESULTS = PROJECT_ROOT / "results"  # the reference results in the repository
