"""Importance as a callable: `TaylorImportance(normalizer, reduction)(group)` scores a group's channels from the
gradients `accumulate_gradients` left on the weights; `LossChange()(group)` estimates, in loss units, how much
removing each channel raises the loss, from every gradient batch alone. Any callable Group -> (channels,) tensor can
be passed to `taylor_prune` instead; one with an `observe(groups)` method is shown each batch's own gradient."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

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


def accumulate_gradients(model: nn.Module, batches: Batches,
                         after_batch: Optional[Callable[[], None]] = None) -> None:
    """dL/dw of the mean loss of each batch, summed over batches. A batch larger than GRADIENT_PIXELS allows goes
    through in chunks whose losses are weighted by their share of the batch: the same gradient, up to the order
    of float sums, in bounded memory. `after_batch` runs after each batch with that batch's gradient alone on the
    weights (the sum is set at the end)."""
    model.zero_grad(set_to_none=True)
    total: dict[nn.Parameter, torch.Tensor] = {}
    with torch.enable_grad():
        for images, labels in batches:
            chunk = max(1, GRADIENT_PIXELS // (images.shape[-2] * images.shape[-1]))
            for x, y in zip(images.split(chunk), labels.split(chunk)):
                (F.cross_entropy(model(x), y) * (len(y) / len(labels))).backward()
            if after_batch is None:
                continue
            after_batch()
            for p in model.parameters():
                if p.grad is not None:
                    total[p] = total[p] + p.grad if p in total else p.grad
                    p.grad = None
    for p, grad in total.items():
        p.grad = grad


def _per_channel(s: Slice, product: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """`product(w * dL/dw)` of a slice's channels, summed over each channel's weights; for output rows the bias's
    is a separate entry."""
    def score(p: torch.Tensor) -> torch.Tensor:
        return product(p * p.grad) if p.grad is not None else torch.zeros_like(p)  # unused: no gradient

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


def _taylor(s: Slice) -> list[torch.Tensor]:
    """|w * dL/dw| of a slice's channels, as torch-pruning's GroupTaylorImportance(bias=True) has them."""
    return _per_channel(s, torch.abs)


class TaylorImportance:
    """Taylor scores of a group's channels in each layer (weight and bias entries) they live in, reduced over
    those entries (a channel absent from a layer, e.g. another head's slice, is not counted there) and normalized
    within the group, so that groups of different sizes compete in one global ranking. `normalizer` and
    `reduction` take torch-pruning's names and formulas (NORMALIZERS, REDUCTIONS)."""

    name = "taylor"

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


class LossChange:
    """The loss a channel's removal adds, in loss units, so that channels of groups of every kind compare (a
    latency target divides it by an absolute saving): half the mean over gradient batches of (sum of w * dL/dw
    over all the channel's weights in every layer of its group)^2, the second-order Taylor estimate with the
    batches' empirical Fisher for the Hessian (Molchanov et al. 2019, eq. 8, summed over the whole structure: a
    stream channel's score covers every block it feeds). The plain first-order sum is no estimate for a trained
    model, whose mean gradient is near zero; the square of each batch's is. Checked against the loss change of
    really removing channels of each kind: `analysis.taylor_prune.estimate_check`, docs/pruning.md.

    `observe(groups)` is called after each gradient batch (by the pruning loop, through accumulate_gradients'
    `after_batch`) and `reset()` before a new set of gradients."""

    normalizer, reduction = "none", "sum"  # reported with the results, as TaylorImportance's are
    name = "loss_change"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._squares: dict[int, torch.Tensor] = {}
        self._batches = 0

    def observe(self, groups: Sequence[Group]) -> None:
        for group in groups:
            total = structure_sums(group) ** 2
            self._squares[id(group)] = self._squares.get(id(group), 0) + total
        self._batches += 1

    def __call__(self, group: Group) -> torch.Tensor:
        if id(group) not in self._squares:
            raise RuntimeError("LossChange scores gradients it observed batch by batch: run accumulate_gradients "
                               "with after_batch=lambda: importance.observe(groups) first")
        return self._squares[id(group)] / (2 * self._batches)


def structure_sums(group: Group) -> torch.Tensor:
    """Per channel of `group`, the sum of w * dL/dw over all its weights and biases in every layer of the group:
    minus the first-order change of the loss when the channel is removed."""
    total = torch.zeros(group.channels)
    for s in group.layout():
        for entry in _per_channel(s, lambda t: t):
            total[s.first:s.first + s.count] += entry.to(total)
    return total


def observing(importance: Callable[[Group], torch.Tensor], groups: Sequence[Group]
              ) -> Optional[Callable[[], None]]:
    """accumulate_gradients' `after_batch` for an importance that observes every batch (None for one that reads
    the summed gradient); resets it first."""
    if not hasattr(importance, "observe"):
        return None
    importance.reset()
    return lambda: importance.observe(groups)
