"""Which channels of which layers must be pruned together, read off one forward of the whole model.

Every value the forward computes carries a label per element: the channel slot it came from. A Linear or Conv
output gets fresh slots, one per output channel (its input's labels are tied to its input-column slots); a bare
parameter or buffer (class token, position embedding, LayerScale gamma, a norm's weight in code of its own) gets a
slot per element. Ops move labels with the values: reshapes, permutes, concatenation, indexing, rolls and pads
move them as they move the data (they are applied to the labels themselves), element-wise ops tie the labels of
their inputs element by element (a residual add ties the two streams' channels, a gate multiplies them), norms tie
the channels they scale, and reductions keep a label where what they reduce carries one. A tie merges two slots'
classes (union-find), so after the forward every class is one channel: the rows, columns, norm channels and
parameter entries that hold it, e.g. a Swin stage's channel c at c, C+c, 2C+c and 3C+c of the next PatchMerging.

Inside a split attention (a `PrunedAttention`, rewritten by discovery or by a builder) the matmuls, and whatever
else runs between them, end the labels: q, k and v rows and the consumer's columns are the attention's own Q/K and
V groups, never tied to anything else. A matmul, convolution or other op the labels cannot follow, met outside an
attention with labelled inputs, stops the trace with a one-line refusal. (torch-pruning's dependency graph finds
couplings too, but it treats a Swin PatchMerging's reshape as the identity on channels and maps stage channel c to
merge channel c only.)"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from evit.models import UnsupportedModelError

# ops that move or copy elements: applied to the labels as to the data
MOVES = {"view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "transpose", "t", "expand", "unsqueeze",
         "squeeze", "select", "slice", "index", "cat", "stack", "split", "split_with_sizes", "unbind", "chunk",
         "roll", "flip", "constant_pad_nd", "clone", "contiguous", "alias", "detach", "repeat", "index_select",
         "gather", "unfold", "narrow", "movedim", "flatten", "unflatten", "lift_fresh", "lift_fresh_copy", "copy",
         "copy_", "index_put", "index_put_", "slice_scatter", "select_scatter", "as_strided", "expand_as",
         "view_as", "reshape_as", "as_strided_", "squeeze_", "unsqueeze_", "transpose_", "pixel_shuffle",
         "pixel_unshuffle", "channel_shuffle", "repeat_interleave", "_unsafe_index", "fill_", "zero_"}
# element-wise beyond torch's pointwise tag: labels pass or are tied element by element
ELEMENTWISE = {"_softmax", "_safe_softmax", "softmax", "_log_softmax", "native_dropout", "_to_copy", "where",
               "masked_fill", "masked_fill_", "hardtanh", "clamp", "clamp_", "dropout"}
SUMS = {"add", "add_", "sub", "sub_"}
REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "prod",
              "linalg_vector_norm", "norm", "logsumexp", "any", "all", "argmax", "argmin"}
POOLS = {"avg_pool1d", "avg_pool2d", "max_pool2d_with_indices", "max_pool2d", "adaptive_avg_pool2d",
         "_adaptive_avg_pool2d", "adaptive_max_pool2d", "upsample_nearest2d", "upsample_bilinear2d",
         "upsample_bicubic2d", "_upsample_bilinear2d_aa", "avg_pool3d"}
MATMULS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
           "_scaled_dot_product_attention_math", "scaled_dot_product_attention", "einsum", "addbmm", "dot", "mv"}
LAYER_NORMS = {"native_layer_norm"}
BATCH_NORMS = {"_native_batch_norm_legit_no_training", "native_batch_norm", "_native_batch_norm_legit",
               "batch_norm", "_batch_norm_impl_index"}
LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class Place:
    """Where a channel can live: rows ('out') or columns ('in') of a Linear/Conv, the channels of a norm ('out'),
    or the last dim of a bare parameter or buffer `param` of `module` ('last')."""

    module: nn.Module
    axis: str
    param: str = "weight"

    def __hash__(self) -> int:
        return hash((id(self.module), self.axis, self.param))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Place) and (self.module is other.module and self.axis == other.axis
                                             and self.param == other.param)


@dataclass
class Couplings:
    """The channel classes of one forward: `members[c]` is class c's indices per place; `sizes` every place's
    length; classes in `summed` were tied by an addition (a residual stream), those in `dropped` touch something
    that cannot be pruned (the model's output, a grouped conv, a parameter tied along a dim other than its last)."""

    members: list[dict[Place, list[int]]]
    sizes: dict[Place, int]
    summed: set[int] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)
    order: dict[Place, int] = field(default_factory=dict)  # places in the order the forward met them


class _UnionFind:
    """Channel slots and the classes they are tied into (a parent per slot; roots are the smallest id)."""

    def __init__(self) -> None:
        self.parent = torch.zeros(0, dtype=torch.long)
        self.size = 0

    def new(self, n: int) -> torch.Tensor:
        ids = torch.arange(self.size, self.size + n)
        if self.size + n > len(self.parent):
            grown = torch.arange(max(2 * len(self.parent), self.size + n))
            grown[:self.size] = self.parent[:self.size]
            self.parent = grown
        self.size += n
        return ids

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        roots = self.parent[ids]
        while True:
            up = self.parent[roots]
            if torch.equal(up, roots):
                return roots
            roots = up

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.flatten(), b.flatten()
        both = (a >= 0) & (b >= 0)
        if not both.any():
            return
        self.compress()
        keys = torch.unique(a[both] * self.size + b[both])  # distinct pairs, as one number each
        a, b = keys // self.size, keys % self.size
        while True:  # hook each larger root under the smallest root it meets, then flatten; until all agree
            ra, rb = self.parent[a], self.parent[b]
            differ = ra != rb
            if not differ.any():
                return
            lo, hi = torch.minimum(ra, rb)[differ], torch.maximum(ra, rb)[differ]
            self.parent.scatter_reduce_(0, hi, lo, reduce="amin")
            self.compress()

    def compress(self) -> None:
        """Point every slot at its root (pointer jumping), so that later finds take one step."""
        parent = self.parent[:self.size]
        while True:
            up = parent[parent]
            if torch.equal(up, parent):
                break
            parent = up
        self.parent[:self.size] = parent


class _Tracer(TorchDispatchMode):
    """Follows the labels through every aten op of a forward (Linear and Conv layers through module hooks)."""

    def __init__(self, model: nn.Module, attention_modules: set[int]):
        super().__init__()
        self.model = model
        self.inside_attention = attention_modules  # ids of the modules inside split attentions
        self.labels = WeakTensorKeyDictionary()
        self.uf = _UnionFind()
        self.place_slots: dict[Place, torch.Tensor] = {}
        self.summed: list[torch.Tensor] = []
        self.unprunable: set[Place] = set()
        self.owner = {}
        for module in model.modules():
            for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
                if tensor is not None:
                    self.owner.setdefault(id(tensor), (module, name))
        self.stack: list[nn.Module] = []
        self.leaf_depth = 0

    # --- slots and labels ---------------------------------------------------------------------------------------
    def slots(self, place: Place, n: int) -> torch.Tensor:
        """The slot ids of `place` (created on first use)."""
        if place not in self.place_slots:
            self.place_slots[place] = self.uf.new(n)
        return self.place_slots[place]

    def label(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return None
        found = self.labels.get(t)
        if found is None and id(t) in self.owner:  # a bare parameter or buffer: one slot per element
            module, name = self.owner[id(t)]
            found = self.slots(Place(module, "elem", name), t.numel()).view(t.shape)
            self.labels[t] = found
        return found

    def store(self, data: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep `labels` for `data`, laid out in memory as `data` is, so that views of the two agree."""
        if labels.stride() != data.stride() and is_non_overlapping_and_dense(data):
            labels = torch.empty_strided(data.shape, data.stride(), dtype=torch.long).copy_(labels)
        self.labels[data] = labels

    def label_or_none(self, t: torch.Tensor) -> torch.Tensor:
        found = self.label(t)
        return found if found is not None else torch.full(t.shape, -1, dtype=torch.long)

    def tie_along(self, labels: torch.Tensor, dim: int, slots: torch.Tensor) -> None:
        """Tie every element of `labels` at index i of `dim` to slot i."""
        shape = [1] * labels.dim()
        shape[dim] = -1
        self.uf.union(labels, slots.view(shape).expand_as(labels))

    def running(self) -> Optional[nn.Module]:
        return self.stack[-1] if self.stack else None

    def refuse(self, what: str) -> None:
        names = {m: n for n, m in self.model.named_modules()}
        module = self.running()
        where = f"{names.get(module, '?')} ({type(module).__name__})" if module is not None else "the model"
        raise UnsupportedModelError(f"{where}: the pruner cannot follow channels through {what}")

    # --- leaf layers --------------------------------------------------------------------------------------------
    def enter(self, module: nn.Module, args: tuple) -> None:
        self.stack.append(module)
        if isinstance(module, LEAVES):
            if self.leaf_depth == 0 and args and isinstance(args[0], torch.Tensor):
                labels = self.label(args[0])
                axis = -1 if isinstance(module, nn.Linear) else 1
                depthwise = not isinstance(module, nn.Linear) and module.groups == module.in_channels > 1 \
                    and module.out_channels == module.in_channels
                if labels is not None:
                    width = labels.shape[axis]
                    place = Place(module, "out" if depthwise else "in")
                    self.tie_along(labels, axis, self.slots(place, width))
                if not isinstance(module, nn.Linear) and module.groups > 1 and not depthwise:
                    self.unprunable |= {Place(module, "in"), Place(module, "out")}
            self.leaf_depth += 1

    def leave(self, module: nn.Module, output: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        if isinstance(module, LEAVES):
            self.leaf_depth -= 1
            if self.leaf_depth == 0 and isinstance(output, torch.Tensor):
                axis = -1 if isinstance(module, nn.Linear) else 1
                width = output.shape[axis]
                slots = self.slots(Place(module, "out"), width)
                shape = [1] * output.dim()
                shape[axis] = width
                self.store(output, slots.view(shape).expand(output.shape).clone())

    # --- ops ----------------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.leaf_depth == 0:
            self.follow(func, args, kwargs, out)
        return out

    def follow(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        name = func.overloadpacket.__name__
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        labelled = [self.label(t) for t in inputs]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if all(lab is None for lab in labelled) or not outputs:
            return
        inside = self.running() is not None and id(self.running()) in self.inside_attention
        if name in MOVES:
            self.move(func, args, kwargs, out)
        elif torch.Tag.pointwise in func.tags or name in ELEMENTWISE:
            self.elementwise(name, inputs, labelled, outputs, func)
        elif name in LAYER_NORMS:
            self.norm(args[0], outputs[0], -1, args[2:4], nn.LayerNorm, len(args[1]))
        elif name in BATCH_NORMS:
            self.norm(args[0], outputs[0], 1, args[1:5], nn.modules.batchnorm._BatchNorm, 1)
        elif name in REDUCTIONS:
            self.reduce(func, args, kwargs, outputs)
        elif name in POOLS:
            self.pool(labelled[0], outputs)
        elif inside:
            return  # the attention's matmuls (and what else runs between them) end the labels: its Q/K and V
            # groups are its own
        elif name in MATMULS:
            self.refuse(f"a matmul ({name}) outside an attention")
        else:
            self.refuse(f"{name}")

    def move(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        name = func.overloadpacket.__name__
        if name in ("fill_", "zero_"):
            self.store(args[0], torch.full(args[0].shape, -1, dtype=torch.long))
            return

        def swap(a: Any) -> Any:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                if func._schema.is_mutable and a is args[0] and self.label(a) is None:
                    self.store(a, torch.full(a.shape, -1, dtype=torch.long))
                return self.label_or_none(a)
            return a

        new_args, new_kwargs = tree_map(swap, args), tree_map(swap, kwargs)
        if name == "constant_pad_nd":
            new_args = (new_args[0], new_args[1], -1)
        try:
            moved = func(*new_args, **new_kwargs)
        except RuntimeError:
            if name not in ("view", "_unsafe_view"):
                raise
            moved = new_args[0].reshape(new_args[1])  # labels laid out otherwise than the data: the same view
        for data, labels in zip(tree_flatten(out)[0], tree_flatten(moved)[0]):
            if isinstance(data, torch.Tensor) and data.is_floating_point() and data is not args[0]:
                self.labels[data] = labels

    def elementwise(self, name: str, inputs: list, labelled: list, outputs: list, func) -> None:
        shape = outputs[0].shape
        tied = [lab.expand(shape) if lab.shape != shape else lab for t, lab in zip(inputs, labelled)
                if lab is not None and t.numel() > 1 and _broadcasts(lab.shape, shape)]
        if not tied:
            for t in outputs:
                if t.shape == shape:
                    self.store(t, torch.full(shape, -1, dtype=torch.long))
            return
        combined = tied[0]
        for other in tied[1:]:
            self.uf.union(combined, other)
            combined = torch.where(combined >= 0, combined, other)
        if name in SUMS and len(tied) > 1:
            self.summed.append(combined.flatten())
        if func._schema.is_mutable:
            target = self.labels.get(inputs[0])
            if target is not None and target.shape == shape:
                target.copy_(combined)
                return
        for t in outputs:
            if t.shape == shape:
                self.store(t, combined.clone())

    def norm(self, x: torch.Tensor, out: torch.Tensor, axis: int, params: tuple, kind: type, dims: int) -> None:
        """A norm scales channels one by one: its output keeps the input's labels, which are tied to the norm's
        channels (a norm module's, or the parameters' own slots for a norm written as a function)."""
        labels = self.label(x)
        if labels is None:
            return
        self.store(out, labels)
        module = self.running()
        if dims != 1:
            self.refuse("a norm over several dims")
        width = x.shape[axis]
        if isinstance(module, kind):
            self.tie_along(labels, axis, self.slots(Place(module, "out"), width))
        else:
            for p in params:
                p_labels = self.label(p) if isinstance(p, torch.Tensor) else None
                if p_labels is not None:
                    self.tie_along(labels, axis, p_labels.flatten())

    def reduce(self, func, args: tuple, kwargs: dict, outputs: list) -> None:
        """A reduction keeps a label where everything it reduces carries the same one (pooling tokens); across
        channels (a norm's statistics) it gives none."""
        bound = _bind(func, args, kwargs)
        labels = self.label_or_none(args[0])
        dim = bound.get("dim")
        dims = list(range(labels.dim())) if dim is None or dim == [] else ([dim] if isinstance(dim, int) else dim)
        keep = bool(bound.get("keepdim", False))
        roots = self.uf.find(labels.clamp(min=0))
        roots = torch.where(labels >= 0, roots, -1)
        if not dims:
            lo = hi = roots
        else:
            lo, hi = roots.amin(dim=dims, keepdim=keep), roots.amax(dim=dims, keepdim=keep)
        result = torch.where(lo == hi, lo, -1)
        for t in outputs:
            if t.shape == result.shape:
                self.store(t, result.clone())

    def pool(self, labels: torch.Tensor, outputs: list) -> None:
        """Spatial pooling or resizing (channels at dim 1): a channel keeps its label where all its positions
        carry it."""
        roots = torch.where(labels >= 0, self.uf.find(labels.clamp(min=0)), -1).flatten(2)
        lo, hi = roots.amin(-1), roots.amax(-1)
        per_channel = torch.where(lo == hi, lo, -1)
        for t in outputs:
            self.store(t, per_channel.view(*per_channel.shape, *[1] * (t.dim() - 2)).expand(t.shape).clone())

    # --- the result ---------------------------------------------------------------------------------------------
    def couplings(self, output: Any) -> Couplings:
        total = self.uf.size
        roots = self.uf.find(torch.arange(total))
        summed = torch.zeros(total, dtype=torch.bool)
        for ids in self.summed:
            summed[roots[ids[ids >= 0]]] = True
        out_roots = set()
        for t in tree_flatten(output)[0]:
            labels = self.labels.get(t) if isinstance(t, torch.Tensor) else None
            if labels is not None:
                out_roots |= set(roots[labels[labels >= 0]].unique().tolist())
        members: dict[int, dict[Place, list[int]]] = defaultdict(lambda: defaultdict(list))
        sizes, order, bad_roots = {}, {}, set()
        for place, slot_ids in self.place_slots.items():
            ids = roots[slot_ids]
            if place.axis == "elem":
                place, ids = self._parameter_place(place, ids, bad_roots)
                if place is None:
                    continue
            order.setdefault(place, len(order))
            sizes[place] = len(ids)
            for index, root in enumerate(ids.tolist()):
                members[root][place].append(index)
            if place in self.unprunable:
                bad_roots |= set(ids.tolist())
        classes = list(members)
        index = {root: i for i, root in enumerate(classes)}
        return Couplings(
            members=[{p: sorted(set(v)) for p, v in members[r].items()} for r in classes], sizes=sizes,
            summed={index[r] for r in classes if summed[r]},
            dropped={index[r] for r in classes if r in out_roots or r in bad_roots}, order=order)

    def _parameter_place(self, place: Place, ids: torch.Tensor, bad_roots: set) -> tuple[Optional[Place], Any]:
        """A bare parameter's (or buffer's) per-element classes as channels of its last dim: a norm module's
        weight, bias and running stats are the norm's channels; when one channel's entries fall in several
        classes (tied along another dim) the parameter cannot be pruned."""
        module, name = place.module, place.param
        tensor = getattr(module, name)
        per_element = ids.view(tensor.shape) if tensor.dim() else ids.view(1)
        columns = per_element.reshape(-1, per_element.shape[-1])
        if not torch.equal(columns, columns[:1].expand_as(columns)):
            bad_roots |= set(ids.tolist())
            return None, None
        if isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)) and tensor.dim() == 1:
            return Place(module, "out"), columns[0]
        return Place(module, "last", name), columns[0]


def _broadcasts(shape: torch.Size, target: torch.Size) -> bool:
    """Whether `shape` broadcasts to `target` without being spread along a dim where it has more than one entry
    (any broadcast of a per-channel tensor over tokens is fine)."""
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def _bind(func, args: tuple, kwargs: dict) -> dict:
    names = [a.name for a in func._schema.arguments]
    bound = {a.name: a.default_value for a in func._schema.arguments if a.has_default_value()}
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


@contextlib.contextmanager
def _hooked(tracer: _Tracer, model: nn.Module) -> Iterator[None]:
    handles = []
    try:
        def enter(module: nn.Module, args: tuple) -> None:
            with _disable_current_modes():  # the labels' own ops are not the model's
                tracer.enter(module, args)

        def leave(module: nn.Module, args: tuple, output: Any) -> None:
            with _disable_current_modes():
                tracer.leave(module, output)

        for module in model.modules():
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def trace_couplings(model: nn.Module, example: torch.Tensor, attention_modules: set[int]) -> Couplings:
    """The channel classes of `model` from one forward of `example` (`attention_modules`: ids of the modules
    inside split attentions, whose matmuls end the labels)."""
    tracer = _Tracer(model, attention_modules)
    with torch.no_grad(), _hooked(tracer, model), tracer:
        output = model(example)
    return tracer.couplings(output)
