"""Taylor structured pruning (paper Fig. 5): which channels a trained ViT keeps, per block, and the EfficientViT
channel allocation that follows from it.

    python -m analysis.taylor_prune --model deit_proxy                 # trained proxy, prune to 50% of MACs
    python -m analysis.taylor_prune --model swin_proxy --target-macs 0.6 --finetune-epochs 1
    python -m analysis.taylor_prune --model deit_tiny --data imagefolder:/data/imagenet   # hub weights

Importance (Molchanov et al., CVPR 2019): the first-order Taylor estimate |w * dL/dw| of every weight, with
gradients accumulated over real data batches, summed per channel in each layer the channel lives in, reduced over
those layers and normalized per group exactly as torch-pruning's GroupTaylorImportance(bias=True) does (same
`--normalizer` / `--reduction` names and formulas; a test checks it), except that norm layers' affine weights and
bare parameters (class token, position embedding, LayerScale) count too.

Groups (pruned separately): per block Q/K, V and FFN hidden, and the residual-stream width (a ViT's embedding
width; each Swin stage's width, through PatchMerging, which concatenates 2x2 neighbours so stage channel c sits at
c, C+c, 2C+c, 3C+c of the merge's norm and reduction; each EfficientViT stage's width, see below). torch-pruning's
dependency graph cannot give these groups (it treats q @ k^T like an element-wise op and ties Q/K to V, see
../shared/paper/FACTS.md), so the groups are listed here explicitly and torch-pruning's layer pruners do the
surgery. timm's fused qkv is split into q, k, v Linears first (the same function, checked by a test); q @ k^T keeps
the model's original softmax scale, so removing channels that carry nothing leaves the output unchanged. A unit of
a Q/K or V group is one dim of every head (heads stay equal); of an FFN or width group, one channel (of every
chunk, for an evit CGA stage). Each step recomputes the gradients, ranks all units of all groups globally by
normalized importance, and removes the lowest until the step's MAC goal is met (MACs per unit measured at the
layers' real token counts), never below a floor per group (global pruning would otherwise empty or, in
torch-pruning, silently skip a group). The MAC counter adds q @ k^T and attn @ v at their pruned widths to the
Linear/Conv MACs.

EfficientViT (evit_m0.., evit_m0_proxy.., evit config files; BatchNorm only): per block a Q/K group (each head's
Q and K rows of its qkv Conv-BN and its depthwise Q Conv-BN; all heads lose the same dims, `key_dim` follows and
the softmax scale stays the original), one FFN-hidden group per FFN of the sandwich and, for MHSA mixers, a V
group (`val_dim` follows); and per stage a width group (its embed_dim): the patch embedding's last Conv-BN or the
stage's Subsample output (merge output, FFN pair after the merge), every block's depthwise convs (rows and groups),
FFN inputs and outputs, mixer input and projection output, and the readers after the stage (the next Subsample's
FFN pair before its merge and the merge's first conv, or the classifier heads' BatchNorm1d and Linear). Cascaded
group attention has no V group: head i's output is added to head i+1's input chunk, so V dim = C / heads follows the
stage width. A CGA stage's width unit is one channel of every chunk (chunks stay equal); channel j of chunk h is
also row j of head h-1's V and the proj column reading it, and chunk 0's is the last head's (a convention: the proj
reads all heads' V). BatchNorm is per channel, so removing stream channels that carry nothing leaves the output
unchanged (a test checks it). The Subsample FFN hidden widths, the merges' expansion and the patch embedding's
inner convs are not pruned, so at small inputs a low MAC target can be out of reach: the groups then end at their
floor (said on stderr).

Outputs (folder --out, default results/taylor_prune): <model>.csv (one row per block: Q/K, V and FFN-hidden
widths relative to the block's input width, before and after, with MACs and params), <model>_stages.csv,
<model>_summary.csv (MACs, params, accuracy before/after, normalizer, reduction), <model>.png (Fig. 5 style) and
<model>_allocation.yaml, an EfficientViT config built from the kept ratios at a preset's FLOPs
(`python -m experiments.family --models evit_m0,<that yaml>` trains and times both).
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from timm.layers import Mlp
from torch.utils.data import Dataset

from evit import EfficientViTConfig, get_preset
from evit.io import save_figure, write_csv
from experiments.train import USER_ERRORS
from experiments.zoo import PROXY_RECIPES, WeightsUnavailableError, load_model

DEFAULT_OUT = "results/taylor_prune"
NORMALIZERS = ("mean", "max", "sum", "none")   # torch-pruning's normalizer names ('none' is its None)
REDUCTIONS = ("sum", "mean", "max")            # torch-pruning's group_reduction names
KINDS = {"qk": "Q/K", "v": "V", "ffn": "FFN hidden"}
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


class UnsupportedModelError(ValueError):
    """A model whose attention blocks this analysis cannot split (the message lists what is supported)."""


# --- a prunable attention ---------------------------------------------------------------------------------------

class SplitAttention(nn.Module):
    """timm's Attention / Swin WindowAttention with separate q, k, v projections, so that Q/K and V are separate
    pruning groups and each head's Q/K and V dims can shrink. The softmax scale stays the original one, so
    pruned channels whose weights are zero leave the output unchanged."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        qkv = attn.qkv
        width = qkv.out_features // 3
        self.q, self.k, self.v = (nn.Linear(qkv.in_features, width, bias=qkv.bias is not None,
                                            device=qkv.weight.device, dtype=qkv.weight.dtype) for _ in range(3))
        with torch.no_grad():
            for i, layer in enumerate((self.q, self.k, self.v)):
                layer.weight.copy_(qkv.weight[i * width:(i + 1) * width])
                if qkv.bias is not None:
                    layer.bias.copy_(qkv.bias[i * width:(i + 1) * width])
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop
        # Swin: keep the module that owns the relative-position bias (a table per head; heads are never pruned),
        # without its qkv and proj, whose weights now live here.
        self.bias_owner = None
        if hasattr(attn, "relative_position_bias_table"):
            del attn.qkv
            attn.proj = None
            self.bias_owner = attn

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.bias_owner is not None:
            attn = attn + self.bias_owner._get_rel_pos_bias()
            if mask is not None:  # Swin's shifted-window mask, (num_windows, N, N)
                windows = mask.shape[0]
                attn = attn.view(-1, windows, self.num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, tokens, tokens)
        elif attn_mask is not None:
            attn = attn + attn_mask
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(out))


# --- pruning groups ---------------------------------------------------------------------------------------------

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


def _whole(width: int, entries: Iterable[tuple[nn.Module, str]]) -> list[Slice]:
    """Slices holding all `width` channels of a group in each (layer, axis); layers that are absent (Identity,
    None) are skipped; a LayerScale's gamma is a bare parameter."""
    from timm.layers import LayerScale

    slices = []
    for layer, axis in entries:
        if isinstance(layer, LayerScale):
            slices.append(Slice(layer, "last", 0, 0, width, param="gamma"))
        elif isinstance(layer, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            slices.append(Slice(layer, axis, 0, 0, width))
    return slices


def _set(obj: object, **attributes: int) -> None:
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
        layers = sum(s.count * _fan(s.layer, s.axis) * self.positions.get(s.layer, 0.0) for s in self.layout())
        return layers / max(self.channels, 1) + self.tokens * self.keys * self.matmuls


def _fan(layer: nn.Module, axis: str) -> float:
    """Multiply-adds per output position for one output row ('out') or one input column ('in') of a layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features if axis == "out" else layer.out_features
    if isinstance(layer, nn.Conv2d):
        kernel = math.prod(layer.kernel_size)
        return kernel * layer.in_channels // layer.groups if axis == "out" else kernel * layer.out_channels
    return 0.0  # norms, bare parameters


def _stage_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if parts[0] in ("layers", "stages") else 0


def _timm_groups(name: str, block: nn.Module) -> list[Group]:
    """timm ViT / Swin block: fused qkv split into q, k, v Linears; Q/K, V and FFN-hidden groups."""
    if not isinstance(block.attn, SplitAttention):
        attn = block.attn
        plain = all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
        if not hasattr(attn, "qkv") or not plain or getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"{name}.attn ({type(attn).__name__}) is not a plain fused-qkv attention")
        block.attn = SplitAttention(attn)
    attn, mlp = block.attn, block.mlp
    if not isinstance(mlp, Mlp) or not isinstance(mlp.norm, nn.Identity):
        raise UnsupportedModelError(f"{name}.mlp ({type(mlp).__name__}) is not a plain timm Mlp")
    common = dict(block=name, stage=_stage_of(name), width=lambda: attn.q.in_features)
    return [Group("qk", heads=attn.num_heads, attention=attn, count=lambda: attn.q.out_features,
                  layout=lambda: _whole(attn.q.out_features, [(attn.q, "out"), (attn.k, "out")]), **common),
            Group("v", heads=attn.num_heads, attention=attn, count=lambda: attn.v.out_features,
                  layout=lambda: _whole(attn.v.out_features, [(attn.v, "out"), (attn.proj, "in")]), **common),
            Group("ffn", heads=1, count=lambda: mlp.fc1.out_features,
                  layout=lambda: _whole(mlp.fc1.out_features, [(mlp.fc1, "out"), (mlp.fc2, "in")]), **common)]


def _block_stream(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """The layers of a (split) timm block that read or write the residual stream."""
    attn, mlp = block.attn, block.mlp
    return [(block.norm1, "out"), (attn.q, "in"), (attn.k, "in"), (attn.v, "in"), (attn.proj, "out"),
            (getattr(block, "ls1", None), "last"), (block.norm2, "out"), (mlp.fc1, "in"), (mlp.fc2, "out"),
            (getattr(block, "ls2", None), "last")]


def _vit_width_group(model: nn.Module) -> list[Group]:
    """The residual-stream width of a timm VisionTransformer: patch embedding outputs, class/register tokens and
    position embedding, every LayerNorm and LayerScale on the stream, every Linear reading or writing it. Pruning
    it changes the LayerNorms' statistics, so outputs move slightly even for channels that carry nothing."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer) or not isinstance(model.patch_embed.proj, nn.Conv2d):
        return []
    count = lambda: model.patch_embed.proj.out_channels  # noqa: E731

    def layout() -> list[Slice]:
        entries = [(model.patch_embed.proj, "out"), (model.patch_embed.norm, "out")]
        entries += [e for block in model.blocks for e in _block_stream(block)]
        entries += [(model.norm, "out"), (model.fc_norm, "out"), (model.head, "in")]
        return [Slice(model, "last", 0, 0, count(), param=p) for p in ("cls_token", "reg_token", "pos_embed")
                if getattr(model, p, None) is not None] + _whole(count(), entries)

    def resize(removed: int) -> None:
        _set(model, embed_dim=count(), num_features=count(), head_hidden_size=count())

    return [Group("width", block="embed", stage=0, heads=1, width=count, layout=layout, count=count,
                  on_prune=resize)]


def _swin_width_groups(model: nn.Module) -> list[Group]:
    """One residual-stream width per timm Swin stage: its input projection (patch embedding for stage 0, the
    stage's PatchMerging reduction rows otherwise), every block's LayerNorms and stream Linears, and its reader
    after the stage: the next PatchMerging (norm channels and reduction columns c, C+c, 2C+c, 3C+c, the 2x2
    neighbours being concatenated channel-wise), or the final norm and the classifier."""
    from timm.models.swin_transformer import PatchMerging, SwinTransformer

    if not isinstance(model, SwinTransformer):
        return []
    stages, groups = list(model.layers), []
    for s, stage in enumerate(stages):
        nxt = stages[s + 1].downsample if s + 1 < len(stages) else None
        if (s and not isinstance(stage.downsample, PatchMerging)) or (nxt is not None and not isinstance(
                nxt, PatchMerging)):
            raise UnsupportedModelError(f"layers.{s}: a Swin stage without timm's PatchMerging between stages")

        def count(stage: nn.Module = stage) -> int:
            return stage.blocks[0].norm1.normalized_shape[0]

        def layout(s: int = s, stage: nn.Module = stage, nxt: Optional[nn.Module] = nxt) -> list[Slice]:
            width = count(stage)
            entries = [(model.patch_embed.proj, "out"), (model.patch_embed.norm, "out")] if s == 0 else [
                (stage.downsample.reduction, "out")]
            entries += [e for block in stage.blocks for e in _block_stream(block)]
            if nxt is None:
                entries += [(model.norm, "out"), (model.head.fc, "in")]
            slices = _whole(width, entries)
            if nxt is not None:
                slices += [Slice(layer, axis, k * width, 0, width) for k in range(4)
                           for layer, axis in ((nxt.norm, "out"), (nxt.reduction, "in"))]
            return slices

        def resize(removed: int, s: int = s, stage: nn.Module = stage, nxt: Optional[nn.Module] = nxt) -> None:
            width = count(stage)
            for block in stage.blocks:
                _set(block, dim=width)
            if s:
                _set(stage.downsample, out_dim=width)
            if nxt is not None:
                _set(stages[s + 1], dim=width)
                _set(nxt, dim=width)
            else:
                _set(model, num_features=width, head_hidden_size=width)
                _set(model.head, in_features=width, num_features=width)

        groups.append(Group("width", block=f"layers.{s}", stage=s, heads=1, width=count, layout=layout,
                            count=count, on_prune=resize))
    return groups


def _conv_norm(module: nn.Module, axis: str, offset: int, first: int, count: int) -> list[Slice]:
    """Slices of an evit ConvNorm: the conv's rows or columns and, for outputs, the BatchNorm's channels."""
    slices = [Slice(module.conv, axis, offset, first, count)]
    return slices + [Slice(module.bn, "out", offset, first, count)] if axis == "out" else slices


def _require_batchnorm(name: str, module: nn.Module) -> None:
    """Reject evit modules with LayerNorms: a LayerNorm normalizes over channels, so removing one changes every
    other channel's output."""
    from evit.efficientvit import ConvNorm

    if not all(isinstance(m.bn, nn.BatchNorm2d) for m in module.modules() if isinstance(m, ConvNorm)):
        raise UnsupportedModelError(f"{name}: only BatchNorm evit blocks can be pruned (this one has LayerNorm)")


def _evit_groups(name: str, block: nn.Module) -> list[Group]:
    """evit block: both FFNs of the sandwich, and the mixer's Q/K (per head: the Q and K rows of the head's
    qkv conv and its depthwise Q conv) and V groups. Cascaded group attention's V width is fixed by the cascade
    (head i's output is added to head i+1's input split, so V = dim / heads): it has no group of its own (reported,
    not prunable) and shrinks only with its stage's width group (`_evit_width_groups`)."""
    from evit.efficientvit import CascadedGroupAttention, ConvMlp

    _require_batchnorm(name, block)
    ffns = [m.m for n, m in block.named_children() if n.startswith("ffn")]
    assert all(isinstance(f, ConvMlp) for f in ffns), name
    if not ffns and block.mixer_type == "none":
        return []  # an empty block (or DWConv only): nothing to prune
    attn = block.mixer.m.attn if block.mixer_type != "none" else None  # Residual -> WindowAttention -> CGA/MHSA

    def width() -> int:
        return ffns[0].pw1.conv.in_channels if ffns else attn.proj[1].conv.out_channels

    common = dict(block=name, stage=_stage_of(name), width=width)
    groups = [Group("ffn", heads=1, count=lambda f=f: f.pw1.conv.out_channels,
                    layout=lambda f=f: _conv_norm(f.pw1, "out", 0, 0, f.pw1.conv.out_channels)
                    + _conv_norm(f.pw2, "in", 0, 0, f.pw1.conv.out_channels), **common) for f in ffns]
    if attn is None:
        return groups
    heads = attn.num_heads

    def shrink(field: str) -> Callable[[int], None]:
        return lambda removed: setattr(attn, field, getattr(attn, field) - removed)

    if isinstance(attn, CascadedGroupAttention):
        def qk_layout() -> list[Slice]:
            kd = attn.key_dim
            return [s for h in range(heads) for s in
                    _conv_norm(attn.qkvs[h], "out", 0, h * kd, kd) + _conv_norm(attn.qkvs[h], "out", kd, h * kd, kd)
                    + (_conv_norm(attn.dws[h], "out", 0, h * kd, kd) if hasattr(attn.dws[h], "conv") else [])]

        v = Group("v", heads=heads, attention=attn, layout=lambda: [], count=lambda: heads * attn.val_dim,
                  prunable=False, **common)
    else:  # MHSA: one qkv conv laid out as [Q of all heads | K of all heads | V of all heads]
        def qk_layout() -> list[Slice]:
            kd, qk = attn.key_dim, heads * attn.key_dim
            dws = [s for h in range(heads) for s in _conv_norm(attn.dws[h], "out", 0, h * kd, kd)] \
                if attn.dws is not None else []
            return _conv_norm(attn.qkv, "out", 0, 0, qk) + _conv_norm(attn.qkv, "out", qk, 0, qk) + dws

        def v_layout() -> list[Slice]:
            vd = heads * attn.val_dim
            return _conv_norm(attn.qkv, "out", 2 * heads * attn.key_dim, 0, vd) + [
                Slice(attn.proj[1].conv, "in", 0, 0, vd)]

        v = Group("v", heads=heads, attention=attn, layout=v_layout, count=lambda: heads * attn.val_dim,
                  on_prune=shrink("val_dim"), **common)
    qk = Group("qk", heads=heads, attention=attn, layout=qk_layout, count=lambda: heads * attn.key_dim,
               on_prune=shrink("key_dim"), **common)
    return [qk, v] + groups


def _cga_stream(attn: nn.Module, width: int) -> list[Slice]:
    """Where stream channel j of chunk h (group channel h*d + j, d = width / heads) lives in a cascaded group
    attention: column j of head h's qkv conv and, since the cascade adds head h-1's output to chunk h before head h
    reads it, row j of head h-1's V (conv and BN) and the proj column that reads that V row.

    Chunk 0 has no previous head; it takes head H-1's V row j and proj column. This tie is a convention, not forced
    by the cascade: the proj reads all heads' V outputs concatenated, H * d columns, so with chunks of d' channels
    every head's V must shrink to d' too, and head H-1's V (read by the proj alone) is the one no chunk feeds on."""
    heads, v_rows = attn.num_heads, 2 * attn.key_dim  # each head's qkv rows: [Q | K | V]
    d = width // heads
    slices = []
    for h in range(heads):
        prev = (h - 1) % heads  # the head whose V output enters chunk h (head H-1 for chunk 0: the convention)
        slices += [Slice(attn.qkvs[h].conv, "in", 0, h * d, d), *_conv_norm(attn.qkvs[prev], "out", v_rows, h * d, d),
                   Slice(attn.proj[1].conv, "in", prev * d, h * d, d)]
    return slices


def _evit_branches(module: nn.Module, width: int) -> list[Slice]:
    """Where the stream's channels live in every residual branch under `module` (a stage's blocks, or a Subsample
    pair at the stage's width): the token-interaction depthwise Conv-BN's rows (one row per channel), an FFN's pw1
    columns and pw2 rows, a mixer's input (MHSA: qkv columns, every head reads every channel; CGA: `_cga_stream`)
    and its output projection's rows."""
    from evit.efficientvit import CascadedGroupAttention, ConvMlp, ConvNorm, Residual

    slices = []
    for residual in (m for m in module.modules() if isinstance(m, Residual)):
        branch = residual.m
        if isinstance(branch, ConvNorm):
            slices += _conv_norm(branch, "out", 0, 0, width)
        elif isinstance(branch, ConvMlp):
            slices += _conv_norm(branch.pw1, "in", 0, 0, width) + _conv_norm(branch.pw2, "out", 0, 0, width)
        else:
            attn = branch.attn  # WindowAttention -> CGA / MHSA
            reads = (_cga_stream(attn, width) if isinstance(attn, CascadedGroupAttention)
                     else _conv_norm(attn.qkv, "in", 0, 0, width))
            slices += reads + _conv_norm(attn.proj[1], "out", 0, 0, width)
    return slices


def _evit_stage_width(model: nn.Module, s: int) -> Group:
    """The width of evit stage s: its source (the patch embedding's last Conv-BN for stage 0, else the Subsample's
    patch merging output and its FFN pair after the merge), every block, and its readers after the stage: the next
    Subsample's FFN pair before the merge and the merge's first conv, or the classifier(s) (BatchNorm1d + Linear).
    CGA mixers split the stream into `heads` chunks, so a unit is one channel of every chunk (chunks stay equal)."""
    from evit.efficientvit import CascadedGroupAttention, NormLinear

    stages = list(model.stages)
    stage = stages[s]
    source = model.patch_embed[-1] if s == 0 else stage.downsample.patchmerge.conv3
    nxt = stages[s + 1].downsample if s + 1 < len(stages) else None
    cgas = [m for m in stage.blocks.modules() if isinstance(m, CascadedGroupAttention)]

    def count() -> int:
        return source.conv.out_channels

    def layout() -> list[Slice]:
        width = count()
        slices = _conv_norm(source, "out", 0, 0, width) + _evit_branches(stage.blocks, width)
        if s:
            slices += _evit_branches(stage.downsample.res2, width)
        if nxt is not None:
            return slices + _evit_branches(nxt.res1, width) + _conv_norm(nxt.patchmerge.conv1, "in", 0, 0, width)
        return slices + [Slice(layer, axis, 0, 0, width) for head in (model.head, model.head_dist)
                         if isinstance(head, NormLinear) for layer, axis in ((head.bn, "out"), (head.linear, "in"))]

    def resize(removed: int) -> None:
        width = count()
        for attn in cgas:
            attn.val_dim = width // attn.num_heads  # the cascade: V dim = chunk width
        model.feature_info[s]["num_chs"] = width
        if nxt is None:
            _set(model, num_features=width, head_hidden_size=width)

    return Group("width", block=f"stages.{s}", stage=s, heads=cgas[0].num_heads if cgas else 1, width=count,
                 layout=layout, count=count, on_prune=resize, attention=cgas[0] if cgas else None,
                 matmuls=len(cgas))


def _evit_width_groups(model: nn.Module) -> list[Group]:
    """One width group per stage of an evit EfficientViT (`_evit_stage_width`)."""
    from evit.efficientvit import EfficientViT

    if not isinstance(model, EfficientViT):
        return []
    _require_batchnorm(type(model).__name__, model)  # also the stem and transitions, which no block group covers
    return [_evit_stage_width(model, s) for s in range(len(model.stages))]


def prepare(model: nn.Module) -> list[Group]:
    """Split every timm attention's qkv (in place) and return the groups: Q/K, V and FFN hidden of every block,
    then the residual-stream width group(s) of a timm ViT / Swin / evit EfficientViT."""
    from evit.efficientvit import EfficientViTBlock

    groups: list[Group] = []
    for name, module in model.named_modules():
        if isinstance(module, EfficientViTBlock):
            groups += _evit_groups(name, module)
        elif hasattr(module, "attn") and hasattr(module, "mlp"):
            groups += _timm_groups(name, module)
    groups += _vit_width_group(model) + _swin_width_groups(model) + _evit_width_groups(model)
    if not groups:
        raise UnsupportedModelError(f"{type(model).__name__} has no prunable blocks; supported: timm "
                                    f"VisionTransformer (deit_*, vit_*, deit_proxy), SwinTransformer (swin_*, "
                                    f"swin_proxy) and evit models with BatchNorm (evit_m*, proxies, configs)")
    for group in groups:
        group.original, group.in_dim_before = group.channels, group.width()
    return groups


# --- MACs -------------------------------------------------------------------------------------------------------

def _forward_with_hooks(model: nn.Module, example: torch.Tensor, hooks: dict[nn.Module, Callable]) -> None:
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()


def _attention_modules() -> tuple[type, ...]:
    from evit.efficientvit import RelativeBiasAttention

    return SplitAttention, RelativeBiasAttention


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
                                         if isinstance(m, (nn.Linear, nn.Conv2d) + _attention_modules())})
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


# --- importance -------------------------------------------------------------------------------------------------

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
        entries = [score(param).reshape(-1, param.shape[-1]).sum(0)]
    else:
        weight = score(s.layer.weight)
        entries = [(weight.transpose(0, 1) if s.axis == "in" else weight).flatten(1).sum(1)
                   if weight.dim() > 1 else weight]
        bias = getattr(s.layer, "bias", None)
        if s.axis == "out" and bias is not None:
            entries.append(score(bias))
    return [e.detach()[s.offset:s.offset + s.count] for e in entries]


def channel_importance(group: Group, normalizer: str = "mean", reduction: str = "sum") -> torch.Tensor:
    """Taylor scores of the group's channels in each layer (weight and bias entries) they live in, reduced over
    those entries (a channel absent from a layer, e.g. another head's slice, is not counted there) and normalized
    within the group, so that groups of different sizes compete in one global ranking."""
    entries = []
    for s in group.layout():
        for scores in _taylor(s):
            row = torch.full((group.channels,), math.nan)
            row[s.first:s.first + s.count] = scores
            entries.append(row)
    per_entry = torch.stack(entries)
    if reduction == "sum":
        importance = per_entry.nansum(0)
    elif reduction == "mean":
        importance = per_entry.nanmean(0)
    else:
        importance = per_entry.nan_to_num(-math.inf).amax(0)
    if normalizer == "mean":
        importance = importance / importance.mean().clamp_min(1e-30)
    elif normalizer == "max":
        importance = importance / importance.max().clamp_min(1e-30)
    elif normalizer == "sum":
        importance = importance / importance.sum().clamp_min(1e-30)
    return importance


def _cut_last(layer: nn.Module, names: Sequence[str], drop: Sequence[int]) -> None:
    """Remove indices `drop` from the last dimension of the parameters `names` of `layer` (those present)."""
    for name in names:
        old = getattr(layer, name, None)
        if old is not None:
            keep = [i for i in range(old.shape[-1]) if i not in set(drop)]
            setattr(layer, name, nn.Parameter(old.data[..., keep].clone(), requires_grad=old.requires_grad))


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


def evaluate(model: nn.Module, batches: Batches) -> tuple[float, int]:
    """(top-1 accuracy in %, images): counted here, as served batches would be served again to count them."""
    correct = total = 0
    with torch.no_grad():
        for images, labels in batches:
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return 100.0 * correct / max(total, 1), total


def _params_by_block(model: nn.Module, blocks: Iterable[str]) -> dict[str, int]:
    return {b: sum(p.numel() for n, p in model.named_parameters() if n.startswith(b + ".")) for b in blocks}


def taylor_prune(model: nn.Module, batches: Batches, target_macs: float = 0.5, steps: int = 5,
                 normalizer: str = "mean", reduction: str = "sum", floor: float = 0.1,
                 val_batches: Batches = (), prune_width: bool = True) -> PruneResult:
    """Prune `model` (in place, eval mode) to `target_macs` of its MACs in `steps` Taylor steps; report per block.

    batches: (images, labels) used for the gradients (all of them, every step). normalizer / reduction: see
    NORMALIZERS / REDUCTIONS (torch-pruning's meanings). floor: fraction of each group's channels always kept.
    val_batches: accuracy before and after, when given. prune_width: include the residual-stream width groups.
    """
    if not 0 < target_macs < 1:
        raise ValueError(f"target_macs must lie in (0, 1), got {target_macs}")
    if normalizer not in NORMALIZERS or reduction not in REDUCTIONS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS} and reduction one of {REDUCTIONS}")
    model.eval()
    groups = prepare(model)
    if not prune_width:
        for group in groups:
            group.prunable &= group.kind != "width"
    example = batches[0][0][:1]
    measure_positions(model, groups, example)
    names = list(dict.fromkeys(g.block for g in groups if g.kind != "width"))
    macs_before, params_before = count_macs(model, example), _params_by_block(model, names)
    total_params_before = sum(p.numel() for p in model.parameters())
    acc_before, val_images = evaluate(model, val_batches) if val_batches else (None, 0)
    total_before = sum(macs_before.values())
    at_floor = False  # every prunable group down to its floor: nothing left to remove
    for step in range(1, steps + 1):
        goal = total_before * (1 - (1 - target_macs) * step / steps)
        # The savings of a unit are estimated alone; removing a width channel and a Q/K channel together saves
        # their shared weight once, not twice, so a step can fall short: it then tops up with fresh gradients.
        for _ in range(4):
            excess = sum(count_macs(model, example).values()) - goal
            if excess <= 0.002 * total_before or at_floor:
                break
            accumulate_gradients(model, batches)
            units = sorted((u for g in groups if g.prunable
                            for u in candidate_units(g, channel_importance(g, normalizer, reduction), floor)),
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
            for group in groups:
                if chosen.get(id(group)):
                    prune_channels(group, sorted(chosen[id(group)]))
            model.zero_grad(set_to_none=True)
    macs_after = count_macs(model, example)
    total_after = sum(macs_after.values())
    if total_after > (target_macs + 0.01) * total_before:
        reason = (f"the prunable groups are at their floor ({floor:g}), the rest of the model is not pruned"
                  if at_floor else "raise --steps")
        print(f"note: MAC target {target_macs:.2f} not reached ({total_after / total_before:.3f} kept): {reason}",
              file=sys.stderr)
    blocks = block_table(groups, macs_before, macs_after, params_before, _params_by_block(model, names))
    summary = dict(macs_before_m=total_before / 1e6, macs_after_m=total_after / 1e6,
                   macs_kept=total_after / total_before, params_before_m=total_params_before / 1e6,
                   params_after_m=sum(p.numel() for p in model.parameters()) / 1e6, target_macs=target_macs,
                   steps=steps, normalizer=normalizer, reduction=reduction, floor=floor,
                   width_pruned=any(g.kind == "width" and g.prunable for g in groups),
                   gradient_images=sum(len(labels) for _, labels in batches),
                   val_images=val_images, acc_before=acc_before,
                   acc_after=evaluate(model, val_batches)[0] if val_batches else None)
    return PruneResult(blocks, stage_table(blocks), summary, model)


def block_table(groups: Sequence[Group], macs_before: dict[str, float], macs_after: dict[str, float],
                params_before: dict[str, int], params_after: dict[str, int]) -> pd.DataFrame:
    """One row per block: the block's input width before and after (the residual stream, if pruned) and their
    ratio (width_kept), and per group kind the channels before and after (an evit sandwich's two FFNs summed),
    their ratio to the input width (per FFN) before and after, the kept fraction, and the block's MACs and params."""
    rows: dict[str, dict] = {}
    for group in (g for g in groups if g.kind != "width"):
        row = rows.setdefault(group.block, dict(block=len(rows), name=group.block, stage=group.stage, heads=1,
                                                in_dim_before=group.in_dim_before, in_dim=group.width()))
        if group.kind != "ffn":
            row["heads"] = group.heads
        kind = group.kind
        n = row[f"_{kind}_groups"] = row.get(f"_{kind}_groups", 0) + 1
        row[f"{kind}_dim_before"] = row.get(f"{kind}_dim_before", 0) + group.original
        row[f"{kind}_dim"] = row.get(f"{kind}_dim", 0) + group.channels
        row[f"{kind}_ratio_before"] = row[f"{kind}_dim_before"] / (n * row["in_dim_before"])
        row[f"{kind}_ratio"] = row[f"{kind}_dim"] / (n * row["in_dim"])
        row[f"{kind}_kept"] = row[f"{kind}_dim"] / row[f"{kind}_dim_before"]
    for name, row in rows.items():
        row["width_kept"] = row["in_dim"] / row["in_dim_before"]
        prefix = name + "."
        row["macs_before_m"] = sum(v for k, v in macs_before.items() if k.startswith(prefix)) / 1e6
        row["macs_after_m"] = sum(v for k, v in macs_after.items() if k.startswith(prefix)) / 1e6
        row["params_before_m"], row["params_after_m"] = params_before[name] / 1e6, params_after[name] / 1e6
    df = pd.DataFrame(rows.values())
    for kind in KINDS:  # blocks without attention (evit 'none' mixers) leave NaN; keep the columns regardless
        for suffix in ("dim_before", "dim", "ratio_before", "ratio", "kept"):
            if f"{kind}_{suffix}" not in df:
                df[f"{kind}_{suffix}"] = math.nan
    return df.loc[:, ~df.columns.str.startswith("_")]


def stage_table(blocks: pd.DataFrame) -> pd.DataFrame:
    """One row per stage: input width before and after, mean ratios and kept fractions over its blocks, and the
    MACs and params of its blocks (the stage transitions not included)."""
    means = {c: (c, "mean") for k in KINDS for c in (f"{k}_ratio", f"{k}_kept")}
    df = blocks.groupby("stage", as_index=False).agg(
        blocks=("block", "count"), in_dim_before=("in_dim_before", "first"), in_dim=("in_dim", "first"), **means,
        macs_before_m=("macs_before_m", "sum"), macs_after_m=("macs_after_m", "sum"),
        params_before_m=("params_before_m", "sum"), params_after_m=("params_after_m", "sum"))
    df.insert(4, "width_kept", df.in_dim / df.in_dim_before)
    return df


# --- findings -> builder ------------------------------------------------------------------------------------------

def allocation_config(blocks: pd.DataFrame, preset: str = "m0", match_flops: bool = True,
                      name: str = "taylor_allocation", mixer: str = "cga",
                      attention_share: Optional[float] = None) -> EfficientViTConfig:
    """An EfficientViT config from a pruned model's block table. The blocks are cut into as many consecutive
    parts as the preset has stages (early, middle, late); each part's means set that stage's
    - width: the preset's width times the kept input width (width_kept; 1 without that column),
    - Q/K dim per head: qk_ratio * width / heads, FFN ratio: ffn_ratio,
    - V: mixer 'cga' keeps V = width / heads (the cascade needs it; the paper's finding that V stays close to the
      input width agrees), mixer 'mhsa' takes v_ratio (MHSA allows any V dim).
    attention_share (the MHSA-proportion study's finding, Fig. 3): attention in that share of the blocks, evenly
    spaced and ending at the last one (analysis.mhsa_ratio.attention_blocks), the others mixer 'none'; None keeps
    attention in every block.
    With match_flops the widths are then scaled together until the config's BN-folded fvcore FLOPs at 224 px are
    closest to the preset's, for a comparison at equal cost."""
    from analysis.mhsa_ratio import attention_blocks, staged_mixers

    if mixer not in ("cga", "mhsa"):
        raise ValueError(f"mixer must be 'cga' or 'mhsa', got {mixer!r}")
    if attention_share is not None and not 0 <= attention_share <= 1:
        raise ValueError(f"attention_share must lie in [0, 1], got {attention_share}")
    base = get_preset(preset)
    mixers = mixer if attention_share is None else staged_mixers(
        base.depths, attention_blocks(sum(base.depths), attention_share), mixer)
    parts = _split(blocks.sort_values("block"), base.num_stages)

    def means(values: Callable[[pd.DataFrame], pd.Series], defaults: Sequence[float]) -> list[float]:
        out = []
        for part, default in zip(parts, defaults):
            value = values(part).mean() if len(part) else math.nan
            out.append(default if math.isnan(value) else float(value))
        return out

    column = lambda c: (lambda p: p[c] if c in p else pd.Series(dtype=float))  # noqa: E731
    ones = [1.0] * base.num_stages
    width = means(column("width_kept"), ones)
    qk, v, ffn = means(column("qk_ratio"), ones), means(column("v_ratio"), ones), means(column("ffn_ratio"),
                                                                                       base.mlp_ratio)

    def build(scale: float) -> EfficientViTConfig:
        dims = []
        for i, (c, w, h) in enumerate(zip(base.embed_dims, width, base.num_heads)):
            # C / H a multiple of 4; stage 0 also divisible by the patch embedding's halvings
            step = math.lcm(4 * h, 2 ** (base.stem_depth - 1) if i == 0 else 1)
            dims.append(max(step, round(c * w * scale / step) * step))
        key_dims = tuple(max(4, round(r * c / h / 4) * 4) for r, c, h in zip(qk, dims, base.num_heads))
        v_ratio = tuple(max(0.25, round(r, 2)) for r in v) if mixer == "mhsa" else 1.0
        return base.replace(embed_dims=tuple(dims), key_dims=key_dims, v_ratio=v_ratio, mixers=mixers,
                            mlp_ratio=tuple(max(0.5, round(r * 4) / 4) for r in ffn), name=name)

    if not match_flops:
        return build(1.0)
    goal, low, high = _flops(base), 0.25, 4.0
    for _ in range(10):  # FLOPs grow with the width scale: bisect (widths are rounded anyway)
        mid = (low * high) ** 0.5
        low, high = (mid, high) if _flops(build(mid)) < goal else (low, mid)
    return min((build(low), build(high)), key=lambda c: abs(_flops(c) - goal))


def _split(df: pd.DataFrame, parts: int) -> list[pd.DataFrame]:
    """`parts` consecutive chunks of the rows, as equal as possible (a row repeats when there are fewer rows)."""
    bounds = [round(i * len(df) / parts) for i in range(parts + 1)]
    return [df.iloc[min(bounds[i], len(df) - 1):max(bounds[i + 1], bounds[i] + 1)] for i in range(parts)]


def _flops(config: EfficientViTConfig) -> float:
    from evit import fuse
    from evit.efficientvit import EfficientViT
    from evit.summary import count_flops

    return count_flops(fuse(EfficientViT(config.replace(img_size=224)).eval()), 224)


# --- figure -------------------------------------------------------------------------------------------------------

def plot(blocks: pd.DataFrame, title: str):
    """Fig. 5: kept output channels / block input channels per block for Q/K, V and the FFN hidden layer (solid:
    after pruning, dotted: before), the kept input width if it was pruned, and the paper's observation checked on
    the early blocks."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.5, 0.5 * len(blocks) + 4.5), 4.4), layout="constrained")
    ax = fig.subplots()
    for (kind, label), marker in zip(KINDS.items(), "os^"):
        line, = ax.plot(blocks.block, blocks[f"{kind}_ratio"], marker=marker, label=label)
        ax.plot(blocks.block, blocks[f"{kind}_ratio_before"], ls=":", lw=0.8, color=line.get_color())
    if (blocks.width_kept != 1).any():
        ax.plot(blocks.block, blocks.width_kept, ls="--", color="gray", marker=".",
                label="input width\n(kept / original)")
    for boundary in blocks.block[blocks.stage.diff().fillna(0) != 0]:
        ax.axvline(boundary - 0.5, color="gray", lw=0.5)
    early = blocks.iloc[:max(1, len(blocks) // 3)]
    note = (f"first third of the blocks: V {early.v_ratio.mean():.2f}, Q/K {early.qk_ratio.mean():.2f} of the input "
            f"width (paper: V stays close to it, Q/K and FFN are cut more)")
    ax.set(xlabel=f"block\n{note}", ylabel="channels / block input channels", title=title, xticks=list(blocks.block))
    ax.xaxis.label.set_fontsize(8)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="solid: after\ndotted: before", title_fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1))
    return fig


# --- CLI ----------------------------------------------------------------------------------------------------------

def load_weights(model_name: str, weights: str = "auto") -> tuple[nn.Module, str]:
    """(model in eval mode, the weights used). 'auto': a proxy's trained weights for proxies, else the hub's
    pretrained ones, else an error (pruning random weights says nothing about a trained model)."""
    if weights == "auto":
        weights = "proxy" if model_name in PROXY_RECIPES else "pretrained"
    if weights == "random":
        torch.manual_seed(0)
    try:
        return load_model(model_name, weights=weights), weights
    except WeightsUnavailableError as e:
        raise WeightsUnavailableError(f"{e} (or --weights random for a smoke run)") from e


class ServedBatches(Sequence):
    """Batches of chosen dataset items, served (resized, normalized) each time they are read, so that one batch at
    the model's resolution is in memory at a time: 2000 validation images at 224 px are 1.2 GB of float32."""

    def __init__(self, dataset: Dataset, picks: list[int], batch: int):
        self.dataset, self.picks, self.batch = dataset, picks, batch

    def __len__(self) -> int:
        return math.ceil(len(self.picks) / self.batch)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        items = [self.dataset[j] for j in self.picks[i * self.batch:(i + 1) * self.batch]]
        return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def load_batches(spec: str, img_size: int, batches: int, batch: int, val_images: int,
                 data_dir: Optional[str] = None) -> tuple[list, ServedBatches, int]:
    """(`batches` gradient batches from the train split, validation batches holding `val_images` images, number
    of classes); fixed random choices. The gradient batches are read every step, so they are served once and
    kept; the validation batches, read twice, are served when read."""
    from experiments.data import build_datasets

    data = build_datasets(spec, img_size, data_dir)

    def picks(dataset: Dataset, count: int, seed: int) -> list[int]:
        return torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()

    train = list(ServedBatches(data.train, picks(data.train, batches * batch, 0), batch))
    return train, ServedBatches(data.val, picks(data.val, val_images, 1), batch), data.num_classes


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.taylor_prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_proxy", help="deit_proxy, swin_proxy, evit_m0_proxy.., deit_tiny, "
                                                         "swin_tiny, evit_m0.., an evit config file, a timm "
                                                         "ViT/Swin name (default: deit_proxy)")
    p.add_argument("--weights", default="auto", help="auto (proxy for proxies, else pretrained, else an error) | "
                                                     "proxy | quick-proxy | pretrained | random | PATH")
    p.add_argument("--data", default="fashion_mnist", help="fashion_mnist | digits | imagefolder:PATH (the data "
                                                           "the weights were trained on)")
    p.add_argument("--data-dir", default=None, help="folder holding the data (overrides the default location)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's own)")
    p.add_argument("--target-macs", type=float, default=0.5, help="fraction of MACs to keep (default 0.5)")
    p.add_argument("--steps", type=int, default=5, help="iterative pruning steps (default 5)")
    p.add_argument("--batches", type=int, default=4, help="data batches for the gradients of each step")
    p.add_argument("--batch", type=int, default=32, help="images per batch")
    p.add_argument("--val-images", type=int, default=256,
                   help="validation images for accuracy before/after (default 256: a quick check; 2000 for a firm one)")
    p.add_argument("--normalizer", default="mean", choices=NORMALIZERS,
                   help="importance normalization within a group, torch-pruning's (default mean)")
    p.add_argument("--reduction", default="sum", choices=REDUCTIONS,
                   help="how a channel's layers combine, torch-pruning's group_reduction (default sum: Molchanov)")
    p.add_argument("--floor", type=float, default=0.1, help="fraction of each group always kept (default 0.1)")
    p.add_argument("--no-width", action="store_true", help="do not prune the residual-stream widths")
    p.add_argument("--finetune-epochs", type=int, default=0, help="short fine-tune after pruning (0: none)")
    p.add_argument("--finetune-images", type=int, default=20000, help="training images of the fine-tune")
    p.add_argument("--preset", default="m0", help="evit preset the allocation is scaled to (equal FLOPs)")
    p.add_argument("--mixer", default="cga", choices=("cga", "mhsa"),
                   help="allocation's attention: cga (V = C/H) or mhsa (V from the measured V ratio)")
    p.add_argument("--attention-share", default=None,
                   help="allocation's share of blocks with attention: a number in [0, 1], or an MHSA-proportion "
                        "summary.csv (analysis.mhsa_ratio) whose best evit share is taken (default: every block)")
    p.add_argument("--config-out", type=Path, default=None,
                   help="where to write the allocation config (default OUT/<model>_allocation.yaml)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    args = p.parse_args(argv)
    if not 0 < args.target_macs < 1:
        p.error(f"--target-macs must lie in (0, 1), got {args.target_macs}")
    if min(args.steps, args.batches, args.batch, args.val_images) < 1 or not 0 < args.floor <= 1:
        p.error("--steps, --batches, --batch and --val-images must be >= 1 and --floor in (0, 1]")
    if args.attention_share is not None:
        args.attention_share = _attention_share(args.attention_share, p)
    return args


def _attention_share(value: str, parser: argparse.ArgumentParser) -> float:
    """--attention-share: a number in [0, 1] or the best evit share of an MHSA-proportion summary CSV."""
    from analysis.mhsa_ratio import best_share

    try:
        share = float(value)
    except ValueError:
        if not Path(value).is_file():
            parser.error(f"--attention-share must be a number in [0, 1] or an existing summary.csv of "
                         f"analysis.mhsa_ratio; got {value!r}")
        try:
            share = best_share(pd.read_csv(value), "evit")
        except (ValueError, KeyError, pd.errors.ParserError) as e:
            parser.error(f"--attention-share {value}: not an MHSA-proportion summary with evit rows ({e})")
    if not 0 <= share <= 1:
        parser.error(f"--attention-share must lie in [0, 1], got {share}")
    return share


def check_inputs(args: argparse.Namespace) -> None:
    """Fail at once, reading no data and loading no weights, on a missing dataset, an unknown data spec or model
    name, a bad config file or a model this analysis cannot prune: before a proxy is trained or weights are
    fetched from the hub."""
    from experiments.data import check_data
    from experiments.models import check_model, skeleton

    check_data(args.data, args.data_dir)
    check_model(args.model)
    prepare(skeleton(args.model))


def run(args: argparse.Namespace) -> PruneResult:
    from experiments.models import model_img_size

    check_inputs(args)
    model, weights = load_weights(args.model, args.weights)
    img_size = args.img_size or model_img_size(model)
    train, val, num_classes = load_batches(args.data, img_size, args.batches, args.batch, args.val_images,
                                           args.data_dir)
    with torch.no_grad():
        outputs = model(train[0][0][:1]).shape[-1]
    if outputs != num_classes:
        print(f"note: the model has {outputs} outputs but {args.data} has {num_classes} classes: gradients and "
              f"accuracy use its own head (pass the data it was trained on)", file=sys.stderr)
    result = taylor_prune(model, train, args.target_macs, args.steps, args.normalizer, args.reduction, args.floor,
                          val, prune_width=not args.no_width)
    result.summary.update(model=args.model, weights=weights, data=args.data, img_size=img_size)
    if args.finetune_epochs:
        from experiments.data import build_datasets
        from experiments.train import TrainConfig, train as train_model

        cfg = TrainConfig(model=args.model, data=args.data, img_size=img_size, epochs=args.finetune_epochs,
                          warmup_epochs=0, lr=2e-4, limit_train=args.finetune_images, limit_val=args.val_images, threads=args.threads)
        metrics = train_model(result.model, cfg, build_datasets(args.data, img_size, args.data_dir))
        result.summary.update(acc_finetuned=metrics["val_acc"], finetune_epochs=args.finetune_epochs)
        result.model.eval()
    return result


def main(argv: Optional[Sequence[str]] = None) -> PruneResult:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    stem = Path(args.model).stem
    try:
        result = run(args)
    except USER_ERRORS + (WeightsUnavailableError, UnsupportedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    s = result.summary
    blocks_csv = write_csv(result.blocks.round(5), args.out / f"{stem}.csv")
    write_csv(result.stages.round(5), args.out / f"{stem}_stages.csv")
    write_csv(pd.DataFrame([s]).round(5), args.out / f"{stem}_summary.csv")
    config = allocation_config(result.blocks, args.preset, name=f"{stem}_taylor", mixer=args.mixer,
                               attention_share=args.attention_share)
    config_path = args.config_out or args.out / f"{stem}_allocation.yaml"
    config.to_file(config_path)
    title = (f"{stem} ({s['weights']}): MACs {s['macs_before_m']:.2f}M -> {s['macs_after_m']:.2f}M, acc "
             f"{s['acc_before']:.1f} -> {s['acc_after']:.1f}%")
    save_figure(plot(result.blocks, title), args.out / f"{stem}.png")
    print(result.blocks[["block", "stage", "in_dim_before", "in_dim", "qk_ratio", "v_ratio", "ffn_ratio"]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{title} (normalizer {s['normalizer']}, reduction {s['reduction']})\n-> {blocks_csv}\n"
          f"allocation (evit_{args.preset}'s FLOPs, {args.mixer}) -> {config_path}: embed_dims {config.embed_dims}, "
          f"key_dims {config.key_dims}, v_ratio {config.v_ratio}, mlp_ratio {config.mlp_ratio}, mixers "
          f"{config.mixers}")
    return result


if __name__ == "__main__":
    main()
