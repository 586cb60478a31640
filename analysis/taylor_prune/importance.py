"""Importance as a callable: `TaylorImportance(normalizer, reduction)(group)` scores a group's channels from the
gradients `accumulate_gradients` left on the weights. Any callable Group -> (channels,) tensor can be passed to
`taylor_prune` instead."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from analysis.taylor_prune.groups import Group, Slice

NORMALIZERS = ("mean", "max", "sum", "none")   # torch-pruning's normalizer names ('none' is its None)
REDUCTIONS = ("sum", "mean", "max")            # torch-pruning's group_reduction names
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


# Images per backward pass at 224 px: the activations autograd keeps are what bounds memory (a 64-image batch of
# deit_tiny peaked at 4.6 GB); smaller inputs take proportionally more images per pass.
GRADIENT_PIXELS = 16 * 224 * 224


def accumulate_gradients(model: nn.Module, batches: Batches) -> None:
    """dL/dw of the mean loss of each batch, summed over batches. A batch larger than GRADIENT_PIXELS allows goes
    through in chunks whose losses are weighted by their share of the batch: the same gradient, up to the order
    of float sums, in bounded memory."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for images, labels in batches:
            chunk = max(1, GRADIENT_PIXELS // (images.shape[-2] * images.shape[-1]))
            for x, y in zip(images.split(chunk), labels.split(chunk)):
                (F.cross_entropy(model(x), y) * (len(y) / len(labels))).backward()


def _taylor(s: Slice) -> list[torch.Tensor]:
    """|w * dL/dw| of a slice's channels, summed over each channel's weights; for output rows the bias's
    |b * dL/db| is a separate entry, as in torch-pruning's GroupTaylorImportance(bias=True)."""
    def score(p: torch.Tensor) -> torch.Tensor:
        return (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)  # unused: no gradient

    if s.axis == "last":
        param = getattr(s.layer, s.param)
        if not param.is_floating_point():
            return []  # an index that follows the channels (EVA's kept rotary pairs): no weight, no importance
        entries = [score(param).reshape(-1, param.shape[-1]).sum(0)]
    else:
        weight = score(s.layer.weight)
        entries = [(weight.transpose(0, 1) if s.axis == "in" else weight).flatten(1).sum(1)
                   if weight.dim() > 1 else weight]
        bias = getattr(s.layer, "bias", None)
        if s.axis == "out" and bias is not None:
            entries.append(score(bias))
    return [e.detach()[s.offset:s.offset + s.count] for e in entries]


class TaylorImportance:
    """Taylor scores of a group's channels in each layer (weight and bias entries) they live in, reduced over
    those entries (a channel absent from a layer, e.g. another head's slice, is not counted there) and normalized
    within the group, so that groups of different sizes compete in one global ranking. `normalizer` and
    `reduction` take torch-pruning's names and formulas (NORMALIZERS, REDUCTIONS)."""

    def __init__(self, normalizer: str = "mean", reduction: str = "sum"):
        if normalizer not in NORMALIZERS or reduction not in REDUCTIONS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS} and reduction one of {REDUCTIONS}")
        self.normalizer, self.reduction = normalizer, reduction

    def __call__(self, group: Group) -> torch.Tensor:
        entries = []
        for s in group.layout():
            for scores in _taylor(s):
                row = torch.full((group.channels,), math.nan)
                row[s.first:s.first + s.count] = scores
                entries.append(row)
        per_entry = torch.stack(entries)
        if self.reduction == "sum":
            importance = per_entry.nansum(0)
        elif self.reduction == "mean":
            importance = per_entry.nanmean(0)
        else:
            importance = per_entry.nan_to_num(-math.inf).amax(0)
        if self.normalizer == "mean":
            importance = importance / importance.mean().clamp_min(1e-30)
        elif self.normalizer == "max":
            importance = importance / importance.max().clamp_min(1e-30)
        elif self.normalizer == "sum":
            importance = importance / importance.sum().clamp_min(1e-30)
        return importance
