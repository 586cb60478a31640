"""timm LeViT (`levit_*`, and `levit_conv_*`, the same network with 1x1 Conv-BN layers on (B, C, H, W) maps): per
block Q/K, V and FFN-hidden groups read off the fused projections' per-head layout, per stage a width group through
the stem, the attention downsamples between stages and the classifier heads. Every layer is a Linear (1x1 conv)
followed by a BatchNorm, which is per channel: channels that carry nothing can be removed without changing the
output."""
from __future__ import annotations

from typing import Callable, Union

import torch.nn as nn
from timm.models.levit import Attention as LevitAttention
from timm.models.levit import (AttentionDownsample, ConvNorm, Levit, LevitBlock, LevitDownsample, LevitMlp, LinearNorm,
                               NormLinear, Stem8, Stem16)

from analysis.taylor_prune.builders import register_attention, register_block, register_model
from analysis.taylor_prune.groups import Group, Slice, set_sizes, stage_of
from evit.models import UnsupportedModelError

NormedLayer = Union[LinearNorm, ConvNorm]  # a Linear (or 1x1 conv) `linear` and its BatchNorm `bn`


def _rows(layer: NormedLayer, offset: int, first: int, count: int) -> list[Slice]:
    """Output channels of a LinearNorm / ConvNorm: the Linear's (conv's) rows and the BatchNorm's channels."""
    return [Slice(layer.linear, "out", offset, first, count), Slice(layer.bn, "out", offset, first, count)]


def _columns(layer: NormedLayer, count: int) -> list[Slice]:
    return [Slice(layer.linear, "in", 0, 0, count)]


def _per_head(layer: NormedLayer, heads: int, stride: int, start: int, per_head: int) -> list[Slice]:
    """Rows of a fused projection laid out head by head (`stride` rows each): group channel h * per_head + j is row
    h * stride + start + j."""
    return [s for h in range(heads) for s in _rows(layer, h * stride + start, h * per_head, per_head)]


def _outputs(layer: NormedLayer) -> int:
    return layer.linear.weight.shape[0]  # Linear (out, in) and 1x1 conv (out, in, 1, 1) alike


def _inputs(layer: NormedLayer) -> int:
    return layer.linear.weight.shape[1]


@register_attention(LevitAttention)
@register_attention(AttentionDownsample)
def attention_geometry(attn: nn.Module, args: tuple) -> tuple[float, float, int]:
    """Queries and keys are the rows and columns of the attention-bias index (a downsample's queries are the
    subsampled tokens, its keys all tokens), in the token and the map layout alike; the batch is the input's."""
    queries, keys = attn.attention_bias_idxs.shape
    return args[0].shape[0] * queries, keys, attn.num_heads * (attn.key_dim + attn.val_dim)


def _shrink(attn: nn.Module, field: str) -> Callable[[int], None]:
    """on_prune of a Q/K ('key') or V ('val') group: timm's forward splits and reshapes by these fields."""
    def resize(removed_per_head: int) -> None:
        setattr(attn, f"{field}_dim", getattr(attn, f"{field}_dim") - removed_per_head)
        setattr(attn, f"{field}_attn_dim", attn.num_heads * getattr(attn, f"{field}_dim"))
    return resize


def _attention_groups(attn: nn.Module, common: dict) -> list[Group]:
    """Q/K and V groups of a LeViT attention, whose `scale` (the original key_dim ** -0.5) is kept. Attention: one
    qkv whose rows are, per head, [q (key_dim) | k (key_dim) | v (val_dim)]. AttentionDownsample: q, on the
    subsampled tokens, [q of head 0 | q of head 1 | ...], and kv, per head [k (key_dim) | v (val_dim)]. The V rows
    are read by the proj's columns h * val_dim + j (behind its activation)."""
    heads = attn.num_heads
    if isinstance(attn, LevitAttention):
        def qk_layout() -> list[Slice]:
            kd, stride = attn.key_dim, 2 * attn.key_dim + attn.val_dim
            return _per_head(attn.qkv, heads, stride, 0, kd) + _per_head(attn.qkv, heads, stride, kd, kd)

        def v_rows() -> list[Slice]:
            return _per_head(attn.qkv, heads, 2 * attn.key_dim + attn.val_dim, 2 * attn.key_dim, attn.val_dim)
    else:
        def qk_layout() -> list[Slice]:
            kd = attn.key_dim
            return _rows(attn.q.ln, 0, 0, heads * kd) + _per_head(attn.kv, heads, kd + attn.val_dim, 0, kd)

        def v_rows() -> list[Slice]:
            return _per_head(attn.kv, heads, attn.key_dim + attn.val_dim, attn.key_dim, attn.val_dim)

    return [Group("qk", heads=heads, attention=attn, layout=qk_layout, count=lambda: heads * attn.key_dim,
                  on_prune=_shrink(attn, "key"), **common),
            Group("v", heads=heads, attention=attn, count=lambda: heads * attn.val_dim,
                  layout=lambda: v_rows() + _columns(attn.proj.ln, heads * attn.val_dim),
                  on_prune=_shrink(attn, "val"), **common)]


def _ffn_group(mlp: LevitMlp, common: dict) -> Group:
    return Group("ffn", heads=1, count=lambda: _outputs(mlp.ln1),
                 layout=lambda: _rows(mlp.ln1, 0, 0, _outputs(mlp.ln1)) + _columns(mlp.ln2, _outputs(mlp.ln1)),
                 **common)


@register_block(LevitBlock, family="LeViT (levit_*, levit_conv_*)")
def block_groups(name: str, block: nn.Module) -> list[Group]:
    """A LeViT block: its attention's Q/K and V groups and its MLP's hidden group."""
    common = dict(block=name, stage=stage_of(name), width=lambda: _inputs(block.attn.qkv))
    return _attention_groups(block.attn, common) + [_ffn_group(block.mlp, common)]


@register_block(LevitDownsample)
def downsample_groups(name: str, down: nn.Module) -> list[Group]:
    """The transition into stage s (`stages.s.downsample`): the stride-2 attention's Q/K and V groups and the
    residual MLP's hidden group, one row of stage s. Its width is stage s's (the attention's output, which the MLP
    reads); the attention reads stage s-1's stream."""
    common = dict(block=name, stage=stage_of(name), width=lambda: _inputs(down.mlp.ln1))
    return _attention_groups(down.attn_downsample, common) + [_ffn_group(down.mlp, common)]


def _mlp_stream(mlp: LevitMlp, width: int) -> list[Slice]:
    """A residual MLP on the stream: it reads every channel (ln1's columns) and writes every channel (ln2)."""
    return _columns(mlp.ln1, width) + _rows(mlp.ln2, 0, 0, width)


def _stage_width(model: Levit, s: int) -> Group:
    """The width of LeViT stage s: its source (the stem's last Conv-BN for stage 0, else the transition's
    attention proj and its residual MLP), every block's qkv columns, proj rows and MLP, and the readers after the
    stage: the next transition's kv and q columns, or the classifier heads' BatchNorm1d and Linear columns (the
    distilled model's head_dist too)."""
    stages = list(model.stages)
    stage = stages[s]
    source = model.stem[-1] if s == 0 else stage.downsample.attn_downsample.proj.ln
    nxt = stages[s + 1].downsample.attn_downsample if s + 1 < len(stages) else None

    def count() -> int:
        return _outputs(source)

    def layout() -> list[Slice]:
        width = count()
        slices = _rows(source, 0, 0, width) + (_mlp_stream(stage.downsample.mlp, width) if s else [])
        for block in stage.blocks:
            slices += _columns(block.attn.qkv, width) + _rows(block.attn.proj.ln, 0, 0, width)
            slices += _mlp_stream(block.mlp, width)
        if nxt is not None:
            return slices + _columns(nxt.kv, width) + _columns(nxt.q.ln, width)
        return slices + [Slice(layer, axis, 0, 0, width) for head in (model.head, getattr(model, "head_dist", None))
                         if isinstance(head, NormLinear) for layer, axis in ((head.bn, "out"), (head.linear, "in"))]

    def resize(removed: int) -> None:
        width = count()
        model.feature_info[s]["num_chs"] = width
        model.embed_dim = tuple(width if i == s else d for i, d in enumerate(model.embed_dim))
        if nxt is None:
            set_sizes(model, num_features=width, head_hidden_size=width)

    return Group("width", block=f"stages.{s}", stage=s, heads=1, width=count, layout=layout, count=count,
                 on_prune=resize)


@register_model(Levit)
def width_groups(model: nn.Module) -> list[Group]:
    """One width group per LeViT stage (`_stage_width`). Refused: a custom stem (timm's `stem_backbone`), whose
    layer writing stage 0's stream is not known, and a stage without a transition (down_op ''), which would share
    its width with the stage before."""
    if not isinstance(model.stem, (Stem8, Stem16)):
        raise UnsupportedModelError(f"stem ({type(model.stem).__name__}) is not timm's LeViT Stem8/Stem16, whose last "
                                    f"Conv-BN the pruner takes as stage 0's source")
    for s, stage in enumerate(list(model.stages)[1:], start=1):
        if not isinstance(stage.downsample, LevitDownsample):
            raise UnsupportedModelError(f"stages.{s}.downsample ({type(stage.downsample).__name__}) is not timm's "
                                        f"LevitDownsample: stage widths without a transition are not supported")
    return [_stage_width(model, s) for s in range(len(model.stages))]
