"""Group builders, one module per family, found through two registries:

- block builders, keyed by a block's type (or a predicate on the module): `builder(name, block)` returns the
  block's Q/K, V and FFN-hidden groups (and may rewrite the block in place, e.g. split a fused qkv);
- model builders, keyed by the model's type: `builder(model)` returns its residual-stream width groups;
- converters, keyed by the model's type: `converter(model)` returns the same network in a form the builders know
  (timm's `efficientvit_m*` as an evit EfficientViT); `prunable(model)` applies them.

Adding a family is adding a module that registers its builders, and importing it below.
"""
from __future__ import annotations

from typing import Callable, Union

import torch.nn as nn

from analysis.taylor_prune.groups import Group
from experiments.models import UnsupportedModelError

Match = Union[type, tuple[type, ...], Callable[[nn.Module], bool]]
BLOCK_BUILDERS: list[tuple[Match, Callable[[str, nn.Module], list[Group]]]] = []
MODEL_BUILDERS: list[tuple[Match, Callable[[nn.Module], list[Group]]]] = []
CONVERTERS: list[tuple[Match, Callable[[nn.Module], nn.Module]]] = []


def _matches(match: Match, module: nn.Module) -> bool:
    return isinstance(module, match) if isinstance(match, (type, tuple)) else bool(match(module))


def register_block(match: Match):
    """Register a block builder; the first registered builder whose key matches a module builds its groups."""
    def register(builder):
        BLOCK_BUILDERS.append((match, builder))
        return builder
    return register


def register_model(match: Match):
    """Register a model builder (width groups); every one whose key matches the model contributes."""
    def register(builder):
        MODEL_BUILDERS.append((match, builder))
        return builder
    return register


def register_converter(match: Match):
    """Register a converter: a model of this kind is pruned as the network the converter returns."""
    def register(converter):
        CONVERTERS.append((match, converter))
        return converter
    return register


def prunable(model: nn.Module) -> nn.Module:
    """`model` itself, or the same network converted to a form the builders know."""
    return next((convert(model) for match, convert in CONVERTERS if _matches(match, model)), model)


def prepare(model: nn.Module) -> list[Group]:
    """The model's groups: every block's (blocks rewritten in place where a builder needs it), then the
    residual-stream widths. UnsupportedModelError when no builder knows any of its blocks."""
    groups: list[Group] = []
    for name, module in model.named_modules():
        builder = next((b for match, b in BLOCK_BUILDERS if _matches(match, module)), None)
        if builder is not None:
            groups += builder(name, module)
    groups += [g for match, builder in MODEL_BUILDERS if _matches(match, model) for g in builder(model)]
    if not groups:
        raise UnsupportedModelError(f"{type(model).__name__} has no prunable blocks; supported: timm "
                                    f"VisionTransformer (deit_*, vit_*, deit_proxy), SwinTransformer (swin_*, "
                                    f"swin_proxy), evit models with BatchNorm (evit_m*, proxies, configs) and "
                                    f"timm's efficientvit_m* (converted to evit); see the README's support table")
    for group in groups:
        group.original, group.in_dim_before = group.channels, group.width()
    return groups


# The families. evit first: its blocks must not fall to the generic timm block builder.
from analysis.taylor_prune.builders import evit, vit, swin  # noqa: E402,F401  (they register themselves)
