"""Pruning groups for any softmax-attention model, found from the model itself (`discover`).

1. One forward of an example image finds every attention site as head similarity does (a softmax over the last
   dim of three or more dims, or scaled_dot_product_attention) under the innermost module running it, with the
   arguments that module was called with.
2. Each such module is rewritten into a `TracedAttention` (traced_attention.py): q, k, v from Linears of their own,
   heads-major, the original scale and everything between the matmuls kept; its Q/K group is q's and k's rows, its
   V group v's rows and the consumer's columns, heads kept equal. A module that is already one (a second pass) is
   taken as it is.
3. A second forward follows every channel through the model (couplings.py); the channel classes that hold the
   same places form a group: a residual-stream width when its channels feed an attention's projections or were
   tied by an addition (class and distillation tokens, position embedding, norms, LayerScale, the classifier
   come along), otherwise the hidden channels of one module (an FFN: fc1 rows, per-channel layers, fc2 columns).
   A group is kept where each of its places holds it as contiguous runs in channel order, so that its layout
   follows from the groups' current sizes after any pruning, and where pruning a channel of it leaves a model
   that runs (one trial, then halves of the groups).
4. Blocks a hand-written builder took (`known`) keep the builder's groups; their channels are not regrouped, and
   the widths are found through them.

Blocks are named as the builders name them (the module under a ModuleList or Sequential: `blocks.3`), a width by
the stage it feeds (`layers.1`, `embed` for a single-stage model), and a block's stage is the width group its
attention reads."""
from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from analysis.attention_capture import SDPA_FUNCTIONS, attention_logits
from analysis.taylor_prune.attention import PrunedAttention
from analysis.taylor_prune.builders.couplings import LEAVES, Couplings, Place, trace_couplings
from analysis.taylor_prune.builders.traced_attention import TracedAttention, trace_attention
from analysis.taylor_prune.groups import Group, Slice, prune_channels, whole
from evit.models import UnsupportedModelError, model_img_size

CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


class NoAttention(UnsupportedModelError):
    """The model runs no softmax attention: discovery has nothing to split."""


class _SiteFinder(TorchFunctionMode):
    """Records the innermost running module (and its call) of every softmax attention and SDPA call."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[nn.Module, tuple, dict]] = []
        self.sites: dict[nn.Module, tuple[tuple, dict]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in SDPA_FUNCTIONS or attention_logits(func, args, kwargs) is not None:
            self.record()
        return out

    def record(self) -> None:
        running = [call for call in self.stack if not isinstance(call[0], nn.Softmax)]
        if running and running[-1][0] not in self.sites:
            module, args, kwargs = running[-1]
            self.sites[module] = (args, kwargs)


def attention_calls(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[nn.Module, tuple, dict]]:
    """name -> (module, args, kwargs) of every module that ran softmax attention itself, in the order they ran."""
    finder = _SiteFinder()
    handles = []

    def push(module: nn.Module, args: tuple, kwargs: dict) -> None:
        finder.stack.append((module, args, kwargs))

    def pop(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if finder.stack and finder.stack[-1][0] is module:
            finder.stack.pop()

    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(push, with_kwargs=True))
            handles.append(module.register_forward_hook(pop, with_kwargs=True, always_call=True))
        with torch.no_grad(), finder:
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    names = {m: n for n, m in model.named_modules()}
    return {names[m]: (m, args, kwargs) for m, (args, kwargs) in finder.sites.items()}


def example_input(model: nn.Module) -> torch.Tensor:
    """Two images at the model's own resolution, on its device (meta for a skeleton)."""
    from timm.data import resolve_model_data_config

    size = model_img_size(model)
    channels = resolve_model_data_config(model)["input_size"][0]
    first = next(model.parameters())
    return torch.randn(2, channels, size, size, device=first.device, dtype=first.dtype)


def block_of(model: nn.Module, name: str) -> str:
    """The block a module belongs to: its innermost ancestor (or itself) that is an item of a ModuleList or
    Sequential (`blocks.3` for `blocks.3.attn`); else its parent, or itself when that is the model."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        parent = ".".join(parts[:end - 1])
        if isinstance(model.get_submodule(parent), CONTAINERS):
            return ".".join(parts[:end])
    return ".".join(parts[:-1]) or name


def _stage_name(model: nn.Module, blocks: list[str]) -> str:
    """A width group's name: the module holding the container of the blocks it feeds (`layers.1`), `embed` when
    that is the model."""
    parents = [b.rpartition(".")[0] for b in blocks]
    common = parents[0].split(".") if parents[0] else []
    for p in parents[1:]:
        parts = p.split(".") if p else []
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    while common and isinstance(model.get_submodule(".".join(common)), CONTAINERS):
        common = common[:-1]
    return ".".join(common) or "embed"


def _channels_in(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _channels_out(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _attention_groups(block: str, attention: TracedAttention, stage: int) -> list[Group]:
    """The Q/K group (q and k rows) and the V group (v rows, the consumer's columns) of a rewritten attention."""
    common = dict(block=block, stage=stage, heads=attention.num_heads, attention=attention,
                  width=lambda: _channels_in(attention.q))
    return [Group("qk", count=lambda: _channels_out(attention.q),
                  layout=lambda: whole(_channels_out(attention.q), [(attention.q, "out"), (attention.k, "out")]),
                  **common),
            Group("v", count=lambda: _channels_out(attention.v),
                  layout=lambda: whole(_channels_out(attention.v), [(attention.v, "out"), (attention.proj, "in")]),
                  **common)]


class _ChannelGroup:
    """The channel classes of one coupled group and where they live: per place, the sequence of segments (runs of
    one group's channels, one run per copy, or runs of channels no group prunes), from which the slices follow
    at the groups' current sizes."""

    def __init__(self, classes: list[int]):
        self.classes = classes
        self.count = len(classes)

    def prune(self, removed: int) -> None:
        self.count -= removed


def _segments(couplings: Couplings, groups: list[_ChannelGroup]
              ) -> tuple[list[_ChannelGroup], dict[Place, list[tuple[Optional[_ChannelGroup], int]]]]:
    """The groups whose every place holds each copy of their channels as one run in channel order, and per place
    its segments: (group, copy) or (None, fixed length)."""
    while True:
        owner: dict[Place, dict[int, tuple[_ChannelGroup, int, int]]] = defaultdict(dict)
        for group in groups:
            for position, c in enumerate(group.classes):
                for place, indices in couplings.members[c].items():
                    for replica, index in enumerate(indices):
                        owner[place][index] = (group, replica, position)
        bad, segments = set(), {}
        for place, owned in owner.items():
            runs: list[tuple[Optional[_ChannelGroup], int]] = []
            index, size = 0, couplings.sizes[place]
            while index < size:
                if index not in owned:
                    start = index
                    while index < size and index not in owned:
                        index += 1
                    runs.append((None, index - start))
                    continue
                group, copy, position = owned[index]
                run = [owned.get(index + j) for j in range(group.count)]
                if position != 0 or run != [(group, copy, j) for j in range(group.count)]:
                    bad.add(id(group))
                    index += 1
                    continue
                runs.append((group, copy))
                index += group.count
            segments[place] = runs
        if not bad:
            return groups, segments
        groups = [g for g in groups if id(g) not in bad]


def _layout(group: _ChannelGroup, places: list[Place], segments: dict) -> Callable[[], list[Slice]]:
    def layout() -> list[Slice]:
        slices = []
        for place in places:
            offset = 0
            for owner, extent in segments[place]:
                if owner is group:
                    slices.append(Slice(place.module, place.axis, offset, 0, group.count, place.param))
                offset += owner.count if owner is not None else extent
        return slices
    return layout


def _kept(couplings: Couplings, c: int, internal: set[int], projection_inputs: set[Place],
          own: set[Place]) -> bool:
    """Whether class c is a channel of a group: not dropped, not an attention's own Q/K or V channel (nor a channel
    of what runs between its matmuls, e.g. head mixing), written by a layer or parameter and read by a layer."""
    if c in couplings.dropped:
        return False
    places = couplings.members[c]
    if any(p in own for p in places):
        return False
    if all(id(p.module) in internal for p in places) and not any(p in projection_inputs for p in places):
        return False
    writers = [p for p in places if (p.axis == "out" and isinstance(p.module, LEAVES)) or p.axis == "last"]
    readers = [p for p in places if p.axis == "in"]
    return bool(writers) and bool(readers)


def _projections(model: nn.Module) -> dict[str, list[nn.Module]]:
    """name -> the q, k, v layers of every split attention in the model (rewritten here or by a builder)."""
    return {n: [m.q, m.k, m.v] for n, m in model.named_modules()
            if isinstance(m, PrunedAttention) and all(isinstance(getattr(m, r, None), LEAVES) for r in "qkv")}


def channel_groups(model: nn.Module, couplings: Couplings, attentions: dict[str, TracedAttention],
                   known: Sequence[Group] = ()) -> list[Group]:
    """The width and FFN-hidden groups, then each rewritten attention's Q/K and V groups, as `Group`s (see the
    module docstring for their kinds and names), with the `known` groups of blocks a builder took (channels of
    theirs are theirs)."""
    names = {m: n for n, m in model.named_modules()}
    internal = {id(m) for a in model.modules() if isinstance(a, PrunedAttention) for m in a.modules()}
    projections = _projections(model)
    projection_inputs = {Place(layer, "in") for layers in projections.values() for layer in layers}
    own = {Place(layer, "out") for a in attentions.values() for layer in (a.q, a.k, a.v)} | {
        Place(a.proj, "in") for a in attentions.values()} | {
        Place(s.layer, s.axis, s.param if s.axis == "last" else "weight") for g in known for s in g.layout()}
    by_signature: dict[tuple, list[int]] = defaultdict(list)
    for c in range(len(couplings.members)):
        if _kept(couplings, c, internal, projection_inputs, own):
            places = couplings.members[c]
            by_signature[tuple(sorted((couplings.order[p], len(i)) for p, i in places.items()))].append(c)
    parts = []
    for classes in by_signature.values():
        first = min(couplings.members[classes[0]], key=couplings.order.get)
        parts.append(_ChannelGroup(sorted(classes, key=lambda c: couplings.members[c][first][0])))
    parts, segments = _segments(couplings, parts)
    place_order = sorted(couplings.order, key=couplings.order.get)
    info = []
    for part in parts:
        places = [p for p in place_order if p in couplings.members[part.classes[0]]]
        fed = [n for n, layers in projections.items() if any(Place(layer, "in") in places for layer in layers)]
        inner = [n for n in fed if all(id(p.module) in {id(m) for m in model.get_submodule(n).modules()}
                                       for p in places)]
        summed = any(c in couplings.summed for c in part.classes)
        kind = "width" if fed or summed else "ffn"
        info.append((part, places, fed, inner, kind))
    streams = [(part, places, fed) for part, places, fed, inner, kind in info if kind == "width" and not inner]
    stage_of_place = {p: s for s, (_, places, _) in enumerate(streams) for p in places}

    def stage_reading(layer: nn.Module) -> int:
        return stage_of_place.get(Place(layer, "in"), 0)

    groups: list[Group] = []
    widths: list[Group] = []
    for part, places, fed, inner, kind in info:
        common = dict(heads=1, count=lambda part=part: part.count, layout=_layout(part, places, segments),
                      on_prune=part.prune)
        if kind == "width":
            if inner:
                block, stage = block_of(model, inner[0]), stage_reading(projections[inner[0]][0])
            else:
                stage = next(s for s, (p, _, _) in enumerate(streams) if p is part)
                block = _stage_name(model, [block_of(model, n) for n in fed or [names[p.module] for p in places]])
                if any(w.block == block for w in widths):  # a second stream in the same place (a pooling head's)
                    block = block_of(model, names[places[0].module])
            widths.append(Group("width", block=block, stage=stage, width=lambda part=part: part.count, **common))
        else:
            writer = next(p.module for p in places if p.axis == "out" and isinstance(p.module, LEAVES))
            owners = [names[p.module] for p in places]
            prefix = _common_prefix(owners)
            groups.append(Group("ffn", block=block_of(model, prefix) if prefix else names[writer],
                                stage=stage_reading(writer), width=lambda w=writer: _channels_in(w), **common))
    for name, attention in attentions.items():
        groups += _attention_groups(block_of(model, name), attention, stage_reading(attention.q))
    groups += known
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    first_kind = {"qk": 0, "v": 1, "ffn": 2}
    groups.sort(key=lambda g: (order.get(g.block, len(order)), first_kind[g.kind]))
    return groups + widths


def _common_prefix(names: list[str]) -> str:
    parts = names[0].split(".")
    for name in names[1:]:
        other = name.split(".")
        n = 0
        while n < min(len(parts), len(other)) and parts[n] == other[n]:
            n += 1
        parts = parts[:n]
    return ".".join(parts)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, module)


def _owner(model: nn.Module, name: str) -> tuple[str, Optional[TracedAttention]]:
    """A site already rewritten (a second pass) runs in a TracedAttention's body: that attention and its name."""
    parent = name.rpartition(".")[0]
    module = model.get_submodule(parent) if name.endswith(".body") or name == "body" else None
    return (parent, module) if isinstance(module, TracedAttention) else (name, None)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def discover(model: nn.Module, example: Optional[torch.Tensor] = None, known: Sequence[Group] = ()
             ) -> list[Group]:
    """The groups of any softmax-attention model, its attentions rewritten in place (the same function, checked
    per attention): per block Q/K, V (heads equal) and FFN hidden, then the residual-stream widths.
    `example`: an input (default: two random images at the model's resolution). `known`: the groups of blocks a
    hand-written builder took already (their attentions are not traced, their channels stay theirs; the widths are
    discovered, through those blocks too). UnsupportedModelError (NoAttention for a model without softmax
    attention) naming the first module it cannot split and why."""
    example = example_input(model) if example is None else example
    taken = {g.block for g in known}
    with _eval(model):
        calls = {n: call for n, call in attention_calls(model, example).items()
                 if not any(n.startswith(b + ".") for b in taken)}
        if not calls and not known:
            raise NoAttention(f"{type(model).__name__} runs no softmax attention (no softmax over keys or "
                              f"scaled_dot_product_attention)")
        attentions: dict[str, TracedAttention] = {}
        for name, (module, args, kwargs) in calls.items():
            owner_name, owner = _owner(model, name)
            if owner is None:
                owner = trace_attention(name, module, args, kwargs)
                _replace(model, name, owner)
            attentions[owner_name] = owner
        if example.is_meta:  # a skeleton: the attentions are checked, the couplings need values
            return [g for n, a in attentions.items() for g in _attention_groups(block_of(model, n), a, 0)] + list(
                known)
        regions = {id(m) for a in model.modules() if isinstance(a, PrunedAttention) for m in a.modules()}
        couplings = trace_couplings(model, example[:1], regions)  # the labels are the same for every image
        groups = channel_groups(model, couplings, attentions, known)
        return _runnable(model, groups, example)


def _prune_one(groups: list[Group]) -> None:
    """Remove one channel of every head of each group (the trial of `_runnable`)."""

    for group in groups:
        per_head = group.channels // group.heads
        if per_head > 1:
            prune_channels(group, [h * per_head for h in range(group.heads)])


def _runs(model: nn.Module, backup: nn.Module, groups: list[Group], example: torch.Tensor) -> bool:
    """Whether the model still runs with one channel of each of `groups` removed; it is restored from `backup`
    (an unpruned copy) after: pruning puts new tensors in place of the layers' (it changes none in place), so the
    modules' own attributes, their parameter and buffer dicts copied, restore each module."""
    sizes = [(part, part.count) for g in groups if isinstance(part := getattr(g.on_prune, "__self__", None),
                                                              _ChannelGroup)]
    try:
        _prune_one(groups)
        with torch.no_grad():
            model(example)
        return True
    except Exception:  # noqa: BLE001 -- any failure of the pruned forward rules the groups out
        return False
    finally:
        for module, saved in zip(model.modules(), backup.modules()):
            module.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in saved.__dict__.items()
                                    if k != "_modules"})
        for part, count in sizes:
            part.count = count


def _runnable(model: nn.Module, groups: list[Group], example: torch.Tensor) -> list[Group]:
    """The groups whose pruning leaves a model that runs: all of them when pruning one channel of each does (one
    trial), else those of each half that do, recursively (a module that reshapes its parameter to a size it keeps,
    as metaformer's Scale does, breaks when its channels go: that group is left out)."""
    backup = copy.deepcopy(model)

    def keep(part: list[Group]) -> list[Group]:
        if _runs(model, backup, part, example[:1]):
            return part
        if len(part) == 1:
            return []
        return keep(part[:len(part) // 2]) + keep(part[len(part) // 2:])

    return keep(groups)
