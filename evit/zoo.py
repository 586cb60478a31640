"""Trained models for the analyses: Fashion-MNIST proxies trained on first use and cached, or hub weights.

    model = load_model("deit_proxy")                      # trains once (minutes on one core), then loads the cache
    model = load_model("deit_proxy", weights="quick-proxy")   # a seconds-long budget (reproduce --scale quick)
    model = load_model("evit_m0", weights="pretrained")   # timm hub weights, if reachable
    model = load_model("swin_proxy", weights="random")    # the same architecture, initial weights
    model = load_model("deit_proxy", weights="runs/x/model.pth")
    model = load_model("deit_proxy", weights="pruned.pth")    # a structured checkpoint: rebuilt, then loaded

    python -m evit.zoo list
    python -m evit.zoo train deit_proxy swin_proxy
    python -m evit.zoo train evit_m0_proxy --budget quick-proxy

A proxy's cache folder is keyed by a hash of its architecture, parameter shapes and training recipe, so a
changed recipe or model retrains instead of loading stale weights. The folder holds the training run itself
(`last.pth`, `metrics.csv`): an interrupted first use resumes where it stopped.

Weights files, structured checkpoints (pruned models) among them, are read by `evit.weights`; the zoo adds the
keywords (KEYWORDS) and resolves teachers by name for the trainings that distill from one.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence
from urllib.parse import urlparse

import torch
import torch.nn as nn

from evit.builder.io import CheckpointError, read_checkpoint
from evit.builder.cache_keys import key_of
from evit.cli import UserError, run_cli
from evit.distillation import is_teacher_file
from evit.models import PROXY_MODELS, PROXY_NUM_CLASSES, create_model
from evit.paths import PROJECT_ROOT
from evit.train import FINAL, TrainConfig, fit, recipe
from evit.weights import check_file, checkpoint_kwargs, load_file

# Training recipes: short runs on Fashion-MNIST (every other TrainConfig field keeps its default).
_FMNIST = dict(data="fashion_mnist", batch_size=128, lr=1e-3)
PROXY_RECIPES: dict[str, dict[str, Any]] = {
    "deit_proxy": dict(_FMNIST, img_size=28, epochs=5),
    "swin_proxy": dict(_FMNIST, img_size=32, epochs=4),
    **{f"evit_m{i}_proxy": dict(_FMNIST, img_size=64, epochs=5) for i in range(6)},
}
# Training budgets, by weights keyword: 'proxy' is the recipe itself; 'quick-proxy' trains on 5k images for two
# epochs and validates on 2k (about a minute for evit_m0_proxy, against 13) so that `reproduce --scale quick` fits
# in minutes.
PROXY_BUDGETS: dict[str, dict[str, Any]] = {"proxy": {}, "quick-proxy": dict(epochs=2, limit_train=5000,
                                                                              limit_val=2000)}
KEYWORDS = (*PROXY_BUDGETS, "pretrained", "random")


class WeightsUnavailableError(UserError, RuntimeError):
    """Weights that cannot be had here (hub unreachable, unknown proxy); the message says what to pass instead."""


def cache_dir() -> Path:
    """Where trained proxies live: $EVIT_CACHE, else <repo>/.cache/zoo."""
    return Path(os.environ.get("EVIT_CACHE") or PROJECT_ROOT / ".cache" / "zoo")


def proxy_config(name: str, budget: str = "proxy") -> TrainConfig:
    if name not in PROXY_RECIPES:
        raise WeightsUnavailableError(f"'{name}' has no proxy recipe; proxies: {', '.join(PROXY_RECIPES)} (or pass "
                                      f"weights='random', 'pretrained' or a checkpoint path)")
    if budget not in PROXY_BUDGETS:
        raise ValueError(f"unknown proxy budget '{budget}'; valid: {', '.join(PROXY_BUDGETS)}")
    return TrainConfig(model=name, **{**PROXY_RECIPES[name], **PROXY_BUDGETS[budget]})


def proxy_key(cfg: TrainConfig) -> str:
    """Hash of what determines the trained weights: architecture, parameter shapes and recipe (not paths)."""
    shapes = {k: tuple(v.shape) for k, v in create_model(cfg.model).state_dict().items()}
    return key_of([PROXY_MODELS[cfg.model], shapes, recipe(cfg)])


def proxy_dir(name: str, budget: str = "proxy") -> Path:
    return cache_dir() / f"{name}-{proxy_key(proxy_config(name, budget))}"


def train_proxy(name: str, force: bool = False, budget: str = "proxy") -> Path:
    """Train a proxy with its recipe (at `budget`) unless cached; returns its final weights file (`model.pth`)."""
    out = proxy_dir(name, budget)
    if force or not (out / FINAL).is_file():
        cfg = dataclasses.replace(proxy_config(name, budget), out=str(out), resume=None if force else "auto")
        fit(cfg)
    return out / FINAL


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False at once when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def pretrained_model(name: str, **kwargs: Any) -> nn.Module:
    """A timm model with hub weights, from the local HF cache when offline; one-line error when unavailable."""
    # Without a network huggingface_hub retries for ~45 s; in offline mode it reads its cache or fails at once.
    with hub_offline(not hub_reachable()):
        try:
            return create_model(name, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as e:
            raise WeightsUnavailableError(
                f"pretrained weights for '{name}' are unreachable (no connection to the Hugging Face hub and not in "
                f"its local cache: {type(e).__name__}); download them where there is internet and pass the file, "
                f"load_model('{name}', weights='/path/to/weights.pth')") from e


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub's offline switch set for the block and restored after it (the library reads
    constants.HF_HUB_OFFLINE at each download)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def weights_path(name: str, weights: str) -> Optional[str]:
    """The file `load_model(name, weights)` reads: a proxy's trained weights (trained first if not cached), the
    path itself, or None for random and hub weights."""
    if weights in ("random", "pretrained"):
        return None
    return str(train_proxy(name, budget=weights)) if weights in PROXY_BUDGETS else weights


def weights_kwargs(name: str, weights: str) -> dict[str, Any]:
    """The creation kwargs `load_model(name, weights)` builds `name` with (see checkpoint_kwargs)."""
    path = weights_path(name, weights)
    return {} if path is None else checkpoint_kwargs(read_weights(path))


def read_weights(path: str) -> dict[str, Any]:
    """The checkpoint a weights file holds, with the weights' own message for a missing file."""
    check_exists(path)
    return read_checkpoint(path)


def check_exists(path: str) -> None:
    if not Path(path).is_file():
        raise CheckpointError(f"weights must be one of {', '.join(KEYWORDS)} or a checkpoint file; {path} not found")


def check_weights(name: str, weights: str) -> None:
    """Fail at once, building nothing, on a weights file that is missing, unreadable, or structured and holding
    another architecture than `name` (a plain file is checked against the model when it is loaded)."""
    if weights in KEYWORDS:
        return
    check_exists(weights)
    check_file(name, weights)


def load_model(name: str, weights: str = "proxy", num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """A model in eval mode with `weights`: 'proxy' (trained on Fashion-MNIST, cached), 'quick-proxy' (the same on
    a small budget), 'pretrained' (timm hub), 'random' (initial weights) or a checkpoint path (a structured one is
    rebuilt by its format's rebuilder, and must hold the architecture `name` builds). kwargs go to the model
    factory."""
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights == "random":
        return create_model(name, **kwargs).eval()
    if weights == "pretrained":
        if name in PROXY_MODELS:
            raise WeightsUnavailableError(f"'{name}' is a Fashion-MNIST proxy with no hub weights: use "
                                          f"weights='proxy' (trains and caches it) or a checkpoint path")
        return pretrained_model(name, **kwargs).eval()
    if weights in PROXY_BUDGETS and kwargs.get("num_classes", PROXY_NUM_CLASSES) != PROXY_NUM_CLASSES:
        raise WeightsUnavailableError(f"proxies are trained on Fashion-MNIST's {PROXY_NUM_CLASSES} classes, "
                                      f"not {kwargs['num_classes']}")
    path = weights_path(name, weights)
    check_exists(path)
    return load_file(name, path, **kwargs)


def load_for_command(name: str, weights: str = "auto", random_fallback: bool = False,
                     seed: int = 0) -> tuple[nn.Module, str]:
    """(model in eval mode, the weights it got): what a command's --model NAME --weights W mean, through
    `load_model` (the one way from a name to a model with weights). 'auto' is a proxy's trained
    weights for a proxy, else the hub's pretrained ones; when those are unreachable, random initial weights if
    `random_fallback` (said on stderr; head similarity compares with random init anyway), else
    WeightsUnavailableError naming --weights random (pruning random weights says nothing about a trained model).
    Random weights are drawn with `seed`."""
    asked = weights
    if weights == "auto":
        weights = "proxy" if name in PROXY_RECIPES else "pretrained"
    if weights == "random":
        torch.manual_seed(seed)
    try:
        return load_model(name, weights=weights), weights
    except WeightsUnavailableError as e:
        if asked != "auto" or not random_fallback:
            raise WeightsUnavailableError(f"{e} (or --weights random for a smoke run)") from e
        print(f"note: {e}. Using random weights.", file=sys.stderr)
        return load_for_command(name, "random", seed=seed)


def load_teacher(teacher: str, weights: str | None, num_classes: int) -> nn.Module:
    """The teacher `teacher` and `weights` name (see TEACHER_HELP, TEACHER_WEIGHTS_HELP), in eval mode; built for
    `num_classes` when its weights are a file that need not say (as the official code builds its teacher)."""
    if not is_teacher_file(teacher):
        if weights is None or weights in KEYWORDS:
            return load_model(teacher, weights or ("proxy" if teacher in PROXY_RECIPES else "pretrained"))
        return load_model(teacher, weights, num_classes=num_classes)
    name = read_checkpoint(teacher).get("model")
    if not isinstance(name, str):
        raise CheckpointError(f"teacher checkpoint {teacher} does not say which model it holds (not a model.pth "
                              f"written by evit.train): pass --teacher NAME --teacher-weights {teacher}")
    return load_model(name, teacher)


def check_teacher(cfg: TrainConfig) -> None:
    """Fail at once, loading nothing, on teacher weights that are neither a zoo keyword nor a file (the rest of a
    teacher's settings: evit.distillation.check_distillation)."""
    if cfg.teacher_weights not in (None, *KEYWORDS) and not Path(cfg.teacher_weights).is_file():
        raise CheckpointError(f"teacher weights not found: {cfg.teacher_weights} (a checkpoint file or one of "
                              f"{', '.join(KEYWORDS)})")


def teacher_loader(cfg: TrainConfig) -> Optional[Callable[[int], nn.Module]]:
    """What a training that distills passes to evit.train.fit: its teacher for a number of classes (None: no
    teacher)."""
    if cfg.teacher is None:
        return None
    return functools.partial(load_teacher, cfg.teacher, cfg.teacher_weights)


# ------------------------------------------------------------------------------------------------------ CLI


def list_proxies() -> None:
    for name, proxy_recipe in PROXY_RECIPES.items():
        timm_name, kwargs = PROXY_MODELS[name]
        print(f"{name:15s} {timm_name}{kwargs}  recipe {proxy_recipe}")
        for budget, overrides in PROXY_BUDGETS.items():
            path = proxy_dir(name, budget) / FINAL
            status = "not trained"
            if path.is_file():
                metrics = read_checkpoint(path).get("metrics", {})
                status = f"val_acc {metrics.get('val_acc', float('nan')):.2f}%  {path}"
            print(f"    {budget:12s} {overrides or ''}  [{status}]")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evit.zoo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="proxies, their recipes and cached weights")
    p_train = sub.add_parser("train", help="train proxies with their recipes (skips cached ones)")
    p_train.add_argument("names", nargs="+", choices=list(PROXY_RECIPES), metavar="NAME")
    p_train.add_argument("--force", action="store_true", help="retrain from scratch even if cached")
    p_train.add_argument("--budget", default="proxy", choices=list(PROXY_BUDGETS), help="training budget")
    args = parser.parse_args(argv)

    def body() -> None:
        if args.command == "list":
            list_proxies()
        for name in getattr(args, "names", []):
            print(f"{name}: {train_proxy(name, force=args.force, budget=args.budget)}")

    run_cli(body)


if __name__ == "__main__":
    main()
