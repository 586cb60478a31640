"""MACs per image: Linear and Conv layers at their output sizes plus the two attention matmuls at their current
widths, and the token counts each group's MACs per channel need."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Sequence

import torch
import torch.nn as nn

from analysis.taylor_prune.builders.vit import SplitAttention
from analysis.taylor_prune.groups import Group
from evit.efficientvit import RelativeBiasAttention


def _forward_with_hooks(model: nn.Module, example: torch.Tensor, hooks: dict[nn.Module, Callable]) -> None:
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()


ATTENTION_MODULES = (SplitAttention, RelativeBiasAttention)  # where q @ k^T and attn @ v run


def _queries_keys(module: nn.Module, x: torch.Tensor, batch: int) -> tuple[float, float]:
    """(queries per image, keys per query) of an attention module's input: timm (B or windows, N, C), evit
    (B or windows, C, ws, ws)."""
    if isinstance(module, SplitAttention):
        return x.shape[0] * x.shape[1] / batch, float(x.shape[1])
    return x.shape[0] * x.shape[2] * x.shape[3] / batch, float(x.shape[2] * x.shape[3])


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
            else:
                queries, keys = _queries_keys(module, args[0], batch)
                per_head = ((module.q.out_features + module.v.out_features) / module.num_heads
                            if isinstance(module, SplitAttention) else module.key_dim + module.val_dim)
                macs[name] += queries * keys * module.num_heads * per_head
        return count

    _forward_with_hooks(model, example, {m: hook(n) for n, m in model.named_modules()
                                         if isinstance(m, (nn.Linear, nn.Conv2d) + ATTENTION_MODULES)})
    return dict(macs)


def measure_positions(model: nn.Module, groups: Sequence[Group], example: torch.Tensor) -> None:
    """Output positions per image of every layer of every group, and queries and keys at every attention, from
    one forward (they do not change with pruning)."""
    positions: dict[nn.Module, float] = defaultdict(float)
    attention: dict[nn.Module, tuple[float, float]] = {}
    batch = example.shape[0]

    def layer(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        positions[module] += _positions(module, out, batch)  # += : a layer may run more than once

    def attend(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        attention[module] = _queries_keys(module, args[0], batch)

    layers = {s.layer for g in groups for s in g.layout() if isinstance(s.layer, (nn.Linear, nn.Conv2d))}
    _forward_with_hooks(model, example, {**{m: layer for m in layers},
                                         **{g.attention: attend for g in groups if g.attention is not None}})
    for group in groups:
        group.positions = {s.layer: positions[s.layer] for s in group.layout() if s.layer in positions}
        if group.attention is not None:
            group.tokens, group.keys = attention[group.attention]
