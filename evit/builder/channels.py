"""The channel couplings of an EfficientViT, declared by the model that owns them.

A structured pruner removes channels that must go together: a Q/K dim from every layer that produces or reads it,
an FFN hidden channel from both of its convs, a stage's width from every layer on that stage's residual stream.
Where those channels live follows from evit's module layout (the cascade, the sandwich, the Subsample), so evit
lists them here, in terms of its own modules. A pruner then needs no attribute paths into evit, and a change of
layout comes with its couplings.

Each coupling is a list of `ChannelSpan`s computed from the layers' current sizes (call again after removing
channels); `*_changed` functions update the size fields that follow from the layers after a removal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from .efficientvit import (CascadedGroupAttention, ConvMlp, ConvNorm, EfficientViT, EfficientViTBlock, NormLinear,
                           RelativeBiasAttention, Residual)

__all__ = ["ChannelSpan", "attention_qk", "attention_v", "block_attention", "block_ffns", "block_width", "ffn_hidden",
           "stage_attentions", "stage_channels", "stage_width", "stage_width_changed", "uses_batchnorm"]


@dataclass(frozen=True)
class ChannelSpan:
    """`count` consecutive channels of a coupling, from its channel `first`, at rows ('out': conv outputs and
    their norm's channels) or columns ('in': conv inputs, a Linear's inputs) of `layer`, from index `offset`."""

    layer: nn.Module
    axis: str
    offset: int
    first: int
    count: int


def _conv_norm(module: ConvNorm, axis: str, offset: int, first: int, count: int) -> list[ChannelSpan]:
    """A ConvNorm's conv rows or columns and, for rows, its norm's channels."""
    spans = [ChannelSpan(module.conv, axis, offset, first, count)]
    return spans + [ChannelSpan(module.bn, "out", offset, first, count)] if axis == "out" else spans


def block_ffns(block: EfficientViTBlock) -> list[ConvMlp]:
    """The FFNs of a sandwich block, in order."""
    return [m.m for n, m in block.named_children() if n.startswith("ffn")]


def block_attention(block: EfficientViTBlock) -> Optional[RelativeBiasAttention]:
    """The block's token mixer (CGA or MHSA), None for a block without one."""
    return block.mixer.m.attn if block.mixer_type != "none" else None


def block_width(block: EfficientViTBlock) -> int:
    """The width of the stream the block reads and writes."""
    ffns, attn = block_ffns(block), block_attention(block)
    return ffns[0].pw1.conv.in_channels if ffns else attn.proj[1].conv.out_channels


def ffn_hidden(ffn: ConvMlp) -> list[ChannelSpan]:
    """An FFN's hidden channels: its first Conv-Norm's rows and its second conv's columns."""
    hidden = ffn.pw1.conv.out_channels
    return _conv_norm(ffn.pw1, "out", 0, 0, hidden) + _conv_norm(ffn.pw2, "in", 0, 0, hidden)


def attention_qk(attn: RelativeBiasAttention) -> list[ChannelSpan]:
    """Q/K channels, head h's dims at h * key_dim: each head's Q and K rows of its qkv Conv-Norm (CGA: one conv per
    head, rows [Q | K | V]; MHSA: one conv, rows [Q of all heads | K of all heads | V of all heads]) and the rows of
    its depthwise Q conv. Q and K of a dim go together: q . k sums over them."""
    heads, kd = attn.num_heads, attn.key_dim
    if isinstance(attn, CascadedGroupAttention):
        return [s for h in range(heads) for s in
                _conv_norm(attn.qkvs[h], "out", 0, h * kd, kd) + _conv_norm(attn.qkvs[h], "out", kd, h * kd, kd)
                + (_conv_norm(attn.dws[h], "out", 0, h * kd, kd) if isinstance(attn.dws[h], ConvNorm) else [])]
    dws = [s for h in range(heads) for s in _conv_norm(attn.dws[h], "out", 0, h * kd, kd)] \
        if attn.dws is not None else []
    return _conv_norm(attn.qkv, "out", 0, 0, heads * kd) + _conv_norm(attn.qkv, "out", heads * kd, 0, heads * kd) + dws


def attention_v(attn: RelativeBiasAttention) -> Optional[list[ChannelSpan]]:
    """V channels of an MHSA (its qkv Conv-Norm's V rows, the projection's columns). None for CGA: head i's output
    is added to head i+1's input chunk, so V dim = stage width / heads; it changes with `stage_width` only."""
    if isinstance(attn, CascadedGroupAttention):
        return None
    vd = attn.num_heads * attn.val_dim
    return _conv_norm(attn.qkv, "out", 2 * attn.num_heads * attn.key_dim, 0, vd) + [
        ChannelSpan(attn.proj[1].conv, "in", 0, 0, vd)]


def _cga_stream(attn: CascadedGroupAttention, width: int) -> list[ChannelSpan]:
    """Where stream channel j of chunk h (coupling channel h*d + j, d = width / heads) lives in a cascaded group
    attention: column j of head h's qkv conv and, since the cascade adds head h-1's output to chunk h before head h
    reads it, row j of head h-1's V (conv and norm) and the proj column that reads that V row.

    Chunk 0 has no previous head; it takes head H-1's V row j and proj column. This tie is a convention, not forced
    by the cascade: the proj reads all heads' V outputs concatenated, H * d columns, so with chunks of d' channels
    every head's V must shrink to d' too, and head H-1's V (read by the proj alone) is the one no chunk feeds on."""
    heads, v_rows = attn.num_heads, 2 * attn.key_dim  # each head's qkv rows: [Q | K | V]
    d = width // heads
    spans = []
    for h in range(heads):
        prev = (h - 1) % heads  # the head whose V output enters chunk h (head H-1 for chunk 0: the convention)
        spans += [ChannelSpan(attn.qkvs[h].conv, "in", 0, h * d, d),
                  *_conv_norm(attn.qkvs[prev], "out", v_rows, h * d, d),
                  ChannelSpan(attn.proj[1].conv, "in", prev * d, h * d, d)]
    return spans


def _branches(module: nn.Module, width: int) -> list[ChannelSpan]:
    """Where the stream's channels live in every residual branch under `module` (a stage's blocks, or a Subsample
    pair at the stage's width): the token-interaction depthwise Conv-Norm's rows (one row per channel), an FFN's
    pw1 columns and pw2 rows, a mixer's input (MHSA: qkv columns, every head reads every channel; CGA:
    `_cga_stream`) and its output projection's rows."""
    spans = []
    for residual in (m for m in module.modules() if isinstance(m, Residual)):
        branch = residual.m
        if isinstance(branch, ConvNorm):
            spans += _conv_norm(branch, "out", 0, 0, width)
        elif isinstance(branch, ConvMlp):
            spans += _conv_norm(branch.pw1, "in", 0, 0, width) + _conv_norm(branch.pw2, "out", 0, 0, width)
        else:
            attn = branch.attn  # WindowAttention -> CGA / MHSA
            reads = (_cga_stream(attn, width) if isinstance(attn, CascadedGroupAttention)
                     else _conv_norm(attn.qkv, "in", 0, 0, width))
            spans += reads + _conv_norm(attn.proj[1], "out", 0, 0, width)
    return spans


def _stage_source(model: EfficientViT, s: int) -> ConvNorm:
    """The Conv-Norm that writes stage s's width: the patch embedding's last, or the stage's patch merging output."""
    return model.patch_embed[-1] if s == 0 else model.stages[s].downsample.patchmerge.conv3


def stage_channels(model: EfficientViT, s: int) -> int:
    """Stage s's width, read from the layer that writes it."""
    return _stage_source(model, s).conv.out_channels


def stage_attentions(model: EfficientViT, s: int) -> list[CascadedGroupAttention]:
    """The CGA mixers of stage s: their input chunks and V dims are the stage width's."""
    return [m for m in model.stages[s].blocks.modules() if isinstance(m, CascadedGroupAttention)]


def stage_width(model: EfficientViT, s: int) -> list[ChannelSpan]:
    """Stage s's residual-stream channels: its source (`_stage_source`; after a Subsample also the FFN pair after the
    merge), every block, and its readers after the stage: the next Subsample's FFN pair before the merge and the
    merge's first conv, or the classifier(s) (BatchNorm1d + Linear). With CGA mixers the stream is split into
    `heads` chunks, so a pruning unit is one channel of every chunk (chunks stay equal)."""
    stages = list(model.stages)
    stage, source, width = stages[s], _stage_source(model, s), stage_channels(model, s)
    spans = _conv_norm(source, "out", 0, 0, width) + _branches(stage.blocks, width)
    if s:
        spans += _branches(stage.downsample.res2, width)
    if s + 1 < len(stages):
        nxt = stages[s + 1].downsample
        return spans + _branches(nxt.res1, width) + _conv_norm(nxt.patchmerge.conv1, "in", 0, 0, width)
    return spans + [ChannelSpan(layer, axis, 0, 0, width) for head in (model.head, model.head_dist)
                    if isinstance(head, NormLinear) for layer, axis in ((head.bn, "out"), (head.linear, "in"))]


def stage_width_changed(model: EfficientViT, s: int) -> None:
    """Update the size fields that follow stage s's width after channels were removed."""
    width = stage_channels(model, s)
    for attn in stage_attentions(model, s):
        attn.val_dim = width // attn.num_heads  # the cascade: V dim = chunk width
    model.feature_info[s]["num_chs"] = width
    if s + 1 == len(model.stages):
        model.num_features = model.head_hidden_size = width


def uses_batchnorm(module: nn.Module) -> bool:
    """Whether every Conv-Norm under `module` normalizes with BatchNorm (per channel, unlike LayerNorm, so that a
    channel can leave without changing the others)."""
    return all(isinstance(m.bn, nn.BatchNorm2d) for m in module.modules() if isinstance(m, ConvNorm))
