"""evit.launch: trainings as inline, local (submitit) or Slurm jobs, keyed by their settings."""
import dataclasses
import json
import os
import stat
import time

import cloudpickle
import pytest
import timm

from evit import launch
from evit.cli import parse_settings, run_cli
from evit.launch import Launcher, Run, run_dir, run_trainings
from evit.train import CHECKPOINT, FINAL, TrainConfig

pytestmark = pytest.mark.usefixtures("hide_gpus")  # the jobs and children train on the CPU
# A one-block LayerNorm ViT on sklearn digits at their native 8x8, one epoch: a few seconds a run.
TINY_VIT = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2)
TINY = TrainConfig(model="vit_tiny_patch16_224", model_kwargs=TINY_VIT, data="digits", epochs=1, batch_size=32,
                   lr=3e-3, warmup_epochs=0, threads=1, limit_train=512)


def tiny(seed: int) -> TrainConfig:
    return dataclasses.replace(TINY, seed=seed)


def learned(outcome: launch.Outcome) -> dict:
    """A run's final metrics less its wall-clock time."""
    return {k: v for k, v in outcome.metrics.items() if k != "epoch_time_s"}


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, hide_gpus):
    """Seeds 0 and 1 launched as submitit jobs on this machine (each a subprocess), seed 1 planted to fail: its
    folder holds a last.pth that is no checkpoint. Returns the folder, the outcomes and the broken file."""
    out = tmp_path_factory.mktemp("local")
    broken = run_dir(out, tiny(1)) / CHECKPOINT
    broken.parent.mkdir()
    broken.write_text("not a checkpoint")
    start = time.perf_counter()
    outcomes = run_trainings([tiny(0), tiny(1)], out, Launcher("local"))
    print(f"local: 2 jobs in {time.perf_counter() - start:.1f} s")
    return out, outcomes, broken


def test_local_jobs_train_exactly_as_inline(local_runs, tmp_path):
    out, (local, _), _ = local_runs
    start = time.perf_counter()
    (inline,) = run_trainings([tiny(0)], tmp_path, Launcher("inline"))
    print(f"inline: 1 run in {time.perf_counter() - start:.1f} s")
    assert local.finished and inline.finished
    assert learned(local) == learned(inline)  # val_acc, val_loss, train_loss: exactly
    assert local.folder.name == inline.folder.name  # keyed by settings, not by launcher
    assert (local.folder / "metrics.csv").is_file()
    logs = [log.read_text() for log in (out / launch.JOBS).glob("*_0_log.out")]
    assert sum(f"val_acc={local.metrics['val_acc']:.4g}" in log for log in logs) == 1  # the job's own log


def test_a_failed_job_names_its_error_and_log(local_runs):
    _, (_, failed), broken = local_runs
    assert not failed.finished and "CheckpointError" in failed.error and CHECKPOINT in failed.error
    assert failed.log.parent == broken.parents[1] / launch.JOBS and "Traceback" in failed.log.read_text()
    report = launch.missing_report(local_runs[1])
    assert report.startswith("1 of 2 runs did not finish") and failed.folder.name in report
    assert failed.error in report and str(failed.log) in report


def test_relaunch_resubmits_only_the_failed_run_which_trains_as_one_ddp_job_of_two_processes(local_runs):
    out, before, broken = local_runs
    submitted = lambda: sorted((out / launch.JOBS).glob("*_submitted.pkl"))  # noqa: E731
    first, finished_at = submitted(), (before[0].folder / FINAL).stat().st_mtime_ns
    broken.unlink()
    # Two GPUs a job; none here: the job's two submitit tasks join one gloo process group, as NCCL on Slurm.
    again = run_trainings([tiny(0), tiny(1)], out, Launcher("local", gpus_per_job=2))
    assert all(o.finished for o in again), launch.missing_report(again)
    assert len(submitted()) == len(first) + 1  # seed 1 only
    assert (again[0].folder / FINAL).stat().st_mtime_ns == finished_at and learned(again[0]) == learned(before[0])
    assert json.loads((again[1].folder / "metrics.json").read_text())["world_size"] == 2
    (job,) = set(submitted()) - set(first)
    assert (job.parent / job.name.replace("submitted.pkl", "1_log.err")).is_file()  # the second task's log


def test_inline_side_by_side_trains_each_run_as_alone_and_names_a_failure(tmp_path):
    """Three runs two at a time in worker processes: the metrics of the same runs one after another in this
    process; seed 1's broken last.pth fails it alone, named by its last line."""
    broken = run_dir(tmp_path / "side", tiny(1)) / CHECKPOINT
    broken.parent.mkdir(parents=True)
    broken.write_text("not a checkpoint")
    side = run_trainings([tiny(0), tiny(1), tiny(2)], tmp_path / "side", Launcher(parallel=2))
    alone = run_trainings([tiny(0), tiny(2)], tmp_path / "alone")
    assert [o.finished for o in side] == [True, False, True]
    assert "CheckpointError" in side[1].error and CHECKPOINT in side[1].error and side[1].log is None
    assert [learned(o) for o in (side[0], side[2])] == [learned(o) for o in alone]


def tiny_vit(**kwargs) -> "timm.models.VisionTransformer":
    """TINY's model built by a function, as an analysis builds a variant no name describes."""
    return timm.create_model("vit_tiny_patch16_224", img_size=8, num_classes=10, **kwargs)


def test_a_run_with_a_builder_trains_as_the_named_model_it_equals(tmp_path):
    variant = Run(dataclasses.replace(TINY, model_kwargs={}), build=tiny_vit, build_kwargs=TINY_VIT)
    built, named = run_trainings([variant, TINY], tmp_path)
    assert built.folder != named.folder  # the builder and its arguments key the run
    assert learned(built) == learned(named)  # seeded before building: the same initial weights


def test_a_run_is_keyed_by_what_determines_its_weights(tmp_path):
    variant = Run(TINY, build=tiny_vit, build_kwargs=TINY_VIT)
    assert run_dir(tmp_path, dataclasses.replace(TINY, threads=2, workers=3, out="x")) == run_dir(tmp_path, TINY)
    assert run_dir(tmp_path, tiny(1)) != run_dir(tmp_path, TINY)
    assert run_dir(tmp_path, Run(TINY)) == run_dir(tmp_path, TINY)
    assert run_dir(tmp_path, dataclasses.replace(variant, build_kwargs=dict(TINY_VIT, depth=2))) != run_dir(
        tmp_path, variant)
    assert run_dir(tmp_path, variant).name.startswith("vit_tiny_patch16_224-")


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch and srun on PATH; sbatch keeps the script it is given and answers with a job id."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "sbatch_scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {scripts}/$$.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def test_slurm_jobs_ask_for_the_flags_resources(fake_slurm, tmp_path):
    launcher = parse_settings(Launcher, ["--launcher", "slurm", "--partition", "gpu", "--gpus-per-job", "4",
                                         "--time", "90", "--account", "proj", "--cpus-per-task", "8",
                                         "--mem-gb", "64", "--slurm-params", '{"qos": "high"}'], "launch")
    todo = [(Run(tiny(seed)), run_dir(tmp_path, tiny(seed))) for seed in (0, 1)]
    jobs = launch.submit(todo, launcher, tmp_path / launch.JOBS)
    (script,) = [p.read_text() for p in fake_slurm.iterdir()]  # one sbatch call: an array of two jobs
    lines = set(script.splitlines())
    assert {"#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
            "#SBATCH --time=90", "#SBATCH --account=proj", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB",
            "#SBATCH --qos=high", "#SBATCH --nodes=1", "#SBATCH --array=0-1%2"} <= lines
    assert f"{tmp_path / launch.JOBS}/%A_%a_0_log.out" in script  # the job logs go under out/jobs, beside the script
    assert (tmp_path / launch.JOBS / "4242_submission.sh").read_text() == script
    assert "srun" in script and "-m submitit.core._submit" in script
    assert [job.job_id for job in jobs] == ["4242_0", "4242_1"]
    call = cloudpickle.loads(jobs[1].paths.submitted_pickle.read_bytes())  # what the second job will run
    assert isinstance(call.function, launch.TrainingJob) and call.args == todo[1]


@pytest.mark.parametrize("stderr, expected", [
    ("slurm_load_jobs error: Invalid job id specified", None),  # forgotten: the job ended long ago
    ("slurm_load_jobs error: Unable to contact slurm controller (connect failure)", launch.UNANSWERED),
])
def test_a_failed_squeue_call_is_no_answer_not_a_forgotten_job(stderr, expected, tmp_path, monkeypatch):
    squeue = tmp_path / "squeue"
    squeue.write_text(f'#!/bin/sh\necho "{stderr}" >&2\nexit 1\n')
    squeue.chmod(squeue.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert launch.queue_state("123_0") == expected
    assert (expected in launch.QUEUED_STATES) == (expected is not None)  # no answer: waited for, never resubmitted


@pytest.mark.parametrize("argv, message", [
    (["--launcher", "local", "--partition", "gpu"], "--partition apply to --launcher slurm only"),
    (["--gpus-per-job", "2"], "--gpus-per-job needs --launcher local or slurm"),
    (["--launcher", "slurm"], "--launcher slurm needs Slurm's sbatch and srun on PATH"),
    (["--launcher", "cluster"], "invalid choice: 'cluster'"),
    (["--launcher", "local", "--parallel", "2"], "--parallel must be 1 or more and applies to --launcher inline"),
    (["--parallel", "0"], "--parallel must be 1 or more"),
])
def test_impossible_launchers_are_one_line_errors(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm here
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: parse_settings(Launcher, argv, "launch").check())  # as a command's run() does first
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and message in err[-1] and "Traceback" not in "".join(err)
