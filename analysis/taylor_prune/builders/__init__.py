"""Group builders, one module per family, found through two registries:

- block builders, keyed by a block's type (or a predicate on the module): `builder(name, block)` returns the
  block's Q/K, V and FFN-hidden groups (and may rewrite the block in place, e.g. split a fused qkv);
- model builders, keyed by the model's type: `builder(model)` returns its residual-stream width groups;
- converters, keyed by the model's type: `converter(model)` returns the same network in a form the builders know
  (timm's `efficientvit_m*` as an evit EfficientViT); `prunable(model)` applies them;
- attention geometries, keyed by an attention module's type: `geometry(module, args)` gives its last forward's
  (query rows over the whole input, keys per query, Q/K + V channels over all heads), which the MAC counter and the
  MACs per channel need. Builders that put an `attention.PrunedAttention` in place need none: it records its own.

Adding a family is adding a module that registers its builders, and importing it below. A model some block or
attention of which no builder knows is read by `discovery` instead: its groups found from the model itself.
"""
from __future__ import annotations

import re
from typing import Callable, Union

import torch.nn as nn

from analysis.taylor_prune.attention import PrunedAttention
from analysis.taylor_prune.groups import Group
from evit.models import UnsupportedModelError

Match = Union[type, tuple[type, ...], Callable[[nn.Module], bool]]
BLOCK_BUILDERS: list[tuple[Match, Callable[[str, nn.Module], list[Group]]]] = []
MODEL_BUILDERS: list[tuple[Match, Callable[[nn.Module], list[Group]]]] = []
CONVERTERS: list[tuple[Match, Callable[[nn.Module], nn.Module]]] = []
Geometry = Callable[[nn.Module, tuple], tuple[float, float, int]]
GEOMETRIES: list[tuple[type, Geometry]] = [
    (PrunedAttention, lambda module, args: (*module.geometry, module.matmul_channels()))]
PRUNABLE_FAMILIES: list[str] = []  # what the refusal names as supported, in registration order


def _matches(match: Match, module: nn.Module) -> bool:
    return isinstance(module, match) if isinstance(match, (type, tuple)) else bool(match(module))


def register_block(match: Match, family: str = ""):
    """Register a block builder of `family` (named in the refusal of unknown models); the first registered builder
    whose key matches a module builds its groups."""
    def register(builder):
        BLOCK_BUILDERS.append((match, builder))
        if family and family not in PRUNABLE_FAMILIES:
            PRUNABLE_FAMILIES.append(family)
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


def register_attention(kind: type):
    """Register the geometry of an attention module type (see the module docstring)."""
    def register(geometry: Geometry):
        GEOMETRIES.insert(0, (kind, geometry))
        return geometry
    return register


def attention_geometry(module: nn.Module) -> Geometry | None:
    return next((g for kind, g in GEOMETRIES if isinstance(module, kind)), None)


def prunable(model: nn.Module) -> nn.Module:
    """`model` itself, or the same network converted to a form the builders know."""
    return next((convert(model) for match, convert in CONVERTERS if _matches(match, model)), model)


def _looks_like_attention(module: nn.Module) -> bool:
    """A transformer block or an attention module, by timm's naming: what a model no builder knows is refused for."""
    return (hasattr(module, "attn") and hasattr(module, "mlp")) or bool(
        re.search(r"Attention|Attn|MHSA|MLA", type(module).__name__))


def _blocks(model: nn.Module) -> tuple[list[str], bool]:
    """The blocks a builder takes (outermost first) and whether some block or attention is one none knows."""
    taken: list[str] = []
    unknown = False
    for name, module in model.named_modules():
        if any(name.startswith(b + ".") for b in taken):
            continue
        if any(_matches(match, module) for match, _ in BLOCK_BUILDERS):
            taken.append(name)
        elif _looks_like_attention(module):
            unknown = True
    return taken, unknown


def _build(model: nn.Module, names: list[str]) -> tuple[list[Group], UnsupportedModelError | None]:
    """The builders' groups of blocks `names`, and the first refusal of a builder (that block is left to
    discovery)."""
    groups: list[Group] = []
    refusal = None
    for name in names:
        block = model.get_submodule(name)
        try:
            groups += next(b for match, b in BLOCK_BUILDERS if _matches(match, block))(name, block)
        except UnsupportedModelError as e:
            refusal = refusal or e
    return groups, refusal


def prepare(model: nn.Module, builders: bool = True) -> list[Group]:
    """The model's groups: every block's (blocks rewritten in place where needed), then the residual-stream widths.
    From the hand-written builders where they know every block and attention of the model; where they know only
    some (or refuse a variant of a block they match), theirs for the blocks they take and the rest discovered from
    the model itself (`discovery.discover`, which also finds the widths); with builders=False all discovered.
    UnsupportedModelError naming the first module neither can split and why (a builder's refusal, where there is
    one, else discovery's), or when the model runs no softmax attention."""
    taken, unknown = _blocks(model) if builders else ([], True)
    groups, refusal = _build(model, taken)
    if not unknown and refusal is None:
        groups += [g for match, builder in MODEL_BUILDERS if _matches(match, model) for g in builder(model)]
    if unknown or refusal is not None or not groups:
        try:
            groups = discovery.discover(model, known=groups)
        except discovery.NoAttention:
            raise UnsupportedModelError(f"{type(model).__name__} has no prunable blocks; supported: "
                                        f"{', '.join(PRUNABLE_FAMILIES)} and, discovered from the model, any softmax "
                                        f"attention; see the README's support table") from None
        except UnsupportedModelError:
            if refusal is not None:
                raise refusal from None
            raise
    for group in groups:
        group.original, group.in_dim_before = group.channels, group.width()
    return groups


# The families (each matches its own block and attention types).
# They register themselves on import.
from analysis.taylor_prune.builders import (beit, cait, discovery, eva, evit, levit, pvt, swin,  # noqa: E402,F401
                                            swinv2, twins, vit)
