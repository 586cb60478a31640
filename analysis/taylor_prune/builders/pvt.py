"""timm Pyramid Vision Transformer v2 (`pvt_v2_*`, also the `linear` variant): Q/K, V and FFN-hidden groups per
block, with keys and values from the spatially reduced stream, and one residual-stream width group per stage."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.pvt_v2 import Attention, Block, PyramidVisionTransformerV2

from analysis.taylor_prune.attention import PrunedAttention
from analysis.taylor_prune.builders import register_block, register_model
from analysis.taylor_prune.builders.common import (attention_groups, block_stream, ffn_group, fused_biases, split_heads,
                                                  split_rows)
from analysis.taylor_prune.groups import Group, Slice, set_sizes, whole


class SpatialReductionAttention(PrunedAttention):
    """PVT v2's attention with its fused kv split into k and v Linears. Queries come from every token; keys and
    values from the reduced stream: the tokens themselves (sr_ratio 1), a strided conv of them followed by a
    LayerNorm (sr_ratio > 1), or, in the linear variant, a 1x1 conv of their 7x7 average pool, a LayerNorm and a
    GELU. That conv and norm carry stream channels (the stage's width group), not Q/K or V ones. The softmax scale
    stays the original one."""

    def __init__(self, attn: Attention):
        super().__init__()
        kv = attn.kv
        self.k, self.v = split_rows(kv, fused_biases(kv, 2))
        self.q, self.num_heads, self.scale = attn.q, attn.num_heads, attn.scale
        # Twins' global sub-sampled attention has neither the linear variant's pool nor its activation
        self.pool, self.act = getattr(attn, "pool", None), getattr(attn, "act", None)
        self.sr, self.norm = attn.sr, attn.norm
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop

    def matmul_channels(self) -> int:
        return self.q.out_features + self.v.out_features

    def reduce(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        """The tokens keys and values are computed from, (batch, keys, channels)."""
        if self.sr is None:
            return x
        grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *feat_size)
        if self.pool is not None:
            grid = self.pool(grid)
        reduced = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        return self.act(reduced) if self.act is not None else reduced

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        batch, tokens, _ = x.shape
        reduced = self.reduce(x, feat_size)
        q = split_heads(self.q(x), self.num_heads)
        k, v = split_heads(self.k(reduced), self.num_heads), split_heads(self.v(reduced), self.num_heads)
        self.record(q, k)
        attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(out))


@register_block(Block, family="PVT v2 (incl. linear)")
def block_groups(name: str, block: Block) -> list[Group]:
    """PVT v2 block: Q/K and V groups of its split attention, and the FFN hidden group (MlpWithDepthwiseConv: fc1
    rows, the depthwise 3x3 conv's channels, fc2 columns)."""
    if not isinstance(block.attn, SpatialReductionAttention):
        block.attn = SpatialReductionAttention(block.attn)
    return attention_groups(name, block.attn) + [
        ffn_group(name, block.mlp, lambda: block.attn.q.in_features, between=("dwconv",))]


@register_model(PyramidVisionTransformerV2)
def width_groups(model: PyramidVisionTransformerV2) -> list[Group]:
    """One residual-stream width per stage: its overlapping patch embedding's conv rows and norm, every block's
    stream layers (with the spatial-reduction conv, both its columns and rows, and its norm), the stage's final
    norm, and its reader: the next stage's patch-embedding conv columns, or the classifier."""
    stages = list(model.stages)
    groups = []
    for s, stage in enumerate(stages):
        embed = model.patch_embed if s == 0 else stage.downsample
        reader = stages[s + 1].downsample.proj if s + 1 < len(stages) else model.head

        def count(stage: nn.Module = stage) -> int:
            return stage.norm.normalized_shape[0]

        def layout(stage: nn.Module = stage, embed: nn.Module = embed, reader: nn.Module = reader) -> list[Slice]:
            entries = [(embed.proj, "out"), (embed.norm, "out")]
            for block in stage.blocks:
                attn = block.attn
                entries += block_stream(block) + [(attn.sr, "in"), (attn.sr, "out"), (attn.norm, "out")]
            return whole(count(stage), entries + [(stage.norm, "out"), (reader, "in")])

        def resize(removed: int, s: int = s, stage: nn.Module = stage) -> None:
            width = count(stage)
            model.feature_info[s]["num_chs"] = width
            if s + 1 == len(stages):
                set_sizes(model, num_features=width, head_hidden_size=width)

        groups.append(Group("width", block=f"stages.{s}", stage=s, heads=1, width=count, layout=layout,
                            count=count, on_prune=resize))
    return groups
