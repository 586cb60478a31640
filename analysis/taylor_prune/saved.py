"""Pruned models kept: written by `--save-model PATH`, read back by every `--weights PATH` without re-pruning.

A pruned model's layers have the pruning's widths, which its name alone does not build. The file is a structured
checkpoint of the zoo (evit/zoo.py: `format`, `rebuilder`, `architecture`, `structure`, `state_dict`):

- `architecture`: the model's name (a proxy's, timm's full name, or 'evit_custom' with the evit config's content)
  and the kwargs it was created with;
- `structure`: `groups`, every pruning group's channel count in `prepare`'s order (deterministic: the modules'
  order), with its kind and block to check the order against; `summary`, the pruning's summary (MACs, accuracy);
- `state_dict`: the pruned model's weights (its split attentions' q, k, v included).

Rebuilding creates the architecture, converts and prepares it as the pruning did (`prunable`, `prepare`), cuts
each group to its count (the last channels of each head: the weights then come from the file, so which channels
go does not matter, only how many), and loads the state dict strictly. The zoo imports this module when it first
reads a file of FORMAT.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch.nn as nn

from analysis.taylor_prune.builders import prepare, prunable
from analysis.taylor_prune.groups import Group, prune_channels
from evit.builder.io import CheckpointError, torch_save
from evit.weights import architecture, load_weights, recorded_model, register_structure
from evit.zoo import weights_kwargs

FORMAT = "taylor_prune.channels/1"


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """A summary as JSON types only (numpy scalars become numbers), which a weights-only load reads back."""
    return json.loads(json.dumps(values, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def save_pruned(model: nn.Module, path: str | os.PathLike, name: str, weights: str,
                summary: Optional[dict[str, Any]] = None) -> Path:
    """Write pruned `model` (the PruneResult's model) to `path` atomically, as the model `name` loaded with
    `weights` (the keyword or file the unpruned model came from: its creation kwargs are recorded) and pruned."""
    model_name, config = architecture(name)
    groups = prepare(model)  # a second pass over a prepared model rewrites nothing: the same groups, pruned counts
    return torch_save({
        "format": FORMAT, "rebuilder": __name__,
        "architecture": {"model": model_name, "config": config, "kwargs": weights_kwargs(name, weights)},
        "structure": {"groups": [{"kind": g.kind, "block": g.block, "channels": g.channels} for g in groups],
                      "summary": _plain(summary or {})},
        "state_dict": model.state_dict(),
    }, path)


def _cut_to(group: Group, channels: int) -> None:
    """Remove the last channels of each head until the group holds `channels`."""
    per_head, keep = group.channels // group.heads, channels // group.heads
    prune_channels(group, [h * per_head + c for h in range(group.heads) for c in range(keep, per_head)])


@register_structure(FORMAT)
def rebuild(checkpoint: dict[str, Any], path: str, kwargs: dict[str, Any]) -> nn.Module:
    """The pruned model a FORMAT file holds (see the module docstring); `kwargs` override the recorded creation
    kwargs. One-line CheckpointError when the file's groups do not fit the architecture."""
    model = prunable(recorded_model(checkpoint, **kwargs)).eval()
    groups, saved = prepare(model), checkpoint["structure"]["groups"]
    found = [(g.kind, g.block) for g in groups]
    if found != [(s["kind"], s["block"]) for s in saved]:
        raise CheckpointError(f"{path}: its {len(saved)} pruning groups are not those of "
                              f"{checkpoint['architecture']['model']} ({len(found)} groups)")
    # A group tied to another (an evit CGA stage's V follows its width) is not prunable itself: it reaches its
    # count when the group it follows is cut.
    for group, entry in zip(groups, saved):
        if group.prunable and group.channels > entry["channels"]:
            _cut_to(group, entry["channels"])
    wrong = [f"{g.block} {g.kind}: {g.channels} vs {s['channels']}" for g, s in zip(groups, saved)
             if g.channels != s["channels"]]
    if wrong:
        raise CheckpointError(f"{path}: {len(wrong)} pruning groups cannot be cut to their saved widths "
                              f"(e.g. {wrong[0]})")
    load_weights(model, checkpoint["state_dict"], path)
    return model
