"""timm BEiT: a fused qkv without bias plus separate q and v biases (k has none), a relative position bias per
block's heads or one shared by all blocks (passed through every block's forward), LayerScale as bare gammas. Q/K,
V and FFN-hidden groups per block, and the model's residual-stream width."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.models.beit import Attention as BeitAttention, Beit, Block as BeitBlock

from analysis.taylor_prune.builders import register_block, register_model
from analysis.taylor_prune.builders.common import attention_groups, ffn_group, stream_width
from analysis.taylor_prune.builders.vit import SplitAttention
from analysis.taylor_prune.groups import Group


class SplitBeitAttention(SplitAttention):
    """BEiT's Attention split (SplitAttention: q_bias and v_bias become q's and v's biases, a block's own relative
    position table stays with its timm module); the model's bias shared by all blocks comes through the forward."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return super().forward(x, attn_mask=shared_rel_pos_bias)


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
