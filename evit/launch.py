"""Trainings as jobs: in this process or side by side in worker processes (inline), as submitit jobs on this
machine (local) or on Slurm (slurm).

    run_trainings(configs, out, Launcher("slurm", partition="gpu", gpus_per_job=4, time_min=120))

Every run has its own folder under `out`, named by the model and a hash of the settings that determine its
weights, so a re-launch skips the runs that finished (their `model.pth` exists) and submits the others again,
which resume from their `last.pth`. A job is `evit.train.fit` (the code `python -m evit.train` runs);
with several GPUs it is one DDP training, one process (submitit task) per GPU. submitit's job files (pickles,
stdout and stderr per task, named by job id) sit in `out/jobs/` (docs/launch.md). A failed run comes back as an
`Outcome` naming the exception's last line and the job's log: the caller reports it and builds its tables from the
runs that finished.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import shutil
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import submitit
import torch.distributed as dist
import torch.nn as nn

from evit.builder.io import write_json
from evit.builder.cache_keys import key_of
from evit.cli import UserError, option
from evit.train import (FINAL, TrainConfig, check_inputs, fit, init_distributed, load_data, recipe as train_recipe,
                        resolve_img_size, seed_everything, train)
from evit.zoo import check_teacher, teacher_loader

LAUNCHERS = ("inline", "local", "slurm")
JOBS = "jobs"  # the folder under `out` with submitit's job folders
JOB_RECORD = "job.json"  # in a run's folder: the Slurm job that trains it, so a re-launch waits for it
# squeue's states of a job that will still run or is running (a requeued job goes back to PENDING).
UNANSWERED = "UNANSWERED"  # queue_state when squeue could not be asked
QUEUED_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                           "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "PREEMPTED",
                           UNANSWERED})


@dataclass
class Launcher:
    """Where trainings run; its fields are the flags a command that trains gets by subclassing it (`class
    Settings(Launcher)`, whose `check` calls `super().check()`). Each job trains one run over `gpus_per_job` GPUs,
    one DDP process per GPU (0: one process on what the machine has); a job that reaches `time_min` is requeued
    and resumes. The other fields are Slurm's."""

    kind: str = option("inline", "inline: in this process; local: submitit jobs on this machine, one after "
                       "another; slurm: submitit jobs on Slurm, all queued at once", flags=("--launcher",),
                       choices=LAUNCHERS)
    parallel: int = option(1, "inline: trainings side by side, each in a worker process of its own (1: one after "
                              "another in this process)")
    gpus_per_job: int = option(0, "GPUs per job, one DDP process each (0: one process)")
    time_min: int = option(240, "job time limit in minutes", flags=("--time",))
    partition: Optional[str] = option(None, "Slurm partition")
    account: Optional[str] = option(None, "Slurm account")
    cpus_per_task: Optional[int] = option(None, "Slurm CPUs per process")
    mem_gb: Optional[float] = option(None, "Slurm memory per node in GB")
    slurm_params: dict = option({}, 'more #SBATCH lines as JSON, e.g. \'{"qos": "high"}\'')

    def check(self) -> None:
        """One UserError line per impossible combination, before anything is submitted."""
        if self.kind not in LAUNCHERS:
            raise UserError(f"unknown launcher '{self.kind}'; valid: {', '.join(LAUNCHERS)}")
        if self.gpus_per_job < 0 or self.time_min <= 0:
            raise UserError(f"--gpus-per-job must be 0 or more and --time (minutes) more than 0, got "
                            f"{self.gpus_per_job} and {self.time_min}")
        if self.parallel < 1 or (self.parallel > 1 and self.kind != "inline"):
            raise UserError(f"--parallel must be 1 or more and applies to --launcher inline (local jobs run one "
                            f"after another, Slurm queues them all); got --parallel {self.parallel} with "
                            f"--launcher {self.kind}")
        if self.kind == "inline" and self.gpus_per_job:
            raise UserError("--gpus-per-job needs --launcher local or slurm (inline trains in this process, on its "
                            "devices)")
        slurm_only = [flag for flag, value in (("--partition", self.partition), ("--account", self.account),
                                               ("--cpus-per-task", self.cpus_per_task), ("--mem-gb", self.mem_gb),
                                               ("--slurm-params", self.slurm_params)) if value]
        if slurm_only and self.kind != "slurm":
            raise UserError(f"{', '.join(slurm_only)} apply to --launcher slurm only (got --launcher {self.kind})")
        if self.kind == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
            raise UserError("--launcher slurm needs Slurm's sbatch and srun on PATH, and this machine has none; "
                            "use --launcher local or inline here")

    @classmethod
    def of(cls, settings: Any) -> "Launcher":
        """The launcher part of a command's settings (a subclass of this)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})

    @property
    def tasks_per_job(self) -> int:
        return max(1, self.gpus_per_job)

    def executor(self, folder: Path) -> submitit.Executor:
        """submitit's executor for these settings, writing its job files (pickles, logs) in `folder`."""
        executor = submitit.AutoExecutor(folder, cluster=self.kind)
        executor.update_parameters(
            name="evit", timeout_min=self.time_min, nodes=1, tasks_per_node=self.tasks_per_job,
            gpus_per_node=self.gpus_per_job, cpus_per_task=self.cpus_per_task, mem_gb=self.mem_gb,
            slurm_partition=self.partition, slurm_account=self.account,
            slurm_additional_parameters=dict(self.slurm_params) or None)
        return executor


@dataclass(frozen=True)
class Run:
    """One training: its settings and, for a model no name describes (an analysis's variant), the picklable
    function that builds it from `build_kwargs` (called after seeding with the run's seed; both key the run)."""

    config: TrainConfig
    build: Optional[Callable[..., nn.Module]] = None
    build_kwargs: Mapping[str, Any] = field(default_factory=dict)


def as_run(run: Union[Run, TrainConfig]) -> Run:
    return run if isinstance(run, Run) else Run(run)


def recipe(run: Union[Run, TrainConfig]) -> dict[str, Any]:
    """What determines a run's weights: its TrainConfig's recipe (evit.train.recipe), and the builder of a variant
    by its name and arguments."""
    run = as_run(run)
    recipe = train_recipe(run.config)
    if run.build is not None:
        recipe.update(build=f"{run.build.__module__}.{run.build.__qualname__}", build_kwargs=dict(run.build_kwargs))
    return recipe


def run_dir(root: Path, run: Union[Run, TrainConfig]) -> Path:
    """The run's folder under `root`: the model's name and a hash of its `recipe`."""
    run = as_run(run)
    return Path(root) / f"{Path(run.config.model).stem}-{key_of(recipe(run))}"


def finished(folder: Path) -> bool:
    return (folder / FINAL).is_file()


def train_run(run: Run, folder: Path) -> None:
    """Train `run` into `folder`, resuming from its last checkpoint there; inside the process group that the
    environment describes (torchrun's variables), if any."""
    cfg = dataclasses.replace(run.config, out=str(folder), resume="auto")
    load_teacher = teacher_loader(cfg)
    joins = not dist.is_initialized()
    init_distributed()
    try:
        if run.build is None:
            fit(cfg, load_teacher)
        else:
            seed_everything(cfg.seed)  # the same initial weights on every rank and every resume, as fit does
            model, cfg = run.build(**run.build_kwargs), resolve_img_size(cfg)
            data = load_data(cfg)
            train(model, cfg, data, load_teacher(data.num_classes) if load_teacher else None)
    finally:
        if joins and dist.is_initialized():
            dist.destroy_process_group()


def train_or_error(run: Run, folder: Path) -> Optional[str]:
    """train_run, and None once trained, else the failure's last line (which a worker process sends back whole,
    where a traceback would not)."""
    try:
        train_run(run, folder)
    except Exception as error:  # the caller reports it and goes on with the runs that finished
        return last_line(error)
    return None


def side_by_side(function: Callable[..., Any], calls: Sequence[tuple], processes: int) -> list[Any]:
    """function(*call) for every call, `processes` at a time, each in a worker process, and their results in
    order. Spawned, not forked: a worker imports what it needs and inherits no thread pool of this process
    (forking a process that ran OpenMP can hang the child). A call's exception is raised here."""
    with multiprocessing.get_context("spawn").Pool(max(1, min(processes, len(calls)))) as pool:
        pending = [pool.apply_async(function, call) for call in calls]
        results = [result.get() for result in pending]
        # Let the workers exit rather than the pool's exit terminating them: killed workers leak the pool's
        # semaphores (the resource tracker's warning) and may still be exiting when the caller's next step starts.
        pool.close()
        pool.join()
    return results


class TrainingJob(submitit.helpers.Checkpointable):
    """A run as a submitit job, each of its tasks one DDP process. Checkpointable: after a timeout or a
    preemption submitit requeues the same call, which resumes from the run's last.pth."""

    def __call__(self, run: Run, folder: Path) -> None:
        if submitit.JobEnvironment().num_tasks > 1:
            # torchrun's variables for init_distributed; every task sees all the job's GPUs and takes LOCAL_RANK's.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        train_run(run, folder)


@dataclass(frozen=True)
class Outcome:
    """A run after a launch: its folder and, when it finished, its metrics.json; else the failure's last line
    and the job's stderr (None inline)."""

    run: Run
    folder: Path
    error: Optional[str] = None
    log: Optional[Path] = None

    @property
    def finished(self) -> bool:
        return self.error is None

    @property
    def metrics(self) -> dict[str, Any]:
        """The final epoch's metrics (and best_val_acc)."""
        return json.loads((self.folder / "metrics.json").read_text())["final"]

    @property
    def train_time_s(self) -> float:
        history = json.loads((self.folder / "metrics.json").read_text())["history"]
        return sum(row["epoch_time_s"] for row in history)


def last_line(error: BaseException) -> str:
    """The line that names a failure: the exception's type and message, or for a job that failed, its own
    traceback's last line (submitit quotes the traceback between two rules of dashes)."""
    if isinstance(error, submitit.core.utils.FailedJobError):
        text = str(error).split("-" * 22)[1]
    elif isinstance(error, submitit.core.utils.UncompletedJobError):
        text = str(error)
    else:
        text = traceback.format_exception_only(error)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def submit(todo: Sequence[tuple[Run, Path]], launcher: Launcher, jobs: Path) -> list[submitit.Job]:
    """Submit one job per (run, folder), as one Slurm array when there are several; each Slurm job is recorded in
    its run's folder (JOB_RECORD)."""
    executor = launcher.executor(jobs)
    with executor.batch():
        submitted = [executor.submit(TrainingJob(), run, folder) for run, folder in todo]
    if launcher.kind == "slurm":
        for (_, folder), job in zip(todo, submitted):
            write_json(Path(folder) / JOB_RECORD, dict(job_id=job.job_id, jobs=str(jobs),
                                                      tasks=launcher.tasks_per_job))
    return submitted


def queue_state(job_id: str) -> Optional[str]:
    """The job's state as squeue reports it (PENDING, RUNNING, COMPLETED, ...); None once squeue says it no longer
    knows the job (it forgets one MinJobAge seconds after its end); UNANSWERED when squeue itself failed (a busy or
    restarting slurmctld), which counts as still queued: a job is never given up for a missed answer."""
    try:
        answer = subprocess.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return UNANSWERED
    states = answer.stdout.split()
    if answer.returncode == 0:
        return states[0] if states else None
    return None if "Invalid job id" in answer.stderr else UNANSWERED


def queued_job(folder: Path) -> Optional[submitit.Job]:
    """The Slurm job an earlier launch submitted for the run in `folder`, if it is still queued or running."""
    record_path = Path(folder) / JOB_RECORD
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    if queue_state(record["job_id"]) not in QUEUED_STATES:
        return None
    return submitit.SlurmJob(folder=Path(record["jobs"]), job_id=record["job_id"], tasks=range(record["tasks"]))


def has_result(job: submitit.Job) -> bool:
    """Whether every task of the job has written its result (or its error)."""
    return all(job.task(task).paths.result_pickle.exists() for task in range(job.num_tasks))


def wait(job: submitit.Job, folder: Path, poll_s: float = 2.0) -> Optional[str]:
    """None once the job has trained its run, else what went wrong. A Slurm job is followed through squeue, so a
    job that left the queue without writing its result (cancelled, killed for memory) is reported by its state
    on a cluster without accounting (sacct) too."""
    if isinstance(job, submitit.SlurmJob):
        while not has_result(job):
            state = queue_state(job.job_id)
            if state not in QUEUED_STATES:
                time.sleep(poll_s)  # its result may land just after its state turns COMPLETED
                if not has_result(job):
                    return f"job {job.job_id} left the queue ({state or 'forgotten by squeue'}) without a result"
            time.sleep(poll_s)
    error = job.exception()  # waits for the job
    if error is None and not finished(folder):
        return f"job {job.job_id} ended without writing {folder / FINAL}"
    return None if error is None else last_line(error)


def run_trainings(runs: Sequence[Union[Run, TrainConfig]], out: Path,
                  launcher: Optional[Launcher] = None) -> list[Outcome]:
    """Train every run that has not finished in `out` (one job each, resuming where one stopped; default: inline)
    and return every run's outcome, in order. Bad settings fail here (UserError), before anything is submitted."""
    launcher = launcher or Launcher()
    launcher.check()
    runs = [as_run(r) for r in runs]
    for run in runs:
        check_inputs(run.config)
        check_teacher(run.config)
    folders = [run_dir(out, run) for run in runs]
    todo = [(run, folder) for run, folder in zip(runs, folders) if not finished(folder)]
    failures: dict[Path, tuple[str, Optional[Path]]] = {}

    def await_job(folder: Path, job: submitit.Job) -> None:
        error = wait(job, folder)
        if error is not None:
            failures[folder] = (error, job.paths.stderr)

    jobs = Path(out) / JOBS
    if launcher.kind == "inline":
        # Side by side, each run trains on its config's threads, so its result is the one it gets alone.
        errors = (side_by_side(train_or_error, todo, launcher.parallel) if launcher.parallel > 1 and len(todo) > 1
                  else [train_or_error(run, folder) for run, folder in todo])
        failures.update({folder: (error, None) for (_, folder), error in zip(todo, errors) if error is not None})
    elif launcher.kind == "slurm":  # every job queued at once, but those an earlier launch queued: waited for
        queued = {folder: job for _, folder in todo if (job := queued_job(folder)) is not None}
        for folder, job in queued.items():
            print(f"{folder.name}: job {job.job_id} of an earlier launch is still queued; waiting for it")
        fresh = [(run, folder) for run, folder in todo if folder not in queued]
        submitted = dict(zip((folder for _, folder in fresh), submit(fresh, launcher, jobs) if fresh else []))
        for folder, job in {**queued, **submitted}.items():
            await_job(folder, job)
    else:  # local jobs one after another, each on the machine's first GPUs
        for run, folder in todo:
            await_job(folder, submit([(run, folder)], launcher, jobs)[0])
    return [Outcome(run, folder, *failures.get(folder, (None, None))) for run, folder in zip(runs, folders)]


def missing_report(outcomes: Sequence[Outcome]) -> Optional[str]:
    """Lines naming the runs that did not finish, why and where their log is; None when all finished."""
    missing = [o for o in outcomes if not o.finished]
    if not missing:
        return None
    lines = [f"{len(missing)} of {len(outcomes)} runs did not finish (re-launch to retry them; finished runs are "
             f"kept):"]
    lines += [f"  {o.folder.name} (seed {o.run.config.seed}): {o.error}" + (f" [log: {o.log}]" if o.log else "")
              for o in missing]
    return "\n".join(lines)
