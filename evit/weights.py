"""Weights files: reading a checkpoint into the model it holds, and structured checkpoints.

A structured checkpoint holds a model whose layers' shapes its name alone does not build (a pruned model). It is a
dict with STRUCTURE_KEYS beside its state_dict: `format`, `rebuilder` (the module that rebuilds that format),
`architecture` ({model, config, kwargs}: the name, or 'evit_custom' and an evit config's content, and the creation
kwargs) and `structure` (what the rebuilder needs). This module sits below the analyses and imports none of them:
the rebuilder module registers `rebuild(checkpoint, path, kwargs)` for its format with `register_structure`, and
this module imports it by the name the file records the first time it reads that format (modules of this project
only).

Weights named by a keyword (a proxy's training, the hub's, random ones) are the zoo's (`evit.zoo`); this module
reads files only, so that the training loop, which writes and reloads them, stands below the zoo.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Mapping, Optional

import torch.nn as nn

from evit.builder import EfficientViTConfig
from evit.builder.convert import unwrap
from evit.builder.io import CheckpointError, read_checkpoint
from evit.models import PROXY_MODELS, create_model, is_config_file, read_config, resolve_model_name

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
        return create_model("evit_custom", config=EfficientViTConfig.from_dict(recorded["config"]), **kwargs)
    return create_model(recorded["model"], **kwargs)


def checkpoint_kwargs(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The model kwargs a checkpoint records: a structured one's creation kwargs, our model.pth's num_classes,
    img_size and model_kwargs; none for a training checkpoint or a bare state dict."""
    if "format" in checkpoint:
        return dict(checkpoint["architecture"]["kwargs"])
    if "num_classes" in checkpoint:  # our model.pth records how the model was built
        return {"num_classes": checkpoint["num_classes"], "img_size": checkpoint["img_size"],
                **checkpoint["model_kwargs"]}
    return {}


def load_weights(model: nn.Module, state_dict: Mapping[str, Any], source: str | os.PathLike) -> None:
    """load_state_dict (strict) with a one-line CheckpointError saying what does not fit."""
    own = model.state_dict()
    problems = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in (
        ("missing keys", [k for k in own if k not in state_dict]),
        ("unexpected keys", [k for k in state_dict if k not in own]),
        ("shape mismatches", [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                              for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]),
    ) if keys]
    if problems:
        raise CheckpointError(f"weights in {source} do not fit {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(state_dict)


def load_file(name: str, path: str, **kwargs: Any) -> nn.Module:
    """The model `name` with the weights of checkpoint file `path`, in eval mode: a structured checkpoint is
    rebuilt by its format's rebuilder (and must hold the architecture `name` builds); a plain one (our model.pth,
    a training's last.pth, timm's files) is loaded into `name` created with the kwargs it records, `kwargs`
    overriding them."""
    checkpoint = read_checkpoint(path)
    if "format" in checkpoint:
        return structured_rebuilder(name, checkpoint, path)(checkpoint, path, kwargs).eval()
    # our model.pth: under 'state_dict', beside how it was built; our last.pth under 'model', timm's under 'state_dict'
    state_dict = checkpoint["state_dict"] if "num_classes" in checkpoint else unwrap(checkpoint)
    model = create_model(name, **{**checkpoint_kwargs(checkpoint), **kwargs})
    load_weights(model, state_dict, path)
    return model.eval()


def check_file(name: str, path: str) -> None:
    """Fail at once, building nothing, on a weights file that is missing, unreadable, or structured and holding
    another architecture than `name` (a plain file is checked against the model when it is loaded)."""
    checkpoint = read_checkpoint(path)
    if "format" in checkpoint:
        structured_rebuilder(name, checkpoint, path)
