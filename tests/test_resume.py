"""Long commands killed with SIGKILL at a planted point, then rerun with the same command: `analysis.mhsa_ratio`,
`experiments.reproduce`, `experiments.prune_study` and `experiments.family` finish with the tables of an
uninterrupted run, recompute only what was unfinished, and take nothing the kill left half done as finished.

The kill is planted, not timed: a child process wraps one of the command's own functions (the writer of one epoch,
of one pruned model's record, the training of one run) so that a given call kills the process before it runs, then
calls the command's main. The prune study runs on a planted clock (a module's call takes as many µs as it has
parameters), so that its latency-driven prunings are the same in every process, whatever the machine's load."""
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch.nn as nn

import evit.train
from analysis import mhsa_ratio
from analysis import taylor_prune as tpr
from evit import launch
from evit.builder.io import read_checkpoint
from evit.timing import Timing
from evit.zoo import cache_dir
from experiments import family, prune_study, reproduce
from tests.test_prune_study import TINY as PRUNE_TINY

pytestmark = pytest.mark.usefixtures("hide_gpus")  # the children train on the CPU
ROOT = Path(__file__).resolve().parents[1]
FAMILY_TINY = ["--models", "evit_m0", "--seeds", "0,1", "--epochs", "1", "--limit-train", "64", "--limit-val", "32",
               "--batch-size", "32"]
PRUNED_MODELS = len(prune_study.POINTS) * len(prune_study.METHODS)
FINE_TUNES = PRUNED_MODELS * 2  # PRUNE_TINY's two seeds


class PlantedClock(tpr.LatencyModel):
    """Every module's call takes as many µs as it has parameters: no clock is read."""

    def _time(self, calls):
        def timing(module) -> Timing:
            ms = sum(p.numel() for p in module.parameters()) / 1000
            return Timing(1000 * self.batch / ms, 1000 * self.batch / ms, 1000 * self.batch / ms, ms, [ms])

        return {name: timing(module) for name, (module, _) in calls.items()}


def planted_latency_model(settings: prune_study.Settings) -> tpr.LatencyModel:
    return PlantedClock(settings.device, settings.latency_batch, cache_dir=cache_dir() / "latency")


def kill_on_call(module, name: str, call: int) -> None:
    """Replace module.<name> by a wrapper whose `call`-th call kills this process with SIGKILL (nothing cleaned
    up, no handler run) before it starts; with KILL_PARENT set, the parent too (a reproduce step's driver)."""
    real, calls = getattr(module, name), itertools.count(1)

    def planted(*args, **kwargs):
        if next(calls) == call:
            if os.environ.get("KILL_PARENT"):
                os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(module, name, planted)


def run_killed(command: str, kill_at: tuple[str, str, int], argv: list[str], setup: tuple[str, ...] = (),
               **env: str) -> subprocess.CompletedProcess:
    """<command>.main(argv) in a child process, after the `setup` lines (`t` is this module, `m` the command's),
    whose `kill_at` (module, function, call) kills it."""
    module, name, call = kill_at
    code = "\n".join(["import importlib", "from tests import test_resume as t",
                      f"m = importlib.import_module({command!r})", *setup,
                      f"t.kill_on_call(importlib.import_module({module!r}), {name!r}, {call})", f"m.main({argv!r})"])
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **env),
                          capture_output=True, text=True, timeout=600)


def record_calls(monkeypatch, module, name: str, key) -> list:
    """Wrap module.<name> so that every call appends key(*args) to the list returned, then runs as before."""
    real, seen = getattr(module, name), []

    def counted(*args, **kwargs):
        seen.append(key(*args))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return seen


def finished_records(out: Path) -> dict[str, list[Path]]:
    """Per pruned model whose record is written (<point>-<method>): the record, the model file it names and the
    block table beside it."""
    return {p.stem: [p, p.parent / json.loads(p.read_text())["file"], p.with_suffix(".csv")]
            for p in out.glob("pruned/*/*.json")}


def finished_runs(runs: Path) -> dict[str, list[Path]]:
    """Per training run whose model.pth is written (its folder's name): the files in its folder."""
    return {p.parent.name: sorted(p.parent.iterdir()) for p in runs.glob("*/model.pth")}


def mtimes(units: dict[str, list[Path]]) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for files in units.values() for path in files}


def half_written(folder: Path) -> list[Path]:
    """The temporary files of atomic writes (evit.builder.io.atomic_path) a kill would leave."""
    return list(folder.rglob(".*.tmp*"))


def table(path: Path, measured: list[str], out: Path) -> pd.DataFrame:
    """A study's CSV without its `measured` (wall-clock) columns, a pruned model's path relative to `out`."""
    df = pd.read_csv(path).drop(columns=measured)
    return df.assign(pruned=[str(Path(p).relative_to(out)) for p in df.pruned]) if "pruned" in df else df


# Where the child is killed, and what it leaves: (records, fine-tunes) finished, and model files without a record.
KILLS = [(("experiments.prune_study", "write_json", 2), (1, 0), 1),
         (("evit.launch", "train_run", 2), (PRUNED_MODELS, 1), 0)]


@pytest.mark.parametrize("kill_at, finished, unrecorded", KILLS, ids=["after-one-pruned-model", "after-one-fine-tune"])
def test_prune_study_killed_after_one_unit_resumes_to_the_same_tables(kill_at, finished, unrecorded, tmp_path,
                                                                      monkeypatch):
    """Killed after the first pruned model's record (the second model's file written, its record not: it is pruned
    again) or after the first fine-tune, the rerun prunes and fine-tunes only what did not finish."""
    monkeypatch.setattr(prune_study, "latency_model", planted_latency_model)
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("EVIT_CACHE", str(a / "zoo"))
    prune_study.main([*PRUNE_TINY, "--out", str(a)])

    child = run_killed("experiments.prune_study", kill_at, [*PRUNE_TINY, "--out", str(b)],
                       ("m.latency_model = t.planted_latency_model",), EVIT_CACHE=str(b / "zoo"))
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    records, runs = finished_records(b), finished_runs(b / "runs")
    assert (len(records), len(runs)) == finished and not (b / "runs.csv").exists()
    assert not half_written(b) and len(list(b.glob("pruned/*/*.pth"))) == len(records) + unrecorded
    for _, model, blocks in records.values():  # a record is written after its model: each names a whole file
        assert isinstance(prune_study.pruned_model(str(model)), nn.Module) and len(pd.read_csv(blocks))
    before = mtimes({**records, **runs})

    monkeypatch.setenv("EVIT_CACHE", str(b / "zoo"))
    written = record_calls(monkeypatch, prune_study, "write_json", lambda path, _: Path(path).stem)
    trained = record_calls(monkeypatch, launch, "train_run", lambda _, folder: Path(folder).name)
    prune_study.main([*PRUNE_TINY, "--out", str(b)])
    all_records, all_runs = finished_records(b), finished_runs(b / "runs")
    assert (len(all_records), len(all_runs)) == (PRUNED_MODELS, FINE_TUNES)
    assert sorted(written) == sorted(all_records.keys() - records.keys())
    assert sorted(trained) == sorted(all_runs.keys() - runs.keys())
    assert mtimes({**records, **runs}) == before
    assert not half_written(b)
    # train_time_s is measured; a fine-tune's folder is named by the absolute path of the model it starts from.
    for name, measured in (("runs.csv", ["train_time_s", "run"]), ("summary.csv", [])):
        pd.testing.assert_frame_equal(table(b / name, measured, b), table(a / name, measured, a), check_exact=True)


def test_family_killed_after_one_training_run_resumes_to_the_same_table(tmp_path, monkeypatch):
    """Killed once seed 0's run has finished, the rerun trains seed 1's alone and times the model again."""
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("EVIT_CACHE", str(a / "zoo"))
    family.main([*FAMILY_TINY, "--out", str(a)])

    child = run_killed("experiments.family", ("evit.launch", "train_run", 2), [*FAMILY_TINY, "--out", str(b)],
                       EVIT_CACHE=str(b / "zoo"))
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    runs = finished_runs(b / "runs")
    assert len(runs) == 1 and not (b / "family.csv").exists()
    assert not half_written(b)
    (folder,) = {files[0].parent for files in runs.values()}
    metrics = json.loads((folder / "metrics.json").read_text())["final"]
    assert read_checkpoint(folder / "model.pth")["metrics"] == metrics  # the finished run's files are whole
    before = mtimes(runs)

    monkeypatch.setenv("EVIT_CACHE", str(b / "zoo"))
    trained = record_calls(monkeypatch, launch, "train_run", lambda _, folder: Path(folder).name)
    timed = record_calls(monkeypatch, family, "benchmark_model", lambda name, *_: name)
    family.main([*FAMILY_TINY, "--out", str(b)])
    all_runs = finished_runs(b / "runs")
    assert len(all_runs) == 2 and trained == sorted(all_runs.keys() - runs.keys()) and timed == ["evit_m0"]
    assert mtimes(runs) == before
    assert not half_written(b)
    measured = ["train_time_s", "throughput_cpu", "throughput_cpu_min", "throughput_cpu_max", "pareto"]
    pd.testing.assert_frame_equal(table(b / "family.csv", measured, b), table(a / "family.csv", measured, a),
                                  check_exact=True)


MHSA = ["--family", "deit", "--data", "digits", "--img-size", "32", "--shares", "0,1", "--seeds", "0",
        "--epochs", "2", "--limit-train", "64", "--limit-val", "32", "--batch-size", "32"]


def constant_speed(model, img_size, peaks):
    """Throughput is measured, so it differs between runs; the tables are compared without it."""
    return dict(throughput=1.0, memory_bound_share=0.5)


def final_metrics(metrics_json: Path) -> dict:
    return {k: v for k, v in json.loads(metrics_json.read_text())["final"].items() if k != "epoch_time_s"}


def test_mhsa_ratio_killed_mid_run_resumes_it_and_keeps_the_finished_one(tmp_path, monkeypatch):
    """Killed as the second run's second epoch is written (its first checkpointed, the first run finished): the
    rerun trains one epoch, the second run's last, and writes the uninterrupted tables."""
    monkeypatch.setattr(mhsa_ratio, "measure_speed", constant_speed)
    straight = mhsa_ratio.main(MHSA + ["--out", str(tmp_path / "straight")])
    out = tmp_path / "killed"
    child = run_killed("analysis.mhsa_ratio", ("evit.train", "write_outputs", 4), MHSA + ["--out", str(out)],
                       ("m.measure_speed = t.constant_speed",))
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    runs = finished_runs(out / "runs")
    assert len(runs) == 1 and not list(out.glob("*.csv")) and not half_written(out)  # no table written yet
    before = mtimes(runs)
    epochs = record_calls(monkeypatch, evit.train, "write_outputs", lambda state, *_: state.epoch)
    again = mhsa_ratio.main(MHSA + ["--out", str(out)])
    assert epochs == [2]  # the second run's last epoch only, resumed from its first
    assert mtimes(runs) == before
    pd.testing.assert_frame_equal(again, straight)
    for metrics in (tmp_path / "straight" / "runs").glob("*/metrics.json"):  # losses too, run by run
        assert final_metrics(out / "runs" / metrics.parent.name / "metrics.json") == final_metrics(metrics)


def write_half_then_rest(out: Path, opts) -> None:
    """A step that writes its declared output first and a file the report needs after it: a kill between the
    two leaves every declared output in place."""
    with open(out / "half-calls.log", "a") as log:
        log.write("run\n")
    reproduce.write_text(out / "half" / "declared.csv", "x\n1\n")
    reproduce.write_text(out / "half" / "rest.csv", "y\n2\n")  # the planted kill lands before this one


STEPS = [reproduce.Step("presets", ("presets/presets.csv",), reproduce._presets),
         reproduce.Step("half", ("half/declared.csv",), write_half_then_rest)]


def test_reproduce_killed_mid_step_reruns_that_step_only(tmp_path, monkeypatch):
    """Killed (the driver and its step's child) inside the second step, after it wrote its declared output: the
    rerun keeps the first step's outputs and runs the second again to its end."""
    monkeypatch.setattr(reproduce, "STEPS", STEPS)
    reproduce.main(["--out", str(tmp_path / "straight")])
    out = tmp_path / "killed"
    child = run_killed("experiments.reproduce", ("experiments.reproduce", "write_text", 2), ["--out", str(out)],
                       ("m.STEPS = t.STEPS",), KILL_PARENT="1")
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
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
