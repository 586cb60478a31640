"""timm Twins (`twins_pcpvt_*`, `twins_svt_*`): Q/K, V and FFN-hidden groups per block, with keys and values from
the spatially reduced stream (global sub-sampled attention, PVT v2's) or from the token's own window (locally grouped
attention), and one residual-stream width group per stage."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.twins import Block, GlobalSubSampleAttn, LocallyGroupedAttn, Twins

from analysis.taylor_prune.attention import PrunedAttention
from analysis.taylor_prune.builders import register_block, register_model
from analysis.taylor_prune.builders.common import (attention_groups, block_stream, ffn_group, fused_biases, split_heads,
                                                  split_rows)
from analysis.taylor_prune.builders.pvt import SpatialReductionAttention
from analysis.taylor_prune.groups import Group, Slice, set_sizes, whole
from evit.models import UnsupportedModelError


class LocallyGroupedAttention(PrunedAttention):
    """Twins' locally grouped attention (LSA) with its fused qkv split into q, k and v Linears: every token attends
    to the tokens of its own ws x ws window. As in timm, the token grid is zero-padded at the right and bottom to
    whole windows and the padded tokens are attended to (their keys and values are the biases), so the queries and
    keys recorded are the padded windows' ones, which fvcore counts too. The softmax scale stays the original one."""

    def __init__(self, attn: LocallyGroupedAttn):
        super().__init__()
        self.q, self.k, self.v = split_rows(attn.qkv, fused_biases(attn.qkv, 3))
        self.num_heads, self.scale, self.ws = attn.num_heads, attn.scale, attn.ws
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop

    def matmul_channels(self) -> int:
        return self.q.out_features + self.v.out_features

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        batch, tokens, channels = x.shape
        (height, width), ws = size, self.ws
        grid = F.pad(x.view(batch, height, width, channels), (0, 0, 0, -width % ws, 0, -height % ws))
        rows, cols = grid.shape[1] // ws, grid.shape[2] // ws
        windows = grid.reshape(batch, rows, ws, cols, ws, channels).transpose(2, 3).reshape(-1, ws * ws, channels)
        q, k, v = (split_heads(layer(windows), self.num_heads) for layer in (self.q, self.k, self.v))
        self.record(q, k)
        attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(batch, rows, cols, ws, ws, -1).transpose(2, 3)
        out = out.reshape(batch, rows * ws, cols * ws, -1)[:, :height, :width].reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(out))


@register_block(Block, family="Twins (PCPVT, SVT)")
def block_groups(name: str, block: Block) -> list[Group]:
    """Twins block: Q/K and V groups of its split attention (LSA in windows or GSA on the reduced stream) and the
    FFN hidden group."""
    if isinstance(block.attn, LocallyGroupedAttn):
        block.attn = LocallyGroupedAttention(block.attn)
    elif isinstance(block.attn, GlobalSubSampleAttn):
        block.attn = SpatialReductionAttention(block.attn)  # GSA: PVT v2's q, kv, reduction conv and norm
    elif not isinstance(block.attn, (LocallyGroupedAttention, SpatialReductionAttention)):
        raise UnsupportedModelError(f"{name}.attn ({type(block.attn).__name__}) is neither Twins' locally grouped "
                                    f"nor its global sub-sampled attention")
    return attention_groups(name, block.attn) + [ffn_group(name, block.mlp, lambda: block.attn.q.in_features)]


def _stream(block: Block) -> list[tuple[nn.Module, str]]:
    """The block's layers that read or write the stream: a timm block's, and GSA's reduction conv (its columns and
    its rows: the reduced tokens are stream channels) and its LayerNorm."""
    sr, norm = getattr(block.attn, "sr", None), getattr(block.attn, "norm", None)  # LSA has neither
    return block_stream(block) + [(sr, "in"), (sr, "out"), (norm, "out")]


@register_model(Twins)
def width_groups(model: Twins) -> list[Group]:
    """One residual-stream width per stage: its patch embedding's conv rows and norm, every block's stream layers,
    the position encoding generator after the first block (a depthwise conv added to the stream: its rows and bias
    are stream channels), and the stage's readers: the next patch embedding's conv columns, or the final norm and
    the classifier."""
    stages = len(model.blocks)
    groups = []
    for s in range(stages):
        embed, blocks, pos_conv = model.patch_embeds[s], model.blocks[s], model.pos_block[s].proj[0]
        readers = [(model.patch_embeds[s + 1].proj, "in")] if s + 1 < stages else [(model.norm, "out"),
                                                                                   (model.head, "in")]

        def count(embed: nn.Module = embed) -> int:
            return embed.proj.out_channels

        def layout(embed: nn.Module = embed, blocks: nn.Module = blocks, pos_conv: nn.Module = pos_conv,
                   readers: list[tuple[nn.Module, str]] = readers) -> list[Slice]:
            entries = [(embed.proj, "out"), (embed.norm, "out"), (pos_conv, "out")]
            return whole(count(embed), entries + [e for block in blocks for e in _stream(block)] + readers)

        def resize(removed: int, s: int = s, embed: nn.Module = embed) -> None:
            width = count(embed)
            model.feature_info[s]["num_chs"] = width
            model.embed_dims = [*model.embed_dims[:s], width, *model.embed_dims[s + 1:]]
            if s + 1 == stages:
                set_sizes(model, num_features=width, head_hidden_size=width)

        groups.append(Group("width", block=f"blocks.{s}", stage=s, heads=1, width=count, layout=layout, count=count,
                            on_prune=resize))
    return groups
