"""MACs per image: Linear and Conv layers at their output sizes plus the two attention matmuls at their current
widths, and the token counts each group's MACs per channel need."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Sequence

import torch
import torch.nn as nn

from analysis.taylor_prune.builders import Geometry, attention_geometry
from analysis.taylor_prune.groups import Group


def _forward_with_hooks(model: nn.Module, example: torch.Tensor, hooks: dict[nn.Module, Callable]) -> None:
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()


def _geometry_hook(geometry: Geometry, batch: int, record: Callable[[float, float, int], None]) -> Callable:
    """A forward hook passing an attention's (queries per image, keys per query, Q/K + V channels) to `record`."""
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        rows, keys, channels = geometry(module, args)
        record(rows / batch, keys, channels)
    return hook


def _positions(layer: nn.Module, out: torch.Tensor, batch: int) -> float:
    """Output positions per image of a Linear (channels last) or Conv2d (channels first)."""
    return out.numel() / out.shape[-1 if isinstance(layer, nn.Linear) else 1] / batch


def count_macs(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """MACs per image by module name: Linear and Conv layers from their output sizes, and for attention modules
    the two attention matmuls (q @ k^T, attn @ v) at their current (pruned) widths."""
    macs: dict[str, float] = defaultdict(float)
    batch = example.shape[0]

    def hook(name: str):
        def count(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if isinstance(module, nn.Linear):
                macs[name] += _positions(module, out, batch) * module.out_features * module.in_features
            elif isinstance(module, nn.Conv2d):
                macs[name] += (_positions(module, out, batch) * module.out_channels
                               * module.in_channels // module.groups * math.prod(module.kernel_size))
        return count

    def attention(name: str, geometry: Geometry) -> Callable:
        def add(queries: float, keys: float, channels: int) -> None:
            macs[name] += queries * keys * channels
        return _geometry_hook(geometry, batch, add)

    hooks = {m: hook(n) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    hooks.update({m: attention(n, g) for n, m in model.named_modules() if (g := attention_geometry(m)) is not None})
    _forward_with_hooks(model, example, hooks)
    return dict(macs)


def measure_positions(model: nn.Module, groups: Sequence[Group], example: torch.Tensor) -> None:
    """Output positions per image of every layer of every group, and queries and keys at every attention, from
    one forward (they do not change with pruning)."""
    positions: dict[nn.Module, float] = defaultdict(float)
    attention: dict[nn.Module, tuple[float, float]] = {}
    batch = example.shape[0]

    def layer(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        positions[module] += _positions(module, out, batch)  # += : a layer may run more than once

    def attend(module: nn.Module) -> Callable:
        def keep(queries: float, keys: float, channels: int) -> None:
            attention[module] = queries, keys
        return _geometry_hook(attention_geometry(module), batch, keep)

    layers = {s.layer for g in groups for s in g.layout() if isinstance(s.layer, (nn.Linear, nn.Conv2d))}
    _forward_with_hooks(model, example, {**{m: layer for m in layers},
                                         **{g.attention: attend(g.attention) for g in groups
                                            if g.attention is not None}})
    for group in groups:
        group.positions = {s.layer: positions[s.layer] for s in group.layout() if s.layer in positions}
        if group.attention is not None:
            group.tokens, group.keys = attention[group.attention]
