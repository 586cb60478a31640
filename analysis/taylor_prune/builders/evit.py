"""evit EfficientViT (BatchNorm only): per block Q/K, V (MHSA) and FFN-hidden groups, per stage a width group
through the stem, transitions, heads and the CGA cascade."""
from __future__ import annotations

import re
from typing import Callable

import timm
import torch.nn as nn
from timm.models.efficientvit_msra import EfficientVitMsra

from analysis.taylor_prune.builders import register_attention, register_block, register_converter, register_model
from analysis.taylor_prune.groups import Group, Slice, set_sizes, stage_of
from experiments.models import UnsupportedModelError
from evit.convert import from_timm
from evit.efficientvit import (CascadedGroupAttention, ConvMlp, ConvNorm, EfficientViT, EfficientViTBlock, NormLinear,
                               RelativeBiasAttention, Residual)


def _conv_norm(module: nn.Module, axis: str, offset: int, first: int, count: int) -> list[Slice]:
    """Slices of an evit ConvNorm: the conv's rows or columns and, for outputs, the BatchNorm's channels."""
    slices = [Slice(module.conv, axis, offset, first, count)]
    return slices + [Slice(module.bn, "out", offset, first, count)] if axis == "out" else slices


def _require_batchnorm(name: str, module: nn.Module) -> None:
    """Reject evit modules with LayerNorms: a LayerNorm normalizes over channels, so removing one changes every
    other channel's output."""
    if not all(isinstance(m.bn, nn.BatchNorm2d) for m in module.modules() if isinstance(m, ConvNorm)):
        raise UnsupportedModelError(f"{name}: only BatchNorm evit blocks can be pruned (this one has LayerNorm)")


@register_attention(RelativeBiasAttention)
def attention_geometry(attn: nn.Module, args: tuple) -> tuple[float, float, int]:
    """An evit attention's input is (batch or windows, C, ws, ws): every token a query of every key, per head."""
    x = args[0]
    return x.shape[0] * x.shape[2] * x.shape[3], x.shape[2] * x.shape[3], attn.num_heads * (
        attn.key_dim + attn.val_dim)


@register_block(EfficientViTBlock, family="EfficientViT (evit; timm's efficientvit_m* through evit)")
def block_groups(name: str, block: nn.Module) -> list[Group]:
    """evit block: both FFNs of the sandwich, and the mixer's Q/K (per head: the Q and K rows of the head's
    qkv conv and its depthwise Q conv) and V groups. Cascaded group attention's V width is fixed by the cascade
    (head i's output is added to head i+1's input split, so V = dim / heads): it has no group of its own (reported,
    not prunable) and shrinks only with its stage's width group (`width_groups`)."""
    _require_batchnorm(name, block)
    ffns = [m.m for n, m in block.named_children() if n.startswith("ffn")]
    assert all(isinstance(f, ConvMlp) for f in ffns), name
    if not ffns and block.mixer_type == "none":
        return []  # an empty block (or DWConv only): nothing to prune
    attn = block.mixer.m.attn if block.mixer_type != "none" else None  # Residual -> WindowAttention -> CGA/MHSA

    def width() -> int:
        return ffns[0].pw1.conv.in_channels if ffns else attn.proj[1].conv.out_channels

    common = dict(block=name, stage=stage_of(name), width=width)
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


def _branches(module: nn.Module, width: int) -> list[Slice]:
    """Where the stream's channels live in every residual branch under `module` (a stage's blocks, or a Subsample
    pair at the stage's width): the token-interaction depthwise Conv-BN's rows (one row per channel), an FFN's pw1
    columns and pw2 rows, a mixer's input (MHSA: qkv columns, every head reads every channel; CGA: `_cga_stream`)
    and its output projection's rows."""
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


def _stage_width(model: nn.Module, s: int) -> Group:
    """The width of evit stage s: its source (the patch embedding's last Conv-BN for stage 0, else the Subsample's
    patch merging output and its FFN pair after the merge), every block, and its readers after the stage: the next
    Subsample's FFN pair before the merge and the merge's first conv, or the classifier(s) (BatchNorm1d + Linear).
    CGA mixers split the stream into `heads` chunks, so a unit is one channel of every chunk (chunks stay equal)."""
    stages = list(model.stages)
    stage = stages[s]
    source = model.patch_embed[-1] if s == 0 else stage.downsample.patchmerge.conv3
    nxt = stages[s + 1].downsample if s + 1 < len(stages) else None
    cgas = [m for m in stage.blocks.modules() if isinstance(m, CascadedGroupAttention)]

    def count() -> int:
        return source.conv.out_channels

    def layout() -> list[Slice]:
        width = count()
        slices = _conv_norm(source, "out", 0, 0, width) + _branches(stage.blocks, width)
        if s:
            slices += _branches(stage.downsample.res2, width)
        if nxt is not None:
            return slices + _branches(nxt.res1, width) + _conv_norm(nxt.patchmerge.conv1, "in", 0, 0, width)
        return slices + [Slice(layer, axis, 0, 0, width) for head in (model.head, model.head_dist)
                         if isinstance(head, NormLinear) for layer, axis in ((head.bn, "out"), (head.linear, "in"))]

    def resize(removed: int) -> None:
        width = count()
        for attn in cgas:
            attn.val_dim = width // attn.num_heads  # the cascade: V dim = chunk width
        model.feature_info[s]["num_chs"] = width
        if nxt is None:
            set_sizes(model, num_features=width, head_hidden_size=width)

    return Group("width", block=f"stages.{s}", stage=s, heads=cgas[0].num_heads if cgas else 1, width=count,
                 layout=layout, count=count, on_prune=resize, attention=cgas[0] if cgas else None,
                 matmuls=len(cgas))


@register_model(EfficientViT)
def width_groups(model: nn.Module) -> list[Group]:
    """One width group per stage of an evit EfficientViT (`_stage_width`)."""
    _require_batchnorm(type(model).__name__, model)  # also the stem and transitions, which no block group covers
    return [_stage_width(model, s) for s in range(len(model.stages))]


@register_converter(EfficientVitMsra)
def from_timm_port(model: nn.Module) -> EfficientViT:
    """timm's port of the paper's model (`efficientvit_m0`..`m5`) as the evit preset of the same name: the two share
    their state-dict layout (evit.convert.from_timm), so the weights carry over and the function is the same. A
    skeleton (weights on the meta device, for input checks) converts to a freshly initialized evit model."""
    match = re.fullmatch(r"efficientvit_(m\d)", model.pretrained_cfg.get("architecture", ""))
    if match is None:
        raise UnsupportedModelError(f"{type(model).__name__} ({model.pretrained_cfg.get('architecture')}) is not one "
                                    f"of timm's efficientvit_m0..m5, whose evit presets the pruner converts it to")
    converted = timm.create_model(f"evit_{match[1]}", num_classes=model.num_classes)
    if not any(p.is_meta for p in model.parameters()):
        converted.load_state_dict(from_timm(model.state_dict()))
    return converted.train(model.training)
