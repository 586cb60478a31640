"""Taylor structured pruning (paper Fig. 5): which channels a trained ViT keeps, per block, and the EfficientViT
channel allocation that follows from it.

    python -m analysis.taylor_prune --model deit_proxy                 # trained proxy, prune to 50% of MACs
    python -m analysis.taylor_prune --model swin_proxy --target-macs 0.6 --finetune-epochs 1

Importance (Molchanov et al., CVPR 2019): the first-order Taylor estimate |w * dL/dw| of every weight, with
gradients accumulated over real data batches, summed per channel over all the layers the channel lives in.
Q/K, V and FFN-hidden channels are SEPARATE groups per block: timm's fused qkv is split into q, k, v Linears
(torch-pruning's dependency graph would tie Q/K to V through the matmuls, see ../shared/paper/FACTS.md), and
q @ k^T keeps the model's original softmax scale. A ViT's embedding width (the residual stream: patch embedding,
class token, position embedding, every LayerNorm and Linear on the stream) is one more group. Pruning is iterative: each step recomputes gradients, ranks
all candidate units globally by normalized importance (a unit = one dim from every head of a Q/K or V group,
so heads stay equal, or one FFN channel) and removes the lowest until the step's MAC target is met, never
below a floor per group. torch-pruning's layer pruners do the surgery; the MAC counter includes q @ k^T and
attn @ v at their pruned widths. Swin: per-window attention, relative-position bias untouched (heads are kept).

EfficientViT (evit_m0.., evit_m0_proxy.., evit config files; BatchNorm only): per block a Q/K group (each head's
Q and K rows of its qkv Conv-BN and its depthwise Q Conv-BN; all heads lose the same dims, `key_dim` follows and
the softmax scale stays the original), one FFN-hidden group per FFN of the sandwich (pw1 out + BN, pw2 in) and,
for MHSA mixers, a V group (qkv V rows + BN, proj in; `val_dim` follows). Cascaded group attention's V is NOT
pruned (head i's output is added to head i+1's input split, so V dim = C / heads): its V ratio is reported as
kept. Only the blocks are pruned, not the FFNs inside the stage transitions (Subsample) nor the patch embedding,
so at small inputs a low MAC target can be out of reach: every group then ends at its floor (said on stderr).

Outputs results/taylor_prune/<model>.csv (one row per block: kept Q/K, V and FFN widths relative to the block's
input width), <model>_summary.csv, <model>.png and <model>_allocation.yaml, an EfficientViT config built from
the kept ratios (`python -m experiments.family --models evit_m0,<that yaml>` trains and times both).
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from timm.layers import Mlp

from evit import EfficientViTConfig, get_preset
from evit.io import save_figure, write_csv
from experiments.train import USER_ERRORS
from experiments.zoo import WeightsUnavailableError

NORMALIZERS = ("mean", "max", "sum", "none")
REDUCTIONS = ("sum", "mean", "max")


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
        self.q, self.k, self.v = (nn.Linear(qkv.in_features, width, bias=qkv.bias is not None) for _ in range(3))
        with torch.no_grad():
            for i, layer in enumerate((self.q, self.k, self.v)):
                layer.weight.copy_(qkv.weight[i * width:(i + 1) * width])
                if qkv.bias is not None:
                    layer.bias.copy_(qkv.bias[i * width:(i + 1) * width])
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop
        # Swin: keep the module that owns the relative-position bias (a table per head; heads are never pruned).
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
    weight rows (axis 'out': Linear/Conv outputs, BatchNorm channels) or columns (axis 'in': Linear/Conv inputs)
    from index `offset`."""

    layer: nn.Module
    axis: str
    offset: int
    first: int
    count: int
    param: str = "weight"  # axis 'last': a bare parameter of `layer` whose last dimension holds the channels


@dataclass
class Group:
    """Channels pruned together (one Q/K, V or FFN-hidden group of a block), in `heads` equal parts.

    `layout()` gives the group's slices from the layers' current sizes; `on_prune(n)` updates the owning
    module after n channels per head were removed. A group with `prunable=False` is only reported."""

    kind: str                                # qk | v | ffn | width (the residual stream)
    block: str                               # module name of the block
    stage: int
    heads: int
    in_dim: int                              # width of the block's input (the residual stream)
    site: nn.Module                          # the module whose input sets tokens (and keys, for attention)
    layout: Callable[[], list[Slice]]
    count: Callable[[], int]
    on_prune: Callable[[int], None] = lambda removed_per_head: None
    prunable: bool = True
    original: int = 0                        # channels before pruning
    tokens: float = 0.0                      # positions per image through this group's layers (measured)
    keys: float = 0.0                        # keys each query attends to (N for ViT, the window area otherwise)

    @property
    def channels(self) -> int:
        return self.count()

    def macs_per_channel(self) -> float:
        """MACs per image one channel costs: its rows and columns in the layers, and its share of the attention
        matmuls (q @ k^T for a Q/K channel, attn @ v for a V channel)."""
        per_position = sum(s.count * _fan(s.layer, s.axis) for s in self.layout()) / max(self.channels, 1)
        return self.tokens * (per_position + (self.keys if self.kind in ("qk", "v") else 0.0))


def _fan(layer: nn.Module, axis: str) -> float:
    """Multiply-adds per position for one output row ('out') or one input column ('in') of a layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features if axis == "out" else layer.out_features
    if isinstance(layer, nn.Conv2d):
        kernel = math.prod(layer.kernel_size)
        return kernel * layer.in_channels // layer.groups if axis == "out" else kernel * layer.out_channels
    return 0.0  # norms


def _stage_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if parts[0] in ("layers", "stages") else 0


def _timm_groups(name: str, block: nn.Module) -> list[Group]:
    """timm ViT / Swin block: fused qkv split into q, k, v Linears; Q/K, V and FFN-hidden groups."""
    if not isinstance(block.attn, SplitAttention):
        if not hasattr(block.attn, "qkv") or not isinstance(getattr(block.attn, "q_norm", nn.Identity()),
                                                             nn.Identity):
            raise UnsupportedModelError(f"{name}.attn ({type(block.attn).__name__}) is not a plain fused-qkv "
                                        f"attention")
        block.attn = SplitAttention(block.attn)
    attn, mlp = block.attn, block.mlp
    if not isinstance(mlp, Mlp) or not isinstance(mlp.norm, nn.Identity):
        raise UnsupportedModelError(f"{name}.mlp ({type(mlp).__name__}) is not a plain timm Mlp")

    def whole(*layers_axes: tuple[nn.Module, str]) -> Callable[[], list[Slice]]:
        return lambda: [Slice(layer, axis, 0, 0, layers_axes[0][0].out_features) for layer, axis in layers_axes]

    common = dict(block=name, stage=_stage_of(name), in_dim=attn.q.in_features)
    return [Group("qk", heads=attn.num_heads, site=attn, layout=whole((attn.q, "out"), (attn.k, "out")),
                  count=lambda: attn.q.out_features, **common),
            Group("v", heads=attn.num_heads, site=attn, layout=whole((attn.v, "out"), (attn.proj, "in")),
                  count=lambda: attn.v.out_features, **common),
            Group("ffn", heads=1, site=mlp, layout=whole((mlp.fc1, "out"), (mlp.fc2, "in")),
                  count=lambda: mlp.fc1.out_features, **common)]


def _vit_width_group(model: nn.Module) -> list[Group]:
    """The residual-stream width of a timm VisionTransformer: patch embedding outputs, class/register tokens and
    position embedding, every LayerNorm and LayerScale on the stream, every Linear reading it (q, k, v, fc1,
    head) or writing it (proj, fc2). Pruning it changes the LayerNorms' statistics, so outputs move slightly
    even for channels that carry nothing."""
    from timm.layers import LayerScale
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer) or not isinstance(model.patch_embed.proj, nn.Conv2d):
        return []

    def layout() -> list[Slice]:
        width = model.patch_embed.proj.out_channels
        on_stream = [(model.patch_embed.proj, "out"), (model.patch_embed.norm, "out")]
        for block in model.blocks:
            on_stream += [(block.norm1, "out"), (block.attn.q, "in"), (block.attn.k, "in"), (block.attn.v, "in"),
                          (block.attn.proj, "out"), (block.ls1, "last"), (block.norm2, "out"),
                          (block.mlp.fc1, "in"), (block.mlp.fc2, "out"), (block.ls2, "last")]
        on_stream += [(model.norm, "out"), (model.fc_norm, "out"), (model.head, "in")]
        slices = [Slice(model, "last", 0, 0, width, param=name) for name in ("cls_token", "reg_token", "pos_embed")
                  if getattr(model, name, None) is not None]
        for layer, axis in on_stream:
            if isinstance(layer, LayerScale):
                slices.append(Slice(layer, "last", 0, 0, width, param="gamma"))
            elif isinstance(layer, (nn.Linear, nn.Conv2d, nn.LayerNorm)) and axis != "last":
                slices.append(Slice(layer, axis, 0, 0, width))
        return slices

    def resize(removed: int) -> None:
        model.embed_dim = model.num_features = model.head_hidden_size = model.patch_embed.proj.out_channels

    return [Group("width", block="embed", stage=0, heads=1, in_dim=model.patch_embed.proj.out_channels,
                  site=model.blocks[0], layout=layout, count=lambda: model.patch_embed.proj.out_channels,
                  on_prune=resize)]


def _conv_norm(module: nn.Module, axis: str, offset: int, first: int, count: int) -> list[Slice]:
    """Slices of an evit ConvNorm: the conv's rows or columns and, for outputs, the BatchNorm's channels."""
    slices = [Slice(module.conv, axis, offset, first, count)]
    return slices + [Slice(module.bn, "out", offset, first, count)] if axis == "out" else slices


def _evit_groups(name: str, block: nn.Module) -> list[Group]:
    """evit block: both FFNs of the sandwich, and the mixer's Q/K (per head: the Q and K rows of the head's
    qkv conv and its depthwise Q conv) and V groups. Cascaded group attention's V width is fixed by the cascade
    (head i's output is added to head i+1's input split, so V = dim / heads): reported, not pruned."""
    from evit.efficientvit import CascadedGroupAttention, ConvMlp, ConvNorm

    if not all(isinstance(m.bn, nn.BatchNorm2d) for m in block.modules() if isinstance(m, ConvNorm)):
        # a LayerNorm normalizes over channels: removing one changes every other channel's output
        raise UnsupportedModelError(f"{name}: only BatchNorm evit blocks can be pruned (this one has LayerNorm)")
    ffns = [m.m for n, m in block.named_children() if n.startswith("ffn")]
    assert all(isinstance(f, ConvMlp) for f in ffns), name
    if not ffns and block.mixer_type == "none":
        return []  # an empty block (or DWConv only): nothing to prune
    in_dim = ffns[0].pw1.conv.in_channels if ffns else block.mixer.m.attn.proj[1].conv.out_channels
    common = dict(block=name, stage=_stage_of(name), in_dim=in_dim)
    groups = [Group("ffn", heads=1, site=f, count=lambda f=f: f.pw1.conv.out_channels,
                    layout=lambda f=f: _conv_norm(f.pw1, "out", 0, 0, f.pw1.conv.out_channels)
                    + _conv_norm(f.pw2, "in", 0, 0, f.pw1.conv.out_channels), **common) for f in ffns]
    if block.mixer_type == "none":
        return groups
    attn = block.mixer.m.attn  # Residual -> WindowAttention -> CGA / MHSA
    heads = attn.num_heads

    def shrink(field: str) -> Callable[[int], None]:
        return lambda removed: setattr(attn, field, getattr(attn, field) - removed)

    if isinstance(attn, CascadedGroupAttention):
        def qk_layout() -> list[Slice]:
            kd = attn.key_dim
            return [s for h in range(heads) for s in
                    _conv_norm(attn.qkvs[h], "out", 0, h * kd, kd) + _conv_norm(attn.qkvs[h], "out", kd, h * kd, kd)
                    + (_conv_norm(attn.dws[h], "out", 0, h * kd, kd) if hasattr(attn.dws[h], "conv") else [])]

        v = Group("v", heads=heads, site=attn, layout=lambda: [], count=lambda: heads * attn.val_dim,
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

        v = Group("v", heads=heads, site=attn, layout=v_layout, count=lambda: heads * attn.val_dim,
                  on_prune=shrink("val_dim"), **common)
    qk = Group("qk", heads=heads, site=attn, layout=qk_layout, count=lambda: heads * attn.key_dim,
               on_prune=shrink("key_dim"), **common)
    return [qk, v] + groups


def prepare(model: nn.Module) -> list[Group]:
    """Split every timm attention's qkv (in place) and return the Q/K, V and FFN groups of every block."""
    from evit.efficientvit import EfficientViTBlock

    groups: list[Group] = []
    for name, module in model.named_modules():
        if isinstance(module, EfficientViTBlock):
            groups += _evit_groups(name, module)
        elif hasattr(module, "attn") and hasattr(module, "mlp"):
            groups += _timm_groups(name, module)
    groups += _vit_width_group(model)
    if not groups:
        raise UnsupportedModelError(f"{type(model).__name__} has no prunable blocks; supported: timm "
                                    f"VisionTransformer (deit_*, vit_*, deit_proxy), SwinTransformer (swin_*, "
                                    f"swin_proxy) and evit models with BatchNorm (evit_m*, proxies, configs)")
    for group in groups:
        group.original = group.channels
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


def count_macs(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """MACs per image by module name: Linear and Conv layers from their output sizes, and for attention modules
    the two attention matmuls at their current (pruned) widths."""
    macs: dict[str, float] = defaultdict(float)
    batch = example.shape[0]

    def hook(name: str):
        def count(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if isinstance(module, nn.Linear):
                macs[name] += out.numel() / batch * module.in_features
            elif isinstance(module, nn.Conv2d):
                macs[name] += out.numel() / batch * module.in_channels // module.groups * math.prod(module.kernel_size)
            elif isinstance(module, SplitAttention):  # q @ k^T and attn @ v over every window of every image
                x = args[0]
                per_head = (module.q.out_features + module.v.out_features) / module.num_heads
                macs[name] += x.shape[0] / batch * module.num_heads * x.shape[1] ** 2 * per_head
            else:  # evit CGA / MHSA on (windows, C, ws, ws)
                x = args[0]
                tokens = x.shape[2] * x.shape[3]
                macs[name] += (x.shape[0] / batch * module.num_heads * tokens ** 2
                               * (module.key_dim + module.val_dim))
        return count

    _forward_with_hooks(model, example, {m: hook(n) for n, m in model.named_modules()
                                         if isinstance(m, (nn.Linear, nn.Conv2d) + _attention_modules())})
    return dict(macs)


def measure_tokens(model: nn.Module, groups: Sequence[Group], example: torch.Tensor) -> None:
    """Positions per image and keys per query at every group's site, from one forward."""
    sizes: dict[nn.Module, tuple[float, float]] = {}
    batch = example.shape[0]

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        x = args[0]
        if x.dim() == 4 and not isinstance(module, Mlp):  # evit: (B or windows, C, H, W)
            sizes[module] = (x.shape[0] * x.shape[2] * x.shape[3] / batch, float(x.shape[2] * x.shape[3]))
        else:  # timm: channels last, (B or windows, N, C) or (B, H, W, C)
            sizes[module] = (x.numel() / x.shape[-1] / batch, float(x.shape[1]))

    _forward_with_hooks(model, example, {g.site: record for g in groups})
    for group in groups:
        group.tokens, group.keys = sizes[group.site]


# --- importance -------------------------------------------------------------------------------------------------

def accumulate_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for images, labels in batches:
            F.cross_entropy(model(images), labels).backward()


def _taylor(layer: nn.Module, axis: str, param: str = "weight") -> torch.Tensor:
    """|w * dL/dw| summed per output row, input column or last-dimension channel (a row's bias, or a norm's
    shift, included)."""
    if axis == "last":
        weight = getattr(layer, param)
        return (weight * weight.grad).abs().flatten(0, -2).sum(0).detach()
    weight = layer.weight
    score = (weight * weight.grad).abs()
    if weight.dim() > 1:
        score = score.sum(dim=[d for d in range(weight.dim()) if d != (0 if axis == "out" else 1)])
    bias = getattr(layer, "bias", None)
    if axis == "out" and bias is not None and bias.grad is not None:
        score = score + (bias * bias.grad).abs()
    return score.detach()


def channel_importance(group: Group, normalizer: str = "mean", reduction: str = "sum") -> torch.Tensor:
    """Taylor scores of the group's channels in each layer they live in, reduced over those layers, then
    normalized within the group (so groups of different sizes compete fairly in the global ranking)."""
    slices = group.layout()
    per_layer = torch.full((len(slices), group.channels), math.nan)
    for row, s in enumerate(slices):
        per_layer[row, s.first:s.first + s.count] = _taylor(s.layer, s.axis, s.param)[s.offset:s.offset + s.count]
    if reduction == "sum":
        importance = per_layer.nansum(0)
    elif reduction == "mean":
        importance = per_layer.nanmean(0)
    else:
        importance = per_layer.nan_to_num(-math.inf).amax(0)
    if normalizer == "mean":
        importance = importance / importance.mean().clamp_min(1e-30)
    elif normalizer == "max":
        importance = importance / importance.max().clamp_min(1e-30)
    elif normalizer == "sum":
        importance = importance / importance.sum().clamp_min(1e-30)
    return importance


def prune_channels(group: Group, idxs: list[int]) -> None:
    """Remove the group's channels `idxs` from every layer (one torch-pruning call per layer and axis)."""
    rows: dict[tuple[int, str, str], tuple[nn.Module, list[int]]] = {}
    for s in group.layout():
        picked = [s.offset + c - s.first for c in idxs if s.first <= c < s.first + s.count]
        rows.setdefault((id(s.layer), s.axis, s.param), (s.layer, []))[1].extend(picked)
    for (_, axis, param), (layer, picked) in rows.items():
        picked = sorted(set(picked))
        if axis == "last":
            old = getattr(layer, param)
            keep = [i for i in range(old.shape[-1]) if i not in set(picked)]
            setattr(layer, param, nn.Parameter(old.data[..., keep].clone(), requires_grad=old.requires_grad))
        elif isinstance(layer, nn.LayerNorm):
            tp.prune_layernorm_out_channels(layer, picked)
        elif isinstance(layer, nn.Linear):
            (tp.prune_linear_out_channels if axis == "out" else tp.prune_linear_in_channels)(layer, picked)
        elif isinstance(layer, nn.BatchNorm2d):
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
    """The group's removable units in removal order: the k-th lowest channel of every head together."""
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
    blocks: pd.DataFrame
    stages: pd.DataFrame
    summary: dict
    model: nn.Module


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = total = 0
    with torch.no_grad():
        for images, labels in batches:
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return 100.0 * correct / max(total, 1)


def taylor_prune(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], target_macs: float = 0.5,
                 steps: int = 5, normalizer: str = "mean", reduction: str = "sum", floor: float = 0.1,
                 val_batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> PruneResult:
    """Prune `model` (in place, eval mode) to `target_macs` of its MACs in `steps` Taylor steps; report per block.

    batches: (images, labels) used for the gradients (all of them, every step). floor: fraction of each
    group's channels always kept. val_batches: accuracy before and after, when given.
    """
    if not 0 < target_macs < 1:
        raise ValueError(f"target_macs must lie in (0, 1), got {target_macs}")
    if normalizer not in NORMALIZERS or reduction not in REDUCTIONS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS} and reduction one of {REDUCTIONS}")
    model.eval()
    groups = prepare(model)
    example = batches[0][0][:1]
    measure_tokens(model, groups, example)
    macs_before = count_macs(model, example)
    params_before = sum(p.numel() for p in model.parameters())
    acc_before = evaluate(model, val_batches) if val_batches else None
    total_before = sum(macs_before.values())
    for step in range(1, steps + 1):
        goal = total_before * (1 - (1 - target_macs) * step / steps)
        excess = sum(count_macs(model, example).values()) - goal
        accumulate_gradients(model, batches)
        units = sorted((u for g in groups if g.prunable
                        for u in candidate_units(g, channel_importance(g, normalizer, reduction), floor)),
                       key=lambda u: u.importance)
        chosen: dict[int, list[int]] = defaultdict(list)
        for unit in units:
            if excess <= 0:
                break
            chosen[id(unit.group)] += unit.channels
            excess -= len(unit.channels) * unit.group.macs_per_channel()
        for group in groups:
            if chosen.get(id(group)):
                prune_channels(group, sorted(chosen[id(group)]))
        model.zero_grad(set_to_none=True)
    macs_after = count_macs(model, example)
    if sum(macs_after.values()) > 1.01 * target_macs * total_before:
        print(f"note: MAC target {target_macs:.2f} not reached ({sum(macs_after.values()) / total_before:.3f} "
              f"kept): the prunable groups are at their floor ({floor:g}), the rest of the model is not pruned",
              file=sys.stderr)
    blocks = block_table(groups, macs_before, macs_after)
    summary = dict(macs_before_m=total_before / 1e6, macs_after_m=sum(macs_after.values()) / 1e6,
                   macs_kept=sum(macs_after.values()) / total_before, params_before_m=params_before / 1e6,
                   params_after_m=sum(p.numel() for p in model.parameters()) / 1e6, target_macs=target_macs,
                   steps=steps, normalizer=normalizer, reduction=reduction, floor=floor,
                   gradient_images=sum(len(labels) for _, labels in batches),
                   acc_before=acc_before, acc_after=evaluate(model, val_batches) if val_batches else None)
    return PruneResult(blocks, stage_table(blocks), summary, model)


def block_table(groups: Sequence[Group], macs_before: dict[str, float], macs_after: dict[str, float]) -> pd.DataFrame:
    """One row per block: channels kept per group kind (an evit sandwich's two FFNs summed), each relative to
    the block's input width (per FFN), and MACs."""
    rows: dict[str, dict] = {}
    width_kept = {g.stage: g.channels / g.original for g in groups if g.kind == "width"}
    for group in (g for g in groups if g.kind != "width"):
        row = rows.setdefault(group.block, dict(block=len(rows), name=group.block, stage=group.stage,
                                                in_dim=group.in_dim, heads=1))
        if group.kind != "ffn":
            row["heads"] = group.heads
        n = row.get(f"_{group.kind}_groups", 0) + 1
        row[f"_{group.kind}_groups"] = n
        row[f"{group.kind}_dim_before"] = row.get(f"{group.kind}_dim_before", 0) + group.original
        row[f"{group.kind}_dim"] = row.get(f"{group.kind}_dim", 0) + group.channels
        row[f"{group.kind}_ratio"] = row[f"{group.kind}_dim"] / (n * group.in_dim)
        row[f"{group.kind}_kept"] = row[f"{group.kind}_dim"] / row[f"{group.kind}_dim_before"]
    for row in rows.values():
        if width_kept:
            row["width_kept"] = width_kept.get(row["stage"], 1.0)
        prefix = row["name"] + "."
        row["macs_before_m"] = sum(v for k, v in macs_before.items() if k.startswith(prefix)) / 1e6
        row["macs_after_m"] = sum(v for k, v in macs_after.items() if k.startswith(prefix)) / 1e6
    df = pd.DataFrame(rows.values())
    return df.loc[:, ~df.columns.str.startswith("_")]


def stage_table(blocks: pd.DataFrame) -> pd.DataFrame:
    return blocks.groupby("stage", as_index=False).agg(
        blocks=("block", "count"), in_dim=("in_dim", "first"), qk_ratio=("qk_ratio", "mean"),
        v_ratio=("v_ratio", "mean"), ffn_ratio=("ffn_ratio", "mean"), macs_before_m=("macs_before_m", "sum"),
        macs_after_m=("macs_after_m", "sum"))


# --- findings -> builder ------------------------------------------------------------------------------------------

def allocation_config(blocks: pd.DataFrame, preset: str = "m0", match_flops: bool = True,
                      name: str = "taylor_allocation") -> EfficientViTConfig:
    """An EfficientViT config from kept ratios: the pruned model's blocks are cut into as many consecutive
    parts as the preset has stages (early, middle, late), and each part's mean ratios set that stage's
    Q/K dim per head (qk_ratio * C / H) and FFN ratio (ffn_ratio). V stays C / H per head: cascaded group
    attention needs it, and the paper's V finding (kept close to the input width) agrees; the measured V ratio
    is reported beside the config. With match_flops, widths are then scaled together until the config's
    BN-folded FLOPs at 224 px equal the preset's, for a comparison at equal cost."""
    base = get_preset(preset)
    parts = [chunk for chunk in _split(blocks.sort_values("block"), len(base.embed_dims))]
    qk = [float(p.qk_ratio.mean()) for p in parts]
    ffn = [float(p.ffn_ratio.mean()) for p in parts]

    def build(scale: float) -> EfficientViTConfig:
        heads = base.num_heads
        dims = tuple(max(h, round(c * scale / (4 * h)) * 4 * h) for c, h in zip(base.embed_dims, heads))
        key_dims = tuple(max(4, round(r * c / h / 4) * 4) for r, c, h in zip(qk, dims, heads))
        mlp = tuple(max(0.5, round(r * 4) / 4) for r in ffn)
        return base.replace(embed_dims=dims, key_dims=key_dims, mlp_ratio=mlp, name=name)

    config = build(1.0)
    if match_flops:
        goal = _flops(base)
        low, high = 0.25, 4.0
        for _ in range(10):  # FLOPs grow with the width scale: bisect (widths are rounded anyway)
            mid = (low * high) ** 0.5
            low, high = (mid, high) if _flops(build(mid)) < goal else (low, mid)
        config = min((build(low), build(high)), key=lambda c: abs(_flops(c) - goal))
    return config


def _split(df: pd.DataFrame, parts: int) -> list[pd.DataFrame]:
    bounds = [round(i * len(df) / parts) for i in range(parts + 1)]
    return [df.iloc[max(bounds[i], 0):max(bounds[i + 1], bounds[i] + 1)] for i in range(parts)]


def _flops(config: EfficientViTConfig) -> float:
    from evit import fuse
    from evit.efficientvit import EfficientViT
    from evit.summary import count_flops

    return count_flops(fuse(EfficientViT(config.replace(img_size=224)).eval()), 224)


# --- figure and CLI -----------------------------------------------------------------------------------------------

def plot(blocks: pd.DataFrame, title: str):
    """Fig. 5: kept output channels / input channels per block for Q/K, V and the FFN hidden layer."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 0.5 * len(blocks) + 3), 3.8))
    ax = fig.subplots()
    for kind, marker in (("qk", "o"), ("v", "s"), ("ffn", "^")):
        ax.plot(blocks.block, blocks[f"{kind}_ratio"], marker=marker, label={"qk": "Q/K", "v": "V",
                                                                             "ffn": "FFN hidden"}[kind])
        ax.plot(blocks.block, blocks[f"{kind}_dim_before"] / blocks.in_dim, ls=":", lw=0.8,
                color=ax.lines[-1].get_color())
    for boundary in blocks.block[blocks.stage.diff().fillna(0) != 0]:
        ax.axvline(boundary - 0.5, color="gray", lw=0.5)
    ax.set(xlabel="block", ylabel="kept channels / block input channels", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="solid: after, dotted: before", title_fontsize=7)
    fig.tight_layout()
    return fig


def load_batches(spec: str, img_size: int, count: int, batch: int, train: bool, data_dir: Optional[str] = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` fixed batches of real images (a fixed random choice) from the train or validation split."""
    from experiments.data import build_datasets

    data = build_datasets(spec, img_size, data_dir)
    dataset = data.train if train else data.val
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0 if train else 1))
    picks = order[:count * batch].tolist()
    items = [dataset[i] for i in picks]
    return [(torch.stack([x for x, _ in items[i:i + batch]]), torch.tensor([y for _, y in items[i:i + batch]]))
            for i in range(0, len(items), batch)]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.taylor_prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_proxy", help="deit_proxy, swin_proxy, evit_m0_proxy.., deit_tiny, "
                                                         "swin_tiny, evit_m0.., an evit config file, a timm "
                                                         "ViT/Swin name (default: deit_proxy)")
    p.add_argument("--weights", default="auto", help="auto (proxy for proxies, else pretrained) | proxy | "
                                                     "pretrained | random | PATH")
    p.add_argument("--data", default="fashion_mnist", help="fashion_mnist | digits | imagefolder:PATH")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's own)")
    p.add_argument("--target-macs", type=float, default=0.5, help="fraction of MACs to keep (default 0.5)")
    p.add_argument("--steps", type=int, default=5, help="iterative pruning steps")
    p.add_argument("--batches", type=int, default=8, help="data batches for the gradients of each step")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--val-images", type=int, default=2000, help="validation images for accuracy before/after")
    p.add_argument("--normalizer", default="mean", choices=NORMALIZERS, help="importance normalization per group")
    p.add_argument("--reduction", default="sum", choices=REDUCTIONS, help="how a channel's layers are combined")
    p.add_argument("--floor", type=float, default=0.1, help="fraction of each group always kept")
    p.add_argument("--finetune-epochs", type=int, default=0, help="short fine-tune after pruning (0: none)")
    p.add_argument("--preset", default="m0", help="evit preset the allocation is scaled to (equal FLOPs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results/taylor_prune"))
    args = p.parse_args(argv)
    if not 0 < args.target_macs < 1:
        p.error(f"--target-macs must lie in (0, 1), got {args.target_macs}")
    return args


def run(args: argparse.Namespace) -> PruneResult:
    from analysis.head_similarity import load_weights, model_img_size

    model, weights = load_weights(args.model, args.weights)
    prepare(model)  # fails at once, before any data is read, on models it cannot prune
    img_size = args.img_size or model_img_size(model)
    train = load_batches(args.data, img_size, args.batches, args.batch, True, args.data_dir)
    val = load_batches(args.data, img_size, math.ceil(args.val_images / args.batch), args.batch, False,
                       args.data_dir)
    result = taylor_prune(model, train, args.target_macs, args.steps, args.normalizer, args.reduction, args.floor,
                          val)
    result.summary.update(model=args.model, weights=weights)
    if args.finetune_epochs:
        from experiments.data import build_datasets
        from experiments.train import TrainConfig, train as train_model

        cfg = TrainConfig(model=args.model, data=args.data, img_size=img_size, epochs=args.finetune_epochs,
                          warmup_epochs=0, lr=2e-4, limit_train=20000, limit_val=args.val_images, threads=args.threads)
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
    config = allocation_config(result.blocks, args.preset, name=f"{stem}_taylor")
    config_path = args.out / f"{stem}_allocation.yaml"
    config.to_file(config_path)
    title = (f"{stem} ({s['weights']}): MACs {s['macs_before_m']:.1f}M -> {s['macs_after_m']:.1f}M, acc "
             f"{s['acc_before']:.1f} -> {s['acc_after']:.1f}%")
    save_figure(plot(result.blocks, title), args.out / f"{stem}.png")
    print(result.blocks[["block", "stage", "in_dim", "qk_ratio", "v_ratio", "ffn_ratio"]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{title}\n-> {blocks_csv}\nallocation (scaled to evit_{args.preset}'s FLOPs) -> {config_path}: "
          f"embed_dims {config.embed_dims}, key_dims {config.key_dims}, mlp_ratio {config.mlp_ratio}")
    return result


if __name__ == "__main__":
    main()
