"""The pruning loop: remove channels group by group (torch-pruning's layer pruners), ranking units globally by
importance until each step's MAC goal is met, or, for a latency target, choosing each group's least important units
by the loss they add per latency they save (`latency` curves, re-timed every step) until each step's goal is met on
the device."""
from __future__ import annotations

import copy
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import pandas as pd
import torch
import torch.nn as nn

from analysis.taylor_prune.builders import prepare, prunable
from analysis.taylor_prune.groups import Group, prune_channels
from analysis.taylor_prune.importance import Batches, LossChange, TaylorImportance, accumulate_gradients, observing
from analysis.taylor_prune.latency import Curve, LatencyModel
from analysis.taylor_prune.macs import count_macs, measure_positions
from analysis.taylor_prune.tables import block_table, stage_table


@dataclass
class Unit:
    importance: float        # mean normalized importance of its channels
    group: Group
    channels: list[int]


def candidate_units(group: Group, importance: torch.Tensor, floor: float) -> list[Unit]:
    """The group's removable units in removal order: the k-th lowest channel of every head together, leaving at
    least `floor` of the group's original channels (at least one per head)."""
    per_head = group.channels // group.heads
    keep_at_least = max(1, math.ceil(floor * group.original / group.heads))
    order = importance.view(group.heads, per_head).argsort(dim=1)
    units = []
    for k in range(per_head - keep_at_least):
        channels = [h * per_head + int(order[h, k]) for h in range(group.heads)]
        units.append(Unit(float(importance[channels].mean()), group, channels))
    return units


# --- the procedure ----------------------------------------------------------------------------------------------

@dataclass
class PruneResult:
    blocks: pd.DataFrame     # one row per block
    stages: pd.DataFrame     # one row per stage
    summary: dict            # whole model: MACs, params, accuracy before/after, settings
    model: nn.Module         # the pruned model


def top1_accuracy(model: nn.Module, batches: Batches) -> tuple[float, int]:
    """(top-1 accuracy in %, images): counted here, as served batches would be served again to count them."""
    correct = total = 0
    with torch.no_grad():
        for images, labels in batches:
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return 100.0 * correct / max(total, 1), total


def _params_by_block(model: nn.Module, blocks: Iterable[str]) -> dict[str, int]:
    return {b: sum(p.numel() for n, p in model.named_parameters() if n.startswith(b + ".")) for b in blocks}


def _prune_chosen(groups: Sequence[Group], chosen: dict[int, list[int]]) -> None:
    for group in groups:
        if chosen.get(id(group)):
            prune_channels(group, sorted(chosen[id(group)]))


def _prune_to_macs(model: nn.Module, groups: Sequence[Group], batches: Batches, example: torch.Tensor,
                   importance: Callable[[Group], torch.Tensor], floor: float, target_macs: float, steps: int,
                   total_before: float) -> bool:
    """The MAC loop; whether every prunable group ended at its floor."""
    at_floor = False  # every prunable group down to its floor: nothing left to remove
    for step in range(1, steps + 1):
        goal = total_before * (1 - (1 - target_macs) * step / steps)
        # The savings of a unit are estimated alone; removing a width channel and a Q/K channel together saves
        # their shared weight once, not twice, so a step can fall short: it then tops up with fresh gradients.
        for _ in range(4):
            excess = sum(count_macs(model, example).values()) - goal
            if excess <= 0.002 * total_before or at_floor:
                break
            accumulate_gradients(model, batches, observing(importance, groups))
            units = sorted((u for g in groups if g.prunable
                            for u in candidate_units(g, importance(g), floor)),
                           key=lambda u: u.importance)
            chosen: dict[int, list[int]] = defaultdict(list)
            taken = 0
            for unit in units:
                if excess <= 0:
                    break
                chosen[id(unit.group)] += unit.channels
                excess -= len(unit.channels) * unit.group.macs_per_channel()
                taken += 1
            at_floor = taken == len(units)
            _prune_chosen(groups, chosen)
            model.zero_grad(set_to_none=True)
    return at_floor


LATENCY_TOLERANCE = 0.03  # a step's goal counts as met within this share of the unpruned latency: about the
                          # spread of a measured ratio on a loaded 2-core machine, so noise alone rarely tops up


@dataclass
class Segment:
    """Consecutive units of a group's removal order, from its `start`-th on: an edge of the lower convex hull of
    the group's (cumulative saving, cumulative importance), losing `importance` for `saving`."""
    group: Group
    start: int
    units: list[tuple[Unit, float]]   # (unit, the saving it adds, read at the width the units before it leave)
    importance: float
    saving: float

    @property
    def slope(self) -> float:
        return self.importance / self.saving


def hull_segments(group: Group, units: Sequence[Unit], curve: Curve) -> list[Segment]:
    """The group's removal order (`units`, least important first) cut into the edges of the lower convex hull of
    its points (cumulative latency share saved, cumulative importance removed), from nothing removed: the edges'
    slopes (importance lost per latency saved) rise, so taking edges cheapest first takes every group's units as a
    prefix of its own order. The k-th unit's saving is read off the curve at the width the k-1 before it leave.
    The hull ends where an edge would save nothing: no unit is removed for no saving."""
    width, step = group.channels, len(units[0].channels) if units else 0
    points = [(0.0, 0.0)]
    for k, unit in enumerate(units):
        points.append((curve.at(width) - curve.at(width - (k + 1) * step),
                       points[-1][1] + unit.importance * len(unit.channels)))
    hull = [0]
    for k in range(1, len(points)):
        # Drop the last hull point while it lies on or above the line from the one before it to point k.
        while len(hull) > 1:
            (x0, y0), (x1, y1), (x2, y2) = points[hull[-2]], points[hull[-1]], points[k]
            if (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0) > 0:
                break
            hull.pop()
        hull.append(k)
    segments = []
    for a, b in zip(hull, hull[1:]):
        saving, importance = points[b][0] - points[a][0], points[b][1] - points[a][1]
        if saving <= 0:
            break  # every later edge needs this one's units first
        adds = [(units[k], points[k + 1][0] - points[k][0]) for k in range(a, b)]
        segments.append(Segment(group, a, adds, importance, saving))
    return segments


def choose_by_latency(groups: Sequence[Group], curves: Sequence[Optional[Curve]],
                      importance: Callable[[Group], torch.Tensor], floor: float, excess: float
                      ) -> tuple[dict[int, list[int]], bool]:
    """The channels to remove ({id(group): channels}) that save at least `excess` of the latency by the curves
    while losing the least importance: the greedy over every group's hull edges, lowest importance per latency
    saved first (optimal for the convex hull of the choice, as the knapsack's greedy is), the last edge taken unit
    by unit until the excess is met. Returns also whether every edge that saves time was taken."""
    segments = sorted((seg for group, curve in zip(groups, curves) if group.prunable and curve is not None
                       for seg in hull_segments(group, candidate_units(group, importance(group), floor), curve)),
                      key=lambda seg: seg.slope)  # stable: a group's edges keep their order
    chosen: dict[int, list[int]] = defaultdict(list)
    for segment in segments:
        for unit, saving in segment.units:
            if excess <= 0:
                return chosen, False
            chosen[id(unit.group)] += unit.channels
            excess -= saving
    return chosen, True


@dataclass
class TimedCurves:
    """The groups' latency curves timed on one state of the model, whose latency over the unpruned one was `kept`:
    the curves' shares are of that model's latency."""
    curves: list[Optional[Curve]]
    kept: float
    cached: bool       # every curve read from the cache


def _latency_steps(model: nn.Module, reference: nn.Module, groups: Sequence[Group], batches: Batches,
                   importance: Callable[[Group], torch.Tensor], floor: float, target: float, steps: int,
                   latency: LatencyModel, images: torch.Tensor) -> tuple[bool, list[TimedCurves]]:
    """Each step times the groups' curves at the current widths (a structure timed before is read from the cache),
    removes the channels that lose the least importance for what the curves say the step's goal needs
    (`choose_by_latency`), then times the whole model against `reference` and tops up while the goal is not met;
    after the last step the target is checked once more on a fresh timing. Returns whether every unit that saves
    time was taken, and the curves of every step (the first: on the unpruned, rewritten model)."""
    kept = latency.measure(reference, model, images)[2]
    at_floor = False
    timed: list[TimedCurves] = []
    goals = [1 - (1 - target) * step / steps for step in range(1, steps + 1)]
    for step, goal in enumerate([*goals, target]):
        if step == steps:  # the target again, timed afresh: one reading low by noise must not end the pruning
            kept = latency.measure(reference, model, images)[2]
        if timed and (kept - goal <= LATENCY_TOLERANCE or at_floor):
            continue
        curves, cached = latency.curves(model, groups, images)
        timed.append(TimedCurves(curves, kept, cached))
        for _ in range(4):
            if kept - goal <= LATENCY_TOLERANCE or at_floor:
                break
            excess = (kept - goal) / timed[-1].kept  # in shares of the latency the curves were timed against
            accumulate_gradients(model, batches, observing(importance, groups))
            chosen, at_floor = choose_by_latency(groups, timed[-1].curves, importance, floor, excess)
            _prune_chosen(groups, chosen)
            model.zero_grad(set_to_none=True)
            kept = latency.measure(reference, model, images)[2]
    return at_floor, timed


def _prune_to_latency(model: nn.Module, reference: nn.Module, groups: Sequence[Group], batches: Batches,
                      importance: Callable[[Group], torch.Tensor], floor: float, target: float, steps: int,
                      latency: LatencyModel) -> tuple[bool, dict, dict[int, tuple[float, float]]]:
    """The latency procedure: steps with their curves (cached), then the pruned model timed against the unpruned one
    afresh, with a note when it misses the target by more than 10%. Returns whether every unit that saves time was
    taken, the summary's latency fields, and id(group) -> ms its channels cost before (by the first step's curves)
    and after (by the last step's)."""
    images = latency.images(batches)
    at_floor, timed = _latency_steps(model, reference, groups, batches, importance, floor, target, steps, latency,
                                     images)
    before_ms, after_ms, kept = latency.measure(reference, model, images)
    if abs(kept / target - 1) > 0.1:
        reason = ((f"every unit whose removal saves time by the latency table is taken (groups at their floor "
                   f"{floor:g}, or their remaining channels save nothing measurable)" if at_floor else
                   "raise --steps") if kept > target else
                  "the last step saved more than the latency table predicted (it times each group's module alone)")
        print(f"note: latency target {target:.2f} missed by more than 10% ({kept:.3f} kept on {latency.device}, "
              f"batch {latency.batch}): {reason}", file=sys.stderr)
    first, last = timed[0], timed[-1]
    group_ms = {id(g): (c0.group_share(g.original) * before_ms * first.kept,
                        c1.group_share(g.channels) * before_ms * last.kept)
                for g, c0, c1 in zip(groups, first.curves, last.curves) if c0 is not None and c1 is not None}
    widths = [group_ms[id(g)] for g in groups if g.kind == "width" and id(g) in group_ms]
    summary = dict(target_latency=target, latency_before_ms=before_ms, latency_after_ms=after_ms, latency_kept=kept,
                   latency_rewritten_kept=first.kept, latency_device=latency.device,
                   latency_hardware=latency.describe(), latency_batch=latency.batch,
                   latency_threads=torch.get_num_threads(),
                   latency_table="cached" if all(t.cached for t in timed) else "measured",
                   latency_tables=len(timed),
                   width_ms_before=sum(b for b, _ in widths), width_ms_after=sum(a for _, a in widths))
    return at_floor, summary, group_ms


def prune_to_target(model: nn.Module, batches: Batches, target_macs: float = 0.5, steps: int = 5,
                 importance: Optional[Callable[[Group], torch.Tensor]] = None, floor: float = 0.1,
                 val_batches: Batches = (), prune_width: bool = True, target_latency: Optional[float] = None,
                 latency: Optional[LatencyModel] = None) -> PruneResult:
    """Prune `model` (in place, eval mode; a converted copy where a converter is registered, see `prunable`: the
    result's `model` is the one pruned) to `target_macs` of its MACs in `steps` Taylor steps; report per block.

    batches: (images, labels) used for the gradients (all of them, every step). importance: a group's channel
    scores from those gradients (any callable Group -> (channels,) tensor; None: TaylorImportance() for a MAC target,
    LossChange() for a latency target, whose costs are absolute and need scores that compare across groups).
    floor: fraction of each group's channels always kept.
    val_batches: accuracy before and after, when given. prune_width: include the residual-stream width groups.
    target_latency: prune to this fraction of the unpruned model's latency instead (measured by `latency`,
    LatencyModel() by default: CPU, batch 16) and time the result (summary's latency_*; ms per group in the
    block table).
    """
    if not 0 < target_macs < 1:
        raise ValueError(f"target_macs must lie in (0, 1), got {target_macs}")
    if target_latency is not None and not 0 < target_latency < 1:
        raise ValueError(f"target_latency must lie in (0, 1), got {target_latency}")
    if importance is None:
        importance = TaylorImportance() if target_latency is None else LossChange()
    elif target_latency is not None and getattr(importance, "normalizer", "none") != "none":
        raise ValueError(f"a latency target divides importance by absolute savings, so scores normalized per group "
                         f"({importance.normalizer}) do not compare across groups: use normalizer 'none' or "
                         f"LossChange()")
    reference = copy.deepcopy(model).eval() if target_latency is not None else None  # the latency's 1.0
    model = prunable(model).eval()
    groups = prepare(model)
    if not prune_width:
        for group in groups:
            group.prunable &= group.kind != "width"
    example = batches[0][0][:1]
    measure_positions(model, groups, example)
    names = list(dict.fromkeys(g.block for g in groups if g.kind != "width"))
    macs_before, params_before = count_macs(model, example), _params_by_block(model, names)
    total_params_before = sum(p.numel() for p in model.parameters())
    acc_before, val_images = top1_accuracy(model, val_batches) if val_batches else (None, 0)
    total_before = sum(macs_before.values())
    timed, group_ms = {}, None
    if target_latency is None:
        at_floor = _prune_to_macs(model, groups, batches, example, importance, floor, target_macs, steps,
                                  total_before)
    else:
        at_floor, timed, group_ms = _prune_to_latency(model, reference, groups, batches, importance, floor,
                                                      target_latency, steps, latency or LatencyModel())
    macs_after = count_macs(model, example)
    total_after = sum(macs_after.values())
    if target_latency is None and total_after > (target_macs + 0.01) * total_before:
        reason = (f"the prunable groups are at their floor ({floor:g}), the rest of the model is not pruned"
                  if at_floor else "raise --steps")
        print(f"note: MAC target {target_macs:.2f} not reached ({total_after / total_before:.3f} kept): {reason}",
              file=sys.stderr)
    blocks = block_table(groups, macs_before, macs_after, params_before, _params_by_block(model, names), group_ms)
    summary = dict(macs_before_m=total_before / 1e6, macs_after_m=total_after / 1e6,
                   macs_kept=total_after / total_before, params_before_m=total_params_before / 1e6,
                   params_after_m=sum(p.numel() for p in model.parameters()) / 1e6,
                   target_macs=target_macs if target_latency is None else None,
                   steps=steps, importance=getattr(importance, "name", type(importance).__name__),
                   normalizer=getattr(importance, "normalizer", None),
                   reduction=getattr(importance, "reduction", None), floor=floor,
                   width_pruned=any(g.kind == "width" and g.prunable for g in groups),
                   gradient_images=sum(len(labels) for _, labels in batches),
                   val_images=val_images, acc_before=acc_before,
                   acc_after=top1_accuracy(model, val_batches)[0] if val_batches else None, **timed)
    return PruneResult(blocks, stage_table(blocks), summary, model)
