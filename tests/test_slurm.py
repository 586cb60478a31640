"""The Slurm launcher on a real cluster: the one-node cluster `scripts/local_slurm.sh start` runs here (`.ci/run`
starts it before the tests). Where no cluster answers, these tests are skipped with the reason."""
import dataclasses
import json
import shutil
import subprocess
import threading
import time

import pandas as pd
import pytest

from analysis import mhsa_ratio
from evit import launch
from evit.launch import Launcher, Run, run_dir, run_trainings
from evit.train import CHECKPOINT, read_checkpoint
from tests.test_launch import TINY, learned, tiny


def cluster_problem() -> str | None:
    """Why no Slurm cluster can take jobs here, or None when one can."""
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        return "no sbatch/sinfo on PATH"
    try:
        answer = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s"
    states = answer.stdout.split()
    if answer.returncode != 0 or not any(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states):
        return f"no node takes jobs (sinfo: {answer.stderr.strip() or ' '.join(states) or 'no nodes'})"
    return None


PROBLEM = cluster_problem()
START = "start one: bash scripts/local_slurm.sh start"
pytestmark = [pytest.mark.skipif(PROBLEM is not None, reason=f"Slurm tests skipped: {PROBLEM}; {START}"),
              pytest.mark.usefixtures("hide_gpus")]
SLURM = Launcher("slurm", time_min=10)


def scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True).stdout


def job_field(job_id: str, name: str) -> str:
    """A field of `scontrol show job` (Restarts, JobState, ...)."""
    fields = dict(item.split("=", 1) for item in scontrol("show", "job", job_id).split() if "=" in item)
    return fields[name]


def wait_until(condition, what: str, timeout_s: float = 120.0, poll_s: float = 0.05):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def without_time(metrics: dict) -> dict:
    return {k: v for k, v in metrics["final"].items() if k != "epoch_time_s"}


def recorded_job(folder):
    record = folder / launch.JOB_RECORD
    return record.is_file() and json.loads(record.read_text())["job_id"]


def test_mhsa_ratio_on_slurm_gives_the_inline_accuracies(tmp_path, monkeypatch):
    """Two variants as one job array: the same accuracies as trained in this process."""
    monkeypatch.setattr(mhsa_ratio, "measure_speed", lambda model, img_size, peaks: dict(
        throughput=1.0, memory_bound_share=0.5))
    args = ["--family", "deit", "--data", "digits", "--img-size", "32", "--shares", "0,1", "--seeds", "0",
            "--epochs", "1", "--limit-train", "64", "--limit-val", "32", "--batch-size", "32"]
    on_slurm = mhsa_ratio.main(args + ["--launcher", "slurm", "--out", str(tmp_path / "slurm")])
    inline = mhsa_ratio.main(args + ["--out", str(tmp_path / "inline")])
    (script,) = (tmp_path / "slurm" / "runs" / launch.JOBS).glob("*_submission.sh")
    assert "#SBATCH --array=0-1%2" in script.read_text()  # one array of the two runs
    columns = ["share", "seed", "val_acc"]
    pd.testing.assert_frame_equal(on_slurm[columns].reset_index(drop=True), inline[columns].reset_index(drop=True))
    for metrics in (tmp_path / "inline" / "runs").glob("*/metrics.json"):  # losses too, run by run
        twin = tmp_path / "slurm" / "runs" / metrics.parent.name / "metrics.json"
        assert without_time(json.loads(twin.read_text())) == without_time(json.loads(metrics.read_text()))


def test_a_job_requeued_mid_training_resumes_from_its_last_checkpoint(tmp_path):
    """`scontrol requeue` once the first epoch's last.pth is written (the planted point): the job runs again,
    resumes there, and ends with the metrics of a run never interrupted."""
    # Epochs enough that the requeue (signal, KillWait) lands before the last one: with 8 the job once finished first
    cfg = dataclasses.replace(TINY, epochs=16, img_size=32, model_kwargs=dict(TINY.model_kwargs, embed_dim=64, depth=2))
    folder = run_dir(tmp_path / "slurm", cfg)
    outcome = []
    launching = threading.Thread(target=lambda: outcome.extend(run_trainings([cfg], tmp_path / "slurm", SLURM)))
    launching.start()
    wait_until(lambda: (folder / CHECKPOINT).is_file(), "the first epoch's checkpoint")
    job_id = recorded_job(folder)
    scontrol("requeue", job_id)
    wait_until(lambda: job_field(job_id, "JobState") == "PENDING", "the requeued job to be pending")
    done = read_checkpoint(folder / CHECKPOINT)["epoch"]
    assert 1 <= done < cfg.epochs, "the job must be requeued mid-way for this test to mean anything"
    scontrol("update", f"jobid={job_id}", "StartTime=now")  # Slurm holds a requeued job ~2 minutes otherwise
    launching.join(timeout=300)
    (interrupted,) = outcome
    assert interrupted.finished, launch.missing_report(outcome)
    assert job_field(job_id, "Restarts") == "1"
    (straight,) = run_trainings([cfg], tmp_path / "inline")
    assert learned(interrupted) == learned(straight)


def test_a_relaunch_waits_for_the_jobs_still_queued_and_submits_none(tmp_path, capsys):
    """A first launch's jobs queued (as a launcher killed after submitting leaves them): a second launch of the
    same runs submits nothing and comes back with their results."""
    runs = [Run(tiny(seed)) for seed in (0, 1)]
    first = launch.submit([(run, run_dir(tmp_path, run)) for run in runs], SLURM, tmp_path / launch.JOBS)
    assert all(launch.queue_state(job.job_id) in launch.QUEUED_STATES for job in first)
    again = run_trainings(runs, tmp_path, SLURM)
    assert all(o.finished for o in again), launch.missing_report(again)
    assert len(list((tmp_path / launch.JOBS).glob("*_submission.sh"))) == 1  # the first launch's array only
    out = capsys.readouterr().out
    assert all(f"job {job.job_id} of an earlier launch is still queued" in out for job in first)
    assert [recorded_job(o.folder) for o in again] == [job.job_id for job in first]


def test_failed_and_cancelled_jobs_are_named_and_the_others_finish(tmp_path):
    """Seed 1's last.pth is no checkpoint (its job fails), seed 2's job is cancelled once it runs (it leaves no
    result): each is named with its last line, seed 0 finishes."""
    broken = run_dir(tmp_path, tiny(1)) / CHECKPOINT
    broken.parent.mkdir(parents=True)
    broken.write_text("not a checkpoint")
    cancelled = run_dir(tmp_path, tiny(2))

    def cancel_when_running():
        job_id = wait_until(lambda: recorded_job(cancelled), "seed 2's job record")
        wait_until(lambda: launch.queue_state(job_id) == "RUNNING", "seed 2's job to run")
        subprocess.run(["scancel", job_id], check=True)

    cancelling = threading.Thread(target=cancel_when_running)
    cancelling.start()
    outcomes = run_trainings([tiny(0), tiny(1), tiny(2)], tmp_path, SLURM)
    cancelling.join()
    finished, failed, killed = outcomes
    assert finished.finished and learned(finished)["val_acc"] > 0.1
    assert "CheckpointError" in failed.error and CHECKPOINT in failed.error and "Traceback" in failed.log.read_text()
    assert "left the queue (CANCELLED" in killed.error
    report = launch.missing_report(outcomes)
    assert report.startswith("2 of 3 runs did not finish") and failed.error in report and killed.error in report
