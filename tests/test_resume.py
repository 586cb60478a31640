"""Killed with SIGKILL at a planted point, then rerun with the same command: `analysis.mhsa_ratio` and
`experiments.reproduce` finish with the tables of an uninterrupted run and recompute only what was unfinished.

The kill runs in a child process that wraps one of the command's own functions so that it kills the process right
after a given unit of work was written (no sleeps): the child imports this module and calls `killed_run`."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd

import evit.train
from analysis import mhsa_ratio
from experiments import reproduce

ROOT = Path(__file__).resolve().parents[1]
MHSA = ["--family", "deit", "--data", "digits", "--img-size", "32", "--shares", "0,1", "--seeds", "0",
        "--epochs", "2", "--limit-train", "64", "--limit-val", "32", "--batch-size", "32"]


def constant_speed(model, img_size, peaks):
    """Throughput is measured, so it differs between runs; the tables are compared without it."""
    return dict(throughput=1.0, memory_bound_share=0.5)


def kill_after(module, name: str, calls: int) -> None:
    """Make module.name SIGKILL this process (and, in a reproduce step's child, its parent) once it has returned
    `calls` times."""
    original, count = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        count[0] += 1
        if count[0] == calls:
            if os.environ.get("KILL_PARENT"):
                os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, name, wrapped)


def count_calls(monkeypatch, module, name: str) -> list:
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    return calls


def run_killed(code: str, env: dict | None = None) -> None:
    """Run `code` in a child Python that imports this module; it must die of SIGKILL."""
    child = subprocess.run([sys.executable, "-c", f"from tests.test_resume import *\n{code}"], cwd=ROOT,
                           env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]


def test_mhsa_ratio_killed_mid_run_resumes_it_and_keeps_the_finished_one(tmp_path, monkeypatch):
    """Killed right after the second run's first epoch was checkpointed (its third epoch written of four): the
    rerun trains one epoch, the second run's last, and writes the uninterrupted tables."""
    monkeypatch.setattr(mhsa_ratio, "measure_speed", constant_speed)
    straight = mhsa_ratio.main(MHSA + ["--out", str(tmp_path / "straight")])
    out = tmp_path / "killed"
    run_killed(f"import evit.train, analysis.mhsa_ratio as m\nm.measure_speed = constant_speed\n"
               f"kill_after(evit.train, 'write_outputs', 3)\nm.main({MHSA + ['--out', str(out)]!r})")
    finals = sorted((out / "runs").glob(f"*/{evit.train.FINAL}"))
    assert len(finals) == 1 and not list(out.glob("*.csv"))  # one run finished, no table written yet
    finished_at = finals[0].stat().st_mtime_ns
    epochs = count_calls(monkeypatch, evit.train, "write_outputs")
    again = mhsa_ratio.main(MHSA + ["--out", str(out)])
    assert len(epochs) == 1  # the second run's last epoch only
    assert finals[0].stat().st_mtime_ns == finished_at
    pd.testing.assert_frame_equal(again, straight)
    for metrics in (tmp_path / "straight" / "runs").glob("*/metrics.json"):  # losses too, run by run
        twin = out / "runs" / metrics.parent.name / "metrics.json"
        assert ({k: v for k, v in json.loads(twin.read_text())["final"].items() if k != "epoch_time_s"}
                == {k: v for k, v in json.loads(metrics.read_text())["final"].items() if k != "epoch_time_s"})


def write_half_then_rest(out: Path, opts) -> None:
    """A step that writes its declared output first and the file the report needs after it: a kill between the
    two leaves every declared output in place."""
    with open(out / "half-calls.log", "a") as log:
        log.write("run\n")
    reproduce.write_text(out / "half" / "declared.csv", "x\n1\n")  # the planted kill lands after this one
    reproduce.write_text(out / "half" / "rest.csv", "y\n2\n")


STEPS = [reproduce.Step("presets", ("presets/presets.csv",), reproduce._presets),
         reproduce.Step("half", ("half/declared.csv",), write_half_then_rest)]


def test_reproduce_killed_mid_step_reruns_that_step_only(tmp_path, monkeypatch):
    """Killed (the driver and its step's child) inside the second step, after it wrote its declared output: the
    rerun keeps the first step's outputs and runs the second again to its end."""
    monkeypatch.setattr(reproduce, "STEPS", STEPS)
    reproduce.main(["--out", str(tmp_path / "straight")])
    out = tmp_path / "killed"
    run_killed(f"import experiments.reproduce as r\nr.STEPS = STEPS\n"
               f"kill_after(r, 'write_text', 1)\nr.main({['--out', str(out)]!r})", env=dict(KILL_PARENT="1"))
    presets = out / "presets" / "presets.csv"
    written_at = presets.stat().st_mtime_ns
    assert (out / "half" / "declared.csv").is_file() and not (out / "half" / "rest.csv").exists()
    assert not (out / "REPORT.md").exists()
    reproduce.main(["--out", str(out)])
    assert presets.stat().st_mtime_ns == written_at  # the finished step was not run again
    assert (out / "half-calls.log").read_text().split() == ["run", "run"]
    for name in ("presets/presets.csv", "half/declared.csv", "half/rest.csv"):
        assert (out / name).read_text() == (tmp_path / "straight" / name).read_text()
    reproduce.main(["--out", str(out)])
    assert (out / "half-calls.log").read_text().split() == ["run", "run"]  # once it ended, it is cached
