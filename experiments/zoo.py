"""Trained models for the analyses: Fashion-MNIST proxies trained on first use and cached, or hub weights.

    model = load_model("deit_proxy")                      # trains once (minutes on one core), then loads the cache
    model = load_model("deit_proxy", weights="quick-proxy")   # a seconds-long budget (reproduce --scale quick)
    model = load_model("evit_m0", weights="pretrained")   # timm hub weights, if reachable
    model = load_model("swin_proxy", weights="random")    # the same architecture, initial weights
    model = load_model("deit_proxy", weights="runs/x/model.pth")

    python -m experiments.zoo list
    python -m experiments.zoo train deit_proxy swin_proxy
    python -m experiments.zoo train evit_m0_proxy --budget quick-proxy

A proxy's cache folder is keyed by a hash of its architecture, parameter shapes and training recipe, so a
changed recipe or model retrains instead of loading stale weights. The folder holds the training run itself
(`last.pth`, `metrics.csv`): an interrupted first use resumes where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Sequence
from unittest import mock
from urllib.parse import urlparse

import torch
import torch.nn as nn

from evit.convert import unwrap
from evit.io import CheckpointError, read_checkpoint
from experiments import launch
from experiments.cli import UserError, run_cli
from experiments.models import PROXY_MODELS, PROXY_NUM_CLASSES, create_model
from experiments.paths import PROJECT_ROOT
from experiments.train import FINAL, TrainConfig, fit, load_weights

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
    blob = json.dumps([PROXY_MODELS[cfg.model], shapes, launch.recipe(cfg)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


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
    from huggingface_hub import constants

    # Without a network huggingface_hub retries for ~45 s; in offline mode it reads its cache or fails at once.
    with mock.patch.object(constants, "HF_HUB_OFFLINE", not hub_reachable()):
        try:
            return create_model(name, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as e:
            raise WeightsUnavailableError(
                f"pretrained weights for '{name}' are unreachable (no connection to the Hugging Face hub and not in "
                f"its local cache: {type(e).__name__}); download them where there is internet and pass the file, "
                f"load_model('{name}', weights='/path/to/weights.pth')") from e


def weights_from_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict, model kwargs) from model.pth (ours), a training checkpoint, or a bare state dict."""
    if not Path(path).is_file():
        raise CheckpointError(f"weights must be one of {', '.join(KEYWORDS)} or a checkpoint file; {path} not found")
    ckpt = read_checkpoint(path)
    if "num_classes" in ckpt:  # our model.pth records how the model was built
        return ckpt["state_dict"], {"num_classes": ckpt["num_classes"], "img_size": ckpt["img_size"],
                                    **ckpt["model_kwargs"]}
    return unwrap(ckpt), {}  # our last.pth keeps the weights under 'model', timm's train.py under 'state_dict'


def load_model(name: str, weights: str = "proxy", num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """A model in eval mode with `weights`: 'proxy' (trained on Fashion-MNIST, cached), 'quick-proxy' (the same on
    a small budget), 'pretrained' (timm hub), 'random' (initial weights) or a checkpoint path. kwargs go to the
    model factory."""
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights == "random":
        return create_model(name, **kwargs).eval()
    if weights == "pretrained":
        if name in PROXY_MODELS:
            raise WeightsUnavailableError(f"'{name}' is a Fashion-MNIST proxy with no hub weights: use "
                                          f"weights='proxy' (trains and caches it) or a checkpoint path")
        return pretrained_model(name, **kwargs).eval()
    if weights in PROXY_BUDGETS:
        if kwargs.get("num_classes", PROXY_NUM_CLASSES) != PROXY_NUM_CLASSES:
            raise WeightsUnavailableError(f"proxies are trained on Fashion-MNIST's {PROXY_NUM_CLASSES} classes, "
                                          f"not {kwargs['num_classes']}")
        path = train_proxy(name, budget=weights)
    else:
        path = weights
    state_dict, file_kwargs = weights_from_file(path)
    model = create_model(name, **{**file_kwargs, **kwargs})
    load_weights(model, state_dict, path)
    return model.eval()


def resolve_model(name: str, weights: str = "auto", random_fallback: bool = False,
                  seed: int = 0) -> tuple[nn.Module, str]:
    """(model in eval mode, the weights it got): how the analyses get a model by name. 'auto' is a proxy's trained
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
        return resolve_model(name, "random", seed=seed)


# ------------------------------------------------------------------------------------------------------ CLI


def list_proxies() -> None:
    for name, recipe in PROXY_RECIPES.items():
        timm_name, kwargs = PROXY_MODELS[name]
        print(f"{name:15s} {timm_name}{kwargs}  recipe {recipe}")
        for budget, overrides in PROXY_BUDGETS.items():
            path = proxy_dir(name, budget) / FINAL
            status = "not trained"
            if path.is_file():
                metrics = read_checkpoint(path).get("metrics", {})
                status = f"val_acc {metrics.get('val_acc', float('nan')):.2f}%  {path}"
            print(f"    {budget:12s} {overrides or ''}  [{status}]")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.zoo", description=__doc__.split("\n\n")[0])
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
