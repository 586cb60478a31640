"""Trained models for the analyses: Fashion-MNIST proxies trained on first use and cached, or hub weights.

    model = load_model("deit_proxy")                      # trains once (minutes on one core), then loads the cache
    model = load_model("deit_proxy", weights="quick-proxy")   # a seconds-long budget (reproduce --scale quick)
    model = load_model("evit_m0", weights="pretrained")   # timm hub weights, if reachable
    model = load_model("swin_proxy", weights="random")    # the same architecture, initial weights
    model = load_model("deit_proxy", weights="runs/x/model.pth")
    model = load_model("deit_proxy", weights="pruned.pth")    # a structured checkpoint: rebuilt, then loaded

    python -m experiments.zoo list
    python -m experiments.zoo train deit_proxy swin_proxy
    python -m experiments.zoo train evit_m0_proxy --budget quick-proxy

A proxy's cache folder is keyed by a hash of its architecture, parameter shapes and training recipe, so a
changed recipe or model retrains instead of loading stale weights. The folder holds the training run itself
(`last.pth`, `metrics.csv`): an interrupted first use resumes where it stopped.

A structured checkpoint holds a model whose layers' shapes its name alone does not build (a pruned model). It is a
dict with STRUCTURE_KEYS beside its state_dict: `format`, `rebuilder` (the module that rebuilds that format),
`architecture` ({model, config, kwargs}: the name, or 'evit_custom' and an evit config's content, and the creation
kwargs) and `structure` (what the rebuilder needs). The zoo sits below the analyses and imports none of them: the
rebuilder module registers `rebuild(checkpoint, path, kwargs)` for its format with `register_structure`, and the
zoo imports it by the name the file records the first time it reads that format (modules of this project only).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence
from urllib.parse import urlparse

import torch
import torch.nn as nn

import evit
from evit.convert import unwrap
from evit.io import CheckpointError, read_checkpoint
from experiments import launch
from experiments.cache_keys import key_of
from experiments.cli import UserError, run_cli
from experiments.models import PROXY_MODELS, PROXY_NUM_CLASSES, create_model, is_config_file, read_config, \
    resolve_model_name
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
    return key_of([PROXY_MODELS[cfg.model], shapes, launch.recipe(cfg)])


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


# --- structured checkpoints (see the module docstring) ------------------------------------------------------------

STRUCTURE_KEYS = ("format", "rebuilder", "architecture", "structure")
REBUILDER_PACKAGES = ("analysis", "experiments", "evit")  # a file may name a rebuilder of this project only
Rebuild = Callable[[dict[str, Any], str, dict[str, Any]], nn.Module]
STRUCTURES: dict[str, Rebuild] = {}


def register_structure(fmt: str) -> Callable[[Rebuild], Rebuild]:
    """Register `rebuild(checkpoint, path, kwargs)` for structured checkpoints of format `fmt`: the model the file
    holds (its architecture created with its recorded kwargs, `kwargs` overriding them, then its structure applied
    and its state dict loaded strictly), or a one-line CheckpointError."""
    def register(rebuild: Rebuild) -> Rebuild:
        STRUCTURES[fmt] = rebuild
        return rebuild
    return register


def structure_record(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A structured checkpoint's STRUCTURE_KEYS (what a training that starts from it writes into its model.pth, so
    that the trained model rebuilds too); {} for a plain checkpoint."""
    return {k: checkpoint[k] for k in STRUCTURE_KEYS if k in checkpoint} if "format" in checkpoint else {}


def _rebuilder(checkpoint: dict[str, Any], path: str) -> Rebuild:
    fmt, module = checkpoint["format"], checkpoint.get("rebuilder")
    missing = [k for k in STRUCTURE_KEYS + ("state_dict",) if k not in checkpoint]
    if missing or not isinstance(module, str):
        raise CheckpointError(f"{path} is an incomplete structured checkpoint (format {fmt!r}; missing "
                              f"{', '.join(missing) or 'the rebuilder module'})")
    if fmt not in STRUCTURES:
        if module.split(".")[0] not in REBUILDER_PACKAGES:
            raise CheckpointError(f"{path} names rebuilder module {module!r}, not a module of this project "
                                  f"({', '.join(REBUILDER_PACKAGES)})")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise CheckpointError(f"{path}: its rebuilder module {module!r} cannot be imported ({e})") from e
    if fmt not in STRUCTURES:
        raise CheckpointError(f"{path} has format {fmt!r}, which its rebuilder module {module!r} does not register; "
                              f"known formats: {', '.join(STRUCTURES) or 'none'}")
    return STRUCTURES[fmt]


def architecture(name: str) -> tuple[str, Optional[dict[str, Any]]]:
    """(model, evit config) that `name` builds, the same for every spelling of it: a proxy's name or timm's full
    name with None, or 'evit_custom' with an evit config file's content."""
    if is_config_file(name):
        return "evit_custom", read_config(name).to_dict()
    return (name, None) if name in PROXY_MODELS else (resolve_model_name(name), None)


def _unnamed(config: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """An evit config's content less its name (a label, not part of the architecture)."""
    return None if config is None else {k: v for k, v in config.items() if k != "name"}


def structured_rebuilder(name: str, checkpoint: dict[str, Any], path: str) -> Rebuild:
    """The rebuilder of structured `checkpoint` (its module imported on first use), or a one-line CheckpointError
    when there is none or the file holds another architecture than `name` builds."""
    rebuild = _rebuilder(checkpoint, path)
    recorded = checkpoint["architecture"]
    model, config = architecture(name)
    if (model, _unnamed(config)) != (recorded.get("model"), _unnamed(recorded.get("config"))):
        held = (recorded.get("model") if recorded.get("config") is None else
                f"an evit config ({recorded['config'].get('name')}, embed_dims {recorded['config'].get('embed_dims')})")
        raise CheckpointError(f"{path} holds {held}, not {name}: pass the model it holds, or other weights")
    return rebuild


def recorded_model(checkpoint: dict[str, Any], **kwargs: Any) -> nn.Module:
    """The architecture a structured checkpoint records, created with its recorded kwargs (`kwargs` override
    them), random weights, before its structure is applied: a pruned model's unpruned form."""
    recorded = checkpoint["architecture"]
    kwargs = {**recorded["kwargs"], **kwargs}
    if recorded.get("config") is not None:
        return create_model("evit_custom", config=evit.EfficientViTConfig.from_dict(recorded["config"]), **kwargs)
    return create_model(recorded["model"], **kwargs)


def read_weights(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint a weights file holds (read_checkpoint), with the weights' own message for a missing file."""
    if not Path(path).is_file():
        raise CheckpointError(f"weights must be one of {', '.join(KEYWORDS)} or a checkpoint file; {path} not found")
    return read_checkpoint(path)


def checkpoint_kwargs(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The model kwargs a checkpoint records: a structured one's creation kwargs, our model.pth's num_classes,
    img_size and model_kwargs; none for a training checkpoint or a bare state dict."""
    if "format" in checkpoint:
        return dict(checkpoint["architecture"]["kwargs"])
    if "num_classes" in checkpoint:  # our model.pth records how the model was built
        return {"num_classes": checkpoint["num_classes"], "img_size": checkpoint["img_size"],
                **checkpoint["model_kwargs"]}
    return {}


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


def check_weights(name: str, weights: str) -> None:
    """Fail at once, building nothing, on a weights file that is missing, unreadable, or structured and holding
    another architecture than `name` (a plain file is checked against the model when it is loaded)."""
    if weights in KEYWORDS:
        return
    checkpoint = read_weights(weights)
    if "format" in checkpoint:
        structured_rebuilder(name, checkpoint, weights)


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
    checkpoint = read_weights(path)
    if "format" in checkpoint:
        return structured_rebuilder(name, checkpoint, path)(checkpoint, path, kwargs).eval()
    # our model.pth: under 'state_dict', beside how it was built; our last.pth under 'model', timm's under 'state_dict'
    state_dict = checkpoint["state_dict"] if "num_classes" in checkpoint else unwrap(checkpoint)
    model = create_model(name, **{**checkpoint_kwargs(checkpoint), **kwargs})
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
