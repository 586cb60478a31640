"""Train any evit/timm model on Fashion-MNIST, sklearn digits or an ImageNet-style folder.

    python -m evit.train --model evit_m0 --data fashion_mnist --img-size 64 --epochs 5 --out runs/m0
    python -m evit.train --config experiments/configs/imagenet_official.yaml --data imagefolder:/data/in1k
    python -m evit.train --model deit_proxy --weights pruned.pth --epochs 3 --out runs/ft   # fine-tune
    torchrun --nproc_per_node 8 -m evit.train --config ...      # DDP: NCCL on GPUs, gloo on CPU

timm does the parts (AdamW, cosine schedule with warm-up, label smoothing, Mixup/CutMix, EMA); this file wires
them up so that a run killed at any point resumes from its last epoch and reproduces the uninterrupted run:
every epoch writes `last.pth` (model, optimizer, scheduler, EMA, scaler and every RNG state of every rank),
`metrics.csv` and `metrics.json` atomically; the finished run writes `model.pth` (the weights to evaluate).
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from evit.builder.io import CheckpointError, read_checkpoint, torch_save, write_csv, write_json
from evit.builder.cache_keys import file_key
from evit.cli import UserError, option
from evit.data import DataError, Datasets, build_datasets, check_data, check_fits, default_img_size, subset
from evit.distillation import (DISTILLATION_SETTINGS, DISTILLATION_TYPES, TEACHER_HELP, TEACHER_WEIGHTS_HELP,
                               check_distillation, distillation_loss)
from evit.models import check_model, create_model, is_config_file, model_img_size
from evit.weights import check_file, load_file, load_weights, structure_record

class TrainingConfigError(UserError, ValueError):
    """A training config file that cannot be read as TrainConfig's settings."""


CHECKPOINT = "last.pth"
FINAL = "model.pth"
# TrainConfig fields that say where and how a run executes, not what it learns: no part of its recipe.
PLACEMENT = ("out", "resume", "workers", "threads")


@dataclass
class TrainConfig:
    """Everything a run depends on. Defaults suit a quick run; configs/imagenet_official.yaml is the paper's."""

    model: str = option("evit_m0", "evit preset, proxy, evit config file or timm name")
    model_kwargs: dict = option({}, "extra kwargs for timm.create_model (JSON on the command line)")
    weights: Union[str, None] = option(None, "initial weights: a checkpoint file (a model.pth of evit.train, "
                                       "or a pruned model of analysis.taylor_prune --save-model, rebuilt at its "
                                       "widths) of --model (None: random initialization)")
    data: str = option("fashion_mnist", "fashion_mnist, digits or imagefolder:PATH")
    data_dir: Union[str, None] = option(None, "data root (Fashion-MNIST IDX files or image folder)")
    img_size: Union[int, None] = option(None, "input size (None: the data's native size)")
    epochs: int = option(10, "epochs")
    batch_size: int = option(128, "batch size per process")
    lr: Union[float, None] = option(None, "learning rate (None: lr_base * global batch / 512)")
    lr_base: float = option(1e-3, "learning rate per 512 images of global batch")
    min_lr: float = option(1e-5, "final cosine learning rate")
    warmup_lr: float = option(1e-6, "learning rate at the start of warm-up")
    warmup_epochs: int = option(1, "linear warm-up epochs")
    opt: str = option("adamw", "timm optimizer name")
    opt_eps: float = option(1e-8, "optimizer epsilon")
    weight_decay: float = option(0.025, "weight decay (not on biases and norms)")
    clip_grad: Union[float, None] = option(None, "gradient clipping value (off if unset)")
    clip_mode: str = option("norm", "gradient clipping mode: norm, value or agc")
    smoothing: float = option(0.1, "label smoothing")
    mixup: float = option(0.0, "mixup alpha (0: off)")
    cutmix: float = option(0.0, "cutmix alpha (0: off)")
    ema_decay: float = option(0.0, "model EMA decay (0: off); the EMA weights are evaluated and saved")
    repeated_aug: bool = option(False, "repeated augmentation sampler (3 repeats)")
    auto_augment: Union[str, None] = option(None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (folders)")
    color_jitter: float = option(0.4, "color jitter (folders)")
    re_prob: float = option(0.0, "random erasing probability (folders)")
    re_mode: str = option("pixel", "random erasing fill: pixel (random normal), rand or const (folders)")
    interpolation: str = option("bilinear", "resize interpolation (folders)")
    crop_pct: Union[float, None] = option(None, "eval center-crop fraction, e.g. 0.875 = resize 256, crop 224 "
                                                "(folders)")
    amp: bool = option(True, "mixed precision on CUDA")
    seed: int = option(0, "random seed")
    out: Union[str, None] = option(None, "output folder: checkpoints, metrics.csv, metrics.json, model.pth")
    resume: Union[str, None] = option(None, "checkpoint to resume; bare --resume: OUT/last.pth if it exists",
                                    nargs="?", const="auto")
    limit_train: Union[int, None] = option(None, "use a fixed random subset of N training images")
    limit_val: Union[int, None] = option(None, "use a fixed random subset of N validation images")
    workers: int = option(0, "data loader worker processes")
    threads: Union[int, None] = option(None, "torch threads per process (None: torch's choice, see OMP_NUM_THREADS)")
    # DeiT-style distillation (evit/distillation.py): for a model with a distillation head.
    teacher: Union[str, None] = option(None, f"teacher for the distillation head: {TEACHER_HELP}")
    teacher_weights: Union[str, None] = option(None, TEACHER_WEIGHTS_HELP)
    distillation_type: str = option("hard", "distillation loss: hard (teacher's argmax) or soft (KL at tau)",
                                  choices=DISTILLATION_TYPES)
    distillation_alpha: float = option(0.5, "weight of the distillation loss; the label loss gets 1 - alpha")
    distillation_tau: float = option(1.0, "soft distillation temperature")

    def augment(self) -> dict[str, Any]:
        """timm create_transform kwargs for image folders."""
        return dict(auto_augment=self.auto_augment, color_jitter=self.color_jitter, re_prob=self.re_prob,
                    re_mode=self.re_mode, interpolation=self.interpolation, crop_pct=self.crop_pct)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML/JSON training config; unknown keys are an error (a typo must not be silently ignored)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TrainingConfigError(f"training config not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # its message spans lines: where, what
        raise TrainingConfigError(f"training config {path} is not valid YAML/JSON: "
                                  f"{' '.join(str(e).split())}") from e
    if not isinstance(values, dict):
        raise TrainingConfigError(f"training config {path} must hold a mapping of keys, got "
                                  f"{type(values).__name__}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise TrainingConfigError(f"unknown key(s) {', '.join(unknown)} in {path}; valid keys are the --flags of "
                                  f"`python -m evit.train --help` with '-' written as '_'")
    return values


def as_config(cfg: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    return cfg if isinstance(cfg, TrainConfig) else TrainConfig(**cfg)


def recipe(cfg: TrainConfig) -> dict[str, Any]:
    """What determines a run's weights (what caches and run folders are keyed by): its settings less placement,
    an evit config file and an initial weights file by their content."""
    recipe = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in PLACEMENT}
    if cfg.teacher is None:  # without a teacher these settings act on nothing (and older keys stay valid)
        recipe = {k: v for k, v in recipe.items() if k not in DISTILLATION_SETTINGS}
    if is_config_file(cfg.model):
        recipe["model"] = Path(cfg.model).read_text()
    if cfg.weights is None:  # random initialization, as before the field existed: older keys stay valid
        del recipe["weights"]
    else:  # by content: a file written again (pruned again) starts another run
        recipe["weights"] = file_key(cfg.weights)
    return recipe


def resolve_img_size(cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(cfg, img_size=cfg.img_size or default_img_size(cfg.data))


def check_inputs(cfg: TrainConfig) -> None:
    """Fail at once, loading no data, on missing data, an unknown data spec or model name, a bad evit config file,
    distillation setting or weights file (missing, unreadable, or a pruned model of another architecture): a bad
    run stops in its first second, not after its data loads."""
    check_data(cfg.data, cfg.data_dir)
    check_model(cfg.model)
    check_distillation(cfg)
    if cfg.weights is not None:
        if not Path(cfg.weights).is_file():
            raise CheckpointError(f"--weights of a training is a checkpoint file (a model.pth, a pruned model); "
                                  f"{cfg.weights!r} is none")
        check_file(cfg.model, cfg.weights)


def load_data(cfg: TrainConfig) -> Datasets:
    return build_datasets(cfg.data, cfg.img_size, cfg.data_dir, cfg.augment())


# ---------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Process:
    """This process's place in the (possibly single-process) job."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Sum numbers over all processes (float64 so sums of losses and counts stay exact enough)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()


def init_distributed() -> None:
    """Join the process group torchrun describes in the environment (a no-op for a single process)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def current_process() -> Process:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if dist.is_initialized():
        return Process(dist.get_rank(), dist.get_world_size(), device)
    return Process(0, 1, device)


# ------------------------------------------------------------------------------------------------ RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state(loader_gen: torch.Generator) -> dict[str, Any]:
    """Every RNG a run draws from, as tensors and plain types (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
        "loader": loader_gen.get_state(),
    }


def set_rng_state(state: dict[str, Any], loader_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    loader_gen.set_state(state["loader"])


# ------------------------------------------------------------------------------------------------ training


@dataclass
class TrainState:
    """What a checkpoint holds; `model` is the unwrapped model (not the DDP wrapper)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    loader_gen: torch.Generator
    epoch: int = 0  # epochs completed
    num_updates: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self, proc: Process) -> dict[str, Any]:
        rng = get_rng_state(self.loader_gen)
        if proc.world > 1:  # rank 0 writes the file, so it collects the RNG state of every rank
            states: list[Any] = [None] * proc.world
            dist.all_gather_object(states, rng)
            rng = states
        else:
            rng = [rng]
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "rng": rng,
            "epoch": self.epoch,
            "num_updates": self.num_updates,
            "history": self.history,
        }

    def load_state_dict(self, ckpt: dict[str, Any], proc: Process, source: str | os.PathLike) -> None:
        load_weights(self.model, ckpt["model"], source)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema:
            self.ema.module.load_state_dict(ckpt["ema"])
        if len(ckpt["rng"]) == proc.world:  # else a different world size: keep the fresh seeds
            set_rng_state(ckpt["rng"][proc.rank], self.loader_gen)
        self.epoch, self.num_updates, self.history = ckpt["epoch"], ckpt["num_updates"], ckpt["history"]

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema else self.model


def resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from: None to start fresh (bare --resume with no checkpoint yet)."""
    if cfg.resume != "auto":
        return Path(cfg.resume) if cfg.resume else None
    if not cfg.out:
        raise CheckpointError("--resume without a path needs --out (it resumes OUT/last.pth)")
    path = Path(cfg.out) / CHECKPOINT
    return path if path.exists() else None


def restore(state: TrainState, path: Path, proc: Process) -> None:
    ckpt = read_checkpoint(path)
    missing = {"model", "optimizer", "scheduler", "rng", "epoch"} - set(ckpt)
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (no {', '.join(sorted(missing))}); "
                              f"to start from weights only, load them into the model instead")
    try:
        state.load_state_dict(ckpt, proc, path)
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:  # e.g. EMA or optimizer changed
        first_line = str(e).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not match this model/run: {first_line}") from e


def make_loaders(data: Datasets, cfg: TrainConfig, proc: Process,
                 gen: torch.Generator) -> tuple[DataLoader, DataLoader]:
    train_set, val_set = subset(data.train, cfg.limit_train), subset(data.val, cfg.limit_val)
    # The shuffle order depends only on (seed, epoch), so a resumed epoch sees the same batches.
    if cfg.repeated_aug:
        sampler = RepeatAugSampler(train_set, num_replicas=proc.world, rank=proc.rank)
    else:
        sampler = DistributedSampler(train_set, num_replicas=proc.world, rank=proc.rank, seed=cfg.seed)
    if len(sampler) < cfg.batch_size:
        raise DataError(f"{cfg.data}: {len(sampler)} training images per process, fewer than one batch of "
                        f"{cfg.batch_size}; lower --batch-size or raise --limit-train")
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=proc.device.type == "cuda")
    # `gen` seeds the workers' augmentation RNGs; it is checkpointed with the other RNG states.
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=True, generator=gen, **common)
    # Each rank evaluates its own stride of the validation set; the counts are summed, nothing is padded.
    val_shard = Subset(val_set, range(proc.rank, len(val_set), proc.world))
    val_loader = DataLoader(val_shard, shuffle=False, **common)
    return train_loader, val_loader


def autocast_for(cfg: TrainConfig, device: torch.device) -> tuple[Callable[[], Any], torch.amp.GradScaler]:
    """Autocast context factory and grad scaler: bfloat16 where supported (no scaling needed), else float16."""
    if not (cfg.amp and device.type == "cuda"):
        return nullcontext, torch.amp.GradScaler("cuda", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def train_one_epoch(state: TrainState, net: nn.Module, loader: DataLoader, loss_fn: nn.Module,
                    mixup: Mixup | None, cfg: TrainConfig, proc: Process, autocast: Callable[[], Any]) -> float:
    """One pass over the training set; returns the mean training loss over all processes."""
    net.train()
    loss_sum, count = torch.zeros((), device=proc.device), 0
    # disable=None: a bar on rank 0 when it writes to a terminal, none in logs or on other ranks.
    for x, y in tqdm(loader, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", leave=False,
                     disable=None if proc.is_main else True):
        x, y = x.to(proc.device, non_blocking=True), y.to(proc.device, non_blocking=True)
        if mixup:
            x, y = mixup(x, y)
        with autocast():
            loss = loss_fn(x, net(x), y)  # the inputs for a teacher
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        if cfg.clip_grad:
            state.scaler.unscale_(state.optimizer)
            dispatch_clip_grad(net.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.num_updates += 1
        state.scheduler.step_update(num_updates=state.num_updates)
        if state.ema:
            state.ema.update(state.model, step=state.num_updates)
        loss_sum += loss.detach() * len(x)
        count += len(x)
    total, n = proc.all_sum([loss_sum.item(), count])
    return total / n


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, proc: Process, autocast: Callable[[], Any]) -> dict[str, float]:
    """Top-1 accuracy (%) and cross-entropy over the whole validation set (all processes' shards)."""
    model.eval()
    loss_sum = correct = count = 0.0
    for x, y in loader:
        x, y = x.to(proc.device, non_blocking=True), y.to(proc.device, non_blocking=True)
        with autocast():
            logits = model(x).float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    loss_sum, correct, count = proc.all_sum([loss_sum, correct, count])
    return {"val_loss": loss_sum / count, "val_acc": 100.0 * correct / count}


def write_outputs(state: TrainState, cfg: TrainConfig, ckpt: dict[str, Any], world: int) -> None:
    """Per-epoch files, each written atomically; the checkpoint first, so metrics never list an epoch it lacks."""
    out = Path(cfg.out)
    torch_save(ckpt, out / CHECKPOINT)
    write_csv(pd.DataFrame(state.history), out / "metrics.csv")
    write_json(out / "metrics.json", {"config": dataclasses.asdict(cfg), "world_size": world,
                                      "history": state.history, "final": final_metrics(state.history)})


def final_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    if not history:
        return {}
    best_key = "val_acc_ema" if "val_acc_ema" in history[-1] else "val_acc"
    return {**history[-1], "best_val_acc": max(row[best_key] for row in history)}


def train(model: nn.Module, cfg: TrainConfig | Mapping[str, Any], data: Datasets | None = None,
          teacher: nn.Module | None = None) -> dict[str, Any]:
    """Train `model` in place with `cfg`; returns the final epoch's metrics (plus best_val_acc).

    `data` defaults to the datasets `cfg` names. Works alone or inside a torchrun/DDP process group (joined
    beforehand, see `init_distributed`); only rank 0 writes files. With `cfg.out` set, every epoch is
    checkpointed and `cfg.resume` continues a run, and the final model.pth carries the structure of `cfg.weights`
    (the file `model` was loaded from) when that is a structured checkpoint (a pruned model), so it rebuilds too.
    `teacher`: a module to distill from instead of cfg.teacher (see distillation_loss). Seeds the global RNGs (and
    sets torch's threads if asked).
    """
    cfg = resolve_img_size(as_config(cfg))
    structure = structure_record(read_checkpoint(cfg.weights)) if cfg.weights else {}
    data = data or load_data(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    proc = current_process()
    seed_everything(cfg.seed + proc.rank)
    loader_gen = torch.Generator().manual_seed(cfg.seed + proc.rank)
    train_loader, val_loader = make_loaders(data, cfg, proc, loader_gen)

    model.to(proc.device)
    net = DistributedDataParallel(model) if proc.world > 1 else model
    lr = cfg.lr or cfg.lr_base * cfg.batch_size * proc.world / 512
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps)
    # Stepped per update (not per epoch) so short runs get a smooth warm-up and decay.
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=cfg.epochs, min_lr=cfg.min_lr,
                                       warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=len(train_loader))
    autocast, scaler = autocast_for(cfg, proc.device)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    state = TrainState(model, optimizer, scheduler, scaler, ema, loader_gen)
    path = resume_path(cfg)
    if path is not None:
        restore(state, path, proc)

    mixup = None
    if cfg.mixup or cfg.cutmix:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                      num_classes=data.num_classes)
    loss_fn = SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(cfg.smoothing)
    loss_fn = distillation_loss(loss_fn, cfg, model, data, proc.device, teacher)

    while state.epoch < cfg.epochs:
        start = time.perf_counter()
        train_loader.sampler.set_epoch(state.epoch)
        train_loss = train_one_epoch(state, net, train_loader, loss_fn, mixup, cfg, proc, autocast)
        row = {"epoch": state.epoch + 1, "train_loss": train_loss, **evaluate(model, val_loader, proc, autocast)}
        if ema:
            row["val_acc_ema"] = evaluate(ema.module, val_loader, proc, autocast)["val_acc"]
        row.update(lr=optimizer.param_groups[0]["lr"], epoch_time_s=time.perf_counter() - start)
        state.epoch += 1
        state.history.append(row)
        ckpt = state.state_dict(proc) if cfg.out else None  # collective when distributed: every rank calls it
        if proc.is_main:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
            if cfg.out:
                write_outputs(state, cfg, ckpt, proc.world)

    final = final_metrics(state.history)
    if cfg.out and proc.is_main:
        torch_save({**structure, "model": cfg.model, "model_kwargs": cfg.model_kwargs, "img_size": cfg.img_size,
                    "num_classes": data.num_classes, "state_dict": state.eval_model().state_dict(), "metrics": final,
                    "config": dataclasses.asdict(cfg)}, Path(cfg.out) / FINAL)
    return final


# ------------------------------------------------------------------------------------------------------ CLI


def fit(cfg: TrainConfig | Mapping[str, Any],
        load_teacher: Optional[Callable[[int], nn.Module]] = None) -> dict[str, Any]:
    """Load the data and build the model `cfg` names (with `cfg.weights` if given: then its input size is the
    model's own unless `cfg.img_size` says otherwise), then train it; returns the final metrics. A run with a
    teacher gets it from `load_teacher(number of classes)`, which the caller passes in (`evit.zoo.teacher_loader`
    resolves cfg.teacher by name or file)."""
    cfg = as_config(cfg)
    if cfg.weights is None:
        cfg = resolve_img_size(cfg)
        data = load_data(cfg)
        seed_everything(cfg.seed)  # the same initial weights on every rank and every resume
        model = create_model(cfg.model, cfg.img_size, num_classes=data.num_classes, **cfg.model_kwargs)
    else:
        model = load_file(cfg.model, cfg.weights, **cfg.model_kwargs)
        cfg = dataclasses.replace(cfg, img_size=cfg.img_size or model_img_size(model))
        data = load_data(cfg)
        check_fits(model, f"the model of {cfg.weights}", data)
    return train(model, cfg, data, load_teacher(data.num_classes) if load_teacher else None)
