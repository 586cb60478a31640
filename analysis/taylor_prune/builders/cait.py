"""timm CaiT: talking-heads self-attention blocks over the patch tokens and class-attention blocks that update the
class token alone. Q/K, V and FFN-hidden groups per block, and one residual-stream width for the whole model: the
patch tokens and the class token share it (a class-attention block reads their concatenation)."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.cait import Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn

from analysis.taylor_prune.attention import PrunedAttention
from analysis.taylor_prune.builders import register_block, register_model
from analysis.taylor_prune.builders.common import (attention_groups, ffn_group, fused_biases, split_heads, split_rows,
                                                  stream_width)
from analysis.taylor_prune.groups import Group


class SplitTalkingHeadAttn(PrunedAttention):
    """CaiT's TalkingHeadAttn with separate q, k, v projections. proj_l mixes the heads' logits before the softmax
    and proj_w the probabilities after it; heads are never pruned, so both stay as they are. The scale is the
    original one, applied to q before q @ k^T as timm does, so pruned channels that carry nothing change nothing."""

    def __init__(self, attn: TalkingHeadAttn):
        super().__init__()
        qkv = attn.qkv
        self.q, self.k, self.v = split_rows(qkv, fused_biases(qkv, 3))
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.proj_l, self.proj_w = attn.proj_l, attn.proj_w
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop

    def matmul_channels(self) -> int:
        return self.q.out_features + self.v.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = (split_heads(layer(x), self.num_heads) for layer in (self.q, self.k, self.v))
        self.record(q, k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # mixes heads: heads last
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.attn_drop(attn)
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(out))


class SplitClassAttn(PrunedAttention):
    """CaiT's ClassAttn (q, k, v are separate Linears already): the class token's query attends to the class and
    patch tokens, so one query per image. Written out rather than through SDPA, whose default scale would follow
    the pruned head dim: the scale stays the original one."""

    def __init__(self, attn: ClassAttn):
        super().__init__()
        self.q, self.k, self.v = attn.q, attn.k, attn.v
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop

    def matmul_channels(self) -> int:
        return self.q.out_features + self.v.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        q = split_heads(self.q(x[:, 0]).unsqueeze(1), self.num_heads)  # the class token only: (batch, heads, 1, dim)
        k, v = split_heads(self.k(x), self.num_heads), split_heads(self.v(x), self.num_heads)
        self.record(q, k)
        attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(batch, 1, -1)
        return self.proj_drop(self.proj(out))


def _cait_block(module: nn.Module) -> bool:
    """CaiT's own blocks with their own attentions (split already, on a second pass); XCiT's class-attention
    blocks also hold a ClassAttn, but are not these."""
    talking_heads = isinstance(module, LayerScaleBlock) and isinstance(module.attn, (TalkingHeadAttn,
                                                                                    SplitTalkingHeadAttn))
    class_attention = isinstance(module, LayerScaleBlockClassAttn) and isinstance(module.attn, (ClassAttn,
                                                                                                SplitClassAttn))
    return talking_heads or class_attention


@register_block(_cait_block, family="CaiT")
def block_groups(name: str, block: nn.Module) -> list[Group]:
    """A CaiT block: the talking-heads qkv split into q, k, v Linears, the class attention's taken as they are."""
    if isinstance(block.attn, TalkingHeadAttn):
        block.attn = SplitTalkingHeadAttn(block.attn)
    elif isinstance(block.attn, ClassAttn):
        block.attn = SplitClassAttn(block.attn)
    return attention_groups(name, block.attn) + [ffn_group(name, block.mlp, lambda: block.attn.q.in_features)]


@register_model(Cait)
def width_groups(model: nn.Module) -> list[Group]:
    """The residual stream of a timm Cait, shared by the patch tokens (`blocks`) and the class token
    (`blocks_token_only`, which also read the patch tokens), up to the final norm and the classifier."""
    return stream_width(model, lambda: list(model.blocks) + list(model.blocks_token_only or []))
