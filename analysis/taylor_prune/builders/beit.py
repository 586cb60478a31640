"""timm BEiT: a fused qkv without bias plus separate q and v biases (k has none), a relative position bias per
block's heads or one shared by all blocks (passed through every block's forward), LayerScale as bare gammas. Q/K,
V and FFN-hidden groups per block, and the model's residual-stream width."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.models.beit import Attention as BeitAttention, Beit, Block as BeitBlock

from analysis.taylor_prune.attention import PrunedAttention
from analysis.taylor_prune.builders import register_block, register_model
from analysis.taylor_prune.builders.common import attention_groups, ffn_group, split_heads, split_rows, stream_width
from analysis.taylor_prune.groups import Group


class SplitBeitAttention(PrunedAttention):
    """BEiT's Attention with separate q, k, v projections: q_bias becomes q's bias and v_bias v's (so a Q/K or V
    channel's bias is pruned with its row), k stays without one. A block's own relative position table (one column
    per head; heads are never pruned) stays with its timm module, stripped of the weights now held here, to build
    the bias; the model's shared bias comes through the forward. The scale is the original one."""

    def __init__(self, attn: BeitAttention):
        super().__init__()
        self.q, self.k, self.v = split_rows(attn.qkv, (attn.q_bias, None, attn.v_bias))
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop
        self.bias_owner = None
        if attn.relative_position_bias_table is not None:
            del attn.qkv
            attn.proj = attn.q_bias = attn.k_bias = attn.v_bias = None
            self.bias_owner = attn

    def matmul_channels(self) -> int:
        return self.q.out_features + self.v.out_features

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = (split_heads(layer(x), self.num_heads) for layer in (self.q, self.k, self.v))
        self.record(q, k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.bias_owner is not None:
            attn = attn + self.bias_owner._get_rel_pos_bias()
        if shared_rel_pos_bias is not None:
            attn = attn + shared_rel_pos_bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(out))


@register_block(BeitBlock, family="BEiT")
def block_groups(name: str, block: nn.Module) -> list[Group]:
    """A BEiT block: the fused qkv and the q/v biases split into q, k, v Linears; its FFN must be a plain Mlp (not
    the SwiGLU or the hidden-norm variants)."""
    if isinstance(block.attn, BeitAttention):
        block.attn = SplitBeitAttention(block.attn)
    return attention_groups(name, block.attn) + [ffn_group(name, block.mlp, lambda: block.attn.q.in_features)]


@register_model(Beit)
def width_groups(model: nn.Module) -> list[Group]:
    """The residual stream of a timm Beit, up to the final norm or the pooled features' fc_norm and the classifier.
    The relative position biases are per head: not in it."""
    return stream_width(model, lambda: list(model.blocks))
