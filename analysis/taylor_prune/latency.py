"""Latency as the cost of a pruning unit: per group, the latency of the module its channels live in (the innermost
module holding all its layers and its attention: a ViT block's attention for Q/K and V, its Mlp for the FFN; the
whole model for a residual-stream width) as a function of the group's width, as a share of the whole unpruned
model's latency, timed on the device at the timing batch; cached on disk per model and checked against the device
it was measured on.

Why a table rather than timing candidate steps directly: one unit (a dim of every head, one FFN channel) saves
microseconds of a model's milliseconds, far below the noise of timing a whole model on a shared machine, and a step
has hundreds of candidates. A group's curve instead times its own module at a few widths from full down to one
channel per head, a span wide enough to rise above the noise, alternating call by call with the whole model (so a
curve is a share whatever the load was while it was timed); a unit's saving is read off the piecewise-linear curve
at the group's current width. The smallest module keeps other layers' noise out of the curve. Modules of the same
structure share a curve, and a later run on the same model and device reads the table from disk. The curves add
up groups timed alone, so they only rank units; whether a step's goal is met is decided by timing the whole pruned
model against the unpruned one (`LatencyModel.measure`).
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from sklearn.isotonic import IsotonicRegression

from analysis.taylor_prune.builders import prepare
from analysis.taylor_prune.groups import Group, prune_channels
from analysis.taylor_prune.importance import Batches
from evit.builder.io import write_json
from evit.builder.cache_keys import key_of
from evit.timing import Timing, describe_machine, synchronizer, time_interleaved


@dataclass
class Curve:
    """Latency of a group's scope at the group's widths (channels, ascending) as a share of the whole unpruned
    model's, timed alongside it (so that curves timed under different loads compare), made non-decreasing in
    width by isotonic regression: noise must not make a removal look like it costs time, and pooling the points
    that disagree (rather than lifting them to the highest) keeps noise from looking like a saving."""

    widths: list[int]
    share: list[float]

    def at(self, width: float) -> float:
        return float(np.interp(width, self.widths, self.share))

    def saving(self, width: int, removed: int) -> float:
        """The share of the model's latency saved by removing `removed` channels from a group now `width` wide."""
        return self.at(width) - self.at(width - removed)

    def group_share(self, width: int) -> float:
        """The share the group's channels cost at `width` above its narrowest timed width (one channel per head)."""
        return self.at(width) - self.share[0]


def _shapes(obj: object) -> list:
    """Shapes and dtypes of the tensors in nested args / kwargs (what a timing depends on besides the module)."""
    if isinstance(obj, torch.Tensor):
        return [tuple(obj.shape), str(obj.dtype)]
    if isinstance(obj, (list, tuple)):
        return [_shapes(o) for o in obj]
    if isinstance(obj, dict):
        return [[k, _shapes(v)] for k, v in sorted(obj.items())]
    return [repr(obj)]


def _structure(module: nn.Module) -> str:
    """The module's layers and the shapes of its parameters and buffers: equal for blocks that time alike."""
    tensors = [(n, tuple(t.shape)) for n, t in (*module.named_parameters(), *module.named_buffers())]
    return repr(module) + repr(tensors)


def _map_tensors(obj: object, fn: Callable[[torch.Tensor], torch.Tensor]) -> object:
    """`fn` applied to every tensor in nested args / kwargs."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def capture_inputs(model: nn.Module, modules: Iterable[nn.Module], images: torch.Tensor) -> dict[nn.Module, tuple]:
    """(args, kwargs) of each module's first call in one forward of `images` (copies: the forward may go on to
    change a tensor in place)."""
    seen: dict[nn.Module, tuple] = {}

    def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module not in seen:
            seen[module] = _map_tensors((args, kwargs), torch.Tensor.clone)

    handles = [m.register_forward_pre_hook(keep, with_kwargs=True) for m in set(modules)]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def scopes(model: nn.Module, groups: Sequence[Group], images: torch.Tensor) -> tuple[list[str], dict[nn.Module, tuple]]:
    """Per group the name of the module timed for it: the innermost module holding all the group's layers and its
    attention (where its matmuls run) that runs in the forward (the model itself, '', for a width group); and the
    inputs of those modules."""
    names = {m: n for n, m in model.named_modules()}
    chains = []  # per group, the candidates innermost first
    for group in groups:
        common: list[str] = []
        if group.kind != "width":
            modules = [s.layer for s in group.layout()] + [group.attention] * (group.attention is not None)
            for parts in zip(*(names[m].split(".") for m in modules)):
                if len(set(parts)) > 1:
                    break
                common.append(parts[0])
        chains.append([".".join(common[:i]) for i in range(len(common), -1, -1)])
    inputs = capture_inputs(model, {model.get_submodule(n) for chain in chains for n in chain}, images)
    chosen = [next(n for n in chain if model.get_submodule(n) in inputs) for chain in chains]
    return chosen, {model.get_submodule(n): inputs[model.get_submodule(n)] for n in chosen}


@dataclass
class LatencyModel:
    """Where and how latency is timed: `device` (cpu | cuda; the model is pruned where it is and copies are timed
    here), `batch` images per call, CPU threads as torch has them set; `cache_dir` holds the tables (None: none
    kept). `points` widths per curve. Modules timed together are warmed up `warmup_s` each, then alternate call by
    call for `calls` calls each; a module's latency is its median call. Alternating call by call (rather than
    window by window) keeps two modules' calls under the same load."""

    device: str = "cpu"
    batch: int = 16
    cache_dir: Optional[Path] = None
    points: int = 6
    warmup_s: float = 0.05
    calls: int = 60

    def describe(self) -> str:
        return describe_machine(self.device, torch.get_num_threads())

    def images(self, batches: Batches) -> torch.Tensor:
        """A timing batch: the first gradient batch's images, repeated to `batch` images."""
        images = batches[0][0]
        return images.repeat(-(-self.batch // len(images)), 1, 1, 1)[:self.batch]

    def _time(self, calls: dict[str, tuple[nn.Module, tuple]]) -> dict[str, Timing]:
        """Each module's calls on its inputs (args, kwargs), alternating call by call, on the device."""
        def call(module: nn.Module, inputs: tuple):
            args, kwargs = _map_tensors(inputs, lambda t: t.to(self.device))

            def run() -> None:
                with torch.no_grad():
                    module(*args, **kwargs)
            return run

        return time_interleaved({k: call(*c) for k, c in calls.items()}, self.batch, self.warmup_s, 0.0,
                                self.calls, synchronizer(self.device))  # windows of one call each

    @staticmethod
    def _ratio(timings: dict[str, Timing], numerator: str, denominator: str) -> float:
        """The median of numerator / denominator over adjacent calls: they share the machine's load, so this moves
        less than the ratio of the medians on a loaded machine."""
        return float(np.median(np.array(timings[numerator].window_ms) / np.array(timings[denominator].window_ms)))

    def _on_device(self, model: nn.Module) -> nn.Module:
        return model if self.device == "cpu" else copy.deepcopy(model).to(self.device)

    def measure(self, reference: nn.Module, model: nn.Module, images: torch.Tensor) -> tuple[float, float, float]:
        """(median ms of `reference`, of `model`, model / reference as `_ratio`) on `images`."""
        reference_ms, measured = self.measure_many(reference, {"model": model}, images)
        return reference_ms, *measured["model"]

    def measure_many(self, reference: nn.Module, models: dict[str, nn.Module], images: torch.Tensor
                     ) -> tuple[float, dict[str, tuple[float, float]]]:
        """(median ms of `reference`, {name: (median ms, model / reference as `_ratio`)}) on `images`, every model
        timed in the same interleaved run: models compared with each other share the machine's load too."""
        inputs = ((images,), {})
        t = self._time({"reference": (self._on_device(reference), inputs),
                        **{f"model {k}": (self._on_device(m), inputs) for k, m in models.items()}})
        return t["reference"].latency_ms, {k: (t[f"model {k}"].latency_ms, self._ratio(t, f"model {k}", "reference"))
                                           for k in models}

    def _curve(self, model: nn.Module, index: int, scope: str, inputs: tuple, images: torch.Tensor) -> Curve:
        """Time group `index` of `model` (a prepared model) at `points` widths from full to one channel per head,
        on a copy pruned step by step, against the whole model on `images`; `scope` is the module timed ('' the
        whole model) and `inputs` its inputs."""

        twin = copy.deepcopy(model)
        group = prepare(twin)[index]
        per_head = group.channels // group.heads
        variants = {}
        for keep in sorted({round(k) for k in np.linspace(per_head, 1, self.points)}, reverse=True):
            now = group.channels // group.heads
            if keep < now:
                prune_channels(group, [h * now + k for h in range(group.heads) for k in range(keep, now)])
            variants[str(group.channels)] = (copy.deepcopy(twin.get_submodule(scope)).to(self.device).eval(), inputs)
        timings = self._time({**variants, "model": (self._on_device(model), ((images,), {}))})
        widths = sorted(int(w) for w in variants)
        share = IsotonicRegression().fit_transform(widths, [self._ratio(timings, str(w), "model") for w in widths])
        return Curve(widths, [float(v) for v in share])

    def curves(self, model: nn.Module, groups: Sequence[Group], images: torch.Tensor
               ) -> tuple[list[Optional[Curve]], bool]:
        """A curve per prunable group (None for the others) of the prepared `model` whose groups are `groups`,
        and whether all came from the cache. Groups whose scopes have the same structure, inputs and place share
        a curve; a cached table measured on another device is measured again and replaced."""
        names, inputs = scopes(model, groups, images)
        keys: list[Optional[str]] = []
        for i, (group, scope) in enumerate(zip(groups, names)):
            module = model.get_submodule(scope)
            place = sum(g.kind == group.kind and s == scope for g, s in zip(groups[:i], names[:i]))
            keys.append(key_of([group.kind, place, group.channels, group.heads, _structure(module),
                                _shapes(inputs[module])]) if group.prunable else None)
        device = self.describe()
        path = self.cache_dir and Path(self.cache_dir) / f"{key_of([_structure(model), _shapes(images)])}.json"
        table: dict[str, dict] = {}
        if path and path.exists():
            cached = json.loads(path.read_text())
            if cached["device"] == device:
                table = cached["curves"]
            else:
                print(f"note: latency table {path} was measured on {cached['device']}; measuring it again on "
                      f"{device}", file=sys.stderr)
        missing = [k for k in dict.fromkeys(keys) if k is not None and k not in table]
        for key in missing:
            i = keys.index(key)
            curve = self._curve(model, i, names[i], inputs[model.get_submodule(names[i])], images)
            table[key] = dict(widths=curve.widths, share=curve.share)
        if path and missing:
            write_json(path, dict(device=device, batch=self.batch, curves=table))
        return [Curve(**table[k]) if k is not None else None for k in keys], not missing
