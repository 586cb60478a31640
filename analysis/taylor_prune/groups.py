"""The group model: where a group's channels live (Slice), the channels pruned together (Group), and their removal
from every layer they live in (`prune_channels`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch.nn as nn
import torch_pruning as tp
from timm.layers import LayerScale



@dataclass
class Slice:
    """Where `count` consecutive channels of a group, starting at group channel `first`, live in one layer:
    weight rows (axis 'out': Linear/Conv outputs, norm channels) or columns (axis 'in': Linear/Conv inputs) from
    index `offset`, or (axis 'last') the last dimension of the bare parameter `param` of `layer`."""

    layer: nn.Module
    axis: str
    offset: int
    first: int
    count: int
    param: str = "weight"


def whole(width: int, entries: Iterable[tuple[nn.Module, str]]) -> list[Slice]:
    """Slices holding all `width` channels of a group in each (layer, axis); layers that are absent (Identity,
    None) are skipped; a LayerScale's gamma is a bare parameter."""
    slices = []
    for layer, axis in entries:
        if isinstance(layer, LayerScale):
            slices.append(Slice(layer, "last", 0, 0, width, param="gamma"))
        elif isinstance(layer, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            slices.append(Slice(layer, axis, 0, 0, width))
    return slices


def set_sizes(obj: object, **attributes: int) -> None:
    """Update the size attributes an object has (informational ones, e.g. timm's num_features)."""
    for name, value in attributes.items():
        if hasattr(obj, name):
            setattr(obj, name, value)


@dataclass
class Group:
    """Channels pruned together (one Q/K, V, FFN-hidden or width group), in `heads` equal parts.

    `layout()` gives the group's slices from the layers' current sizes; `on_prune(n)` updates the owning
    module after n channels per head were removed. A group with `prunable=False` is only reported."""

    kind: str                                # qk | v | ffn | width (the residual stream)
    block: str                               # module name of the block (of the stage, for a width group)
    stage: int
    heads: int
    width: Callable[[], int]                 # the block's current input width
    layout: Callable[[], list[Slice]]
    count: Callable[[], int]
    on_prune: Callable[[int], None] = lambda removed_per_head: None
    attention: Optional[nn.Module] = None    # where q @ k^T and attn @ v run (qk and v groups; an evit stage
                                             # width: the stage's first CGA mixer, see `matmuls`)
    matmuls: int = 1                         # attention matmuls one channel sits in: an evit stage-width channel
                                             # is one V dim of every CGA mixer of the stage (same tokens and keys)
    dims: int = 1                            # model dims one channel holds (2: an EVA rotary Q/K pair)
    prunable: bool = True
    original: int = 0                        # channels before pruning
    in_dim_before: int = 0                   # the block's input width before pruning
    positions: dict = field(default_factory=dict)  # layer -> output positions per image (measured)
    tokens: float = 0.0                      # queries per image at the attention (measured)
    keys: float = 0.0                        # keys each query attends to (N for ViT, the window area otherwise)

    @property
    def channels(self) -> int:
        return self.count()

    def macs_per_channel(self) -> float:
        """MACs per image one channel costs: its rows and columns in the layers at their token counts, and its
        share of the attention matmuls (q @ k^T for a Q/K channel, attn @ v for a V channel or, through the
        cascade, an evit CGA stage's width channel); tokens stay 0 for groups without an attention."""
        layers = sum(s.count * fan(s.layer, s.axis) * self.positions.get(s.layer, 0.0) for s in self.layout())
        return layers / max(self.channels, 1) + self.tokens * self.keys * self.matmuls


def fan(layer: nn.Module, axis: str) -> float:
    """Multiply-adds per output position for one output row ('out') or one input column ('in') of a layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features if axis == "out" else layer.out_features
    if isinstance(layer, nn.Conv2d):
        kernel = math.prod(layer.kernel_size)
        return kernel * layer.in_channels // layer.groups if axis == "out" else kernel * layer.out_channels
    return 0.0  # norms, bare parameters


def stage_of(name: str) -> int:
    """The stage of a block from its module name: layers.<s>..., stages.<s>..., or blocks.<s>.<i> (Twins' nested
    stages); 0 for a single-stage model's blocks.<i>."""
    parts = name.split(".")
    nested = parts[0] == "blocks" and len(parts) > 2 and parts[2].isdigit()
    return int(parts[1]) if parts[0] in ("layers", "stages") or nested else 0


def _cut_last(layer: nn.Module, names: Sequence[str], drop: Sequence[int]) -> None:
    """Remove indices `drop` from the last dimension of the parameters or buffers `names` of `layer` (those
    present); a buffer stays a buffer."""
    for name in names:
        old = getattr(layer, name, None)
        if old is not None:
            kept = old.data[..., [i for i in range(old.shape[-1]) if i not in set(drop)]].clone()
            if name in layer._buffers:
                layer._buffers[name] = kept
            else:
                setattr(layer, name, nn.Parameter(kept, requires_grad=old.requires_grad))


def prune_channels(group: Group, idxs: list[int]) -> None:
    """Remove the group's channels `idxs` from every layer (torch-pruning's layer pruners for Linear, Conv and
    BatchNorm; norms' and bare parameters' channels cut here: tp 1.6.1's LayerNorm pruner sorts a tensor out of
    place and so can reorder the channels it keeps)."""
    rows: dict[tuple[int, str, str], tuple[nn.Module, list[int]]] = {}
    for s in group.layout():
        picked = [s.offset + c - s.first for c in idxs if s.first <= c < s.first + s.count]
        rows.setdefault((id(s.layer), s.axis, s.param), (s.layer, []))[1].extend(picked)
    for (_, axis, param), (layer, picked) in rows.items():
        picked = sorted(set(picked))
        if axis == "last":
            _cut_last(layer, [param], picked)
        elif isinstance(layer, nn.LayerNorm):
            _cut_last(layer, ["weight", "bias"], picked)
            layer.normalized_shape = (layer.normalized_shape[-1] - len(picked),)
        elif isinstance(layer, nn.Linear):
            (tp.prune_linear_out_channels if axis == "out" else tp.prune_linear_in_channels)(layer, picked)
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):  # evit's BatchNorm2d, its head's BatchNorm1d
            tp.prune_batchnorm_out_channels(layer, picked)
        elif layer.groups == layer.in_channels and layer.groups > 1:  # depthwise: in, out and groups together
            tp.prune_depthwise_conv_out_channels(layer, picked)
        else:
            (tp.prune_conv_out_channels if axis == "out" else tp.prune_conv_in_channels)(layer, picked)
    group.on_prune(len(idxs) // group.heads)
