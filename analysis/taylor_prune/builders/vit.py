"""timm blocks with a fused-qkv attention and a plain Mlp (ViT, DeiT, DeiT-III, Swin v1's blocks): Q/K, V and
FFN-hidden groups per block, and a VisionTransformer's residual-stream width."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.models.swin_transformer import WindowAttention
from timm.models.vision_transformer import Attention, VisionTransformer

from analysis.taylor_prune.attention import PrunedAttention
from analysis.taylor_prune.builders import register_block, register_model
from analysis.taylor_prune.builders.common import (attention_groups, ffn_group, fused_biases, split_heads,
                                                  split_rows, stream_width)
from analysis.taylor_prune.groups import Group
from evit.models import UnsupportedModelError


class SplitAttention(PrunedAttention):
    """timm's Attention / Swin WindowAttention / BEiT's Attention with separate q, k, v projections, so that Q/K
    and V are separate pruning groups and each head's Q/K and V dims can shrink. The softmax scale stays the
    original one, so pruned channels whose weights are zero leave the output unchanged. BEiT's separate q_bias and
    v_bias become q's and v's biases (k has none), so a channel's bias is pruned with its row."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        separate = hasattr(attn, "q_bias")  # BEiT
        biases = (attn.q_bias, None, attn.v_bias) if separate else fused_biases(attn.qkv, 3)
        self.q, self.k, self.v = split_rows(attn.qkv, biases)
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop
        # Swin, BEiT: keep the module that owns the relative-position bias (a table per head; heads are never
        # pruned), without the weights that now live here.
        self.bias_owner = None
        if getattr(attn, "relative_position_bias_table", None) is not None:
            del attn.qkv
            attn.proj = None
            if separate:
                attn.q_bias = attn.k_bias = attn.v_bias = None
            self.bias_owner = attn

    def matmul_channels(self) -> int:
        return self.q.out_features + self.v.out_features

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = (split_heads(layer(x), self.num_heads) for layer in (self.q, self.k, self.v))
        self.record(q, k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.bias_owner is not None:
            attn = attn + self.bias_owner._get_rel_pos_bias()
            if mask is not None:  # Swin's shifted-window mask, (num_windows, N, N)
                windows = mask.shape[0]
                attn = attn.view(-1, windows, self.num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, tokens, tokens)
        if attn_mask is not None:  # ViT's attention mask, BEiT's bias shared by all blocks
            attn = attn + attn_mask
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(out))


def _timm_block(module: nn.Module) -> bool:
    """A block of timm's VisionTransformer (also in MobileViT) or Swin v1: an `attn` of timm's Attention or Swin's
    WindowAttention (split already, on a second pass) beside an `mlp`."""
    return isinstance(getattr(module, "attn", None), (Attention, WindowAttention, SplitAttention)) and hasattr(
        module, "mlp")


@register_block(_timm_block, family="ViT/DeiT/DeiT-III (incl. distilled), MobileViT, Swin v1")
def block_groups(name: str, block: nn.Module) -> list[Group]:
    """timm ViT / Swin block: fused qkv split into q, k, v Linears; Q/K, V and FFN-hidden groups."""
    if not isinstance(block.attn, SplitAttention):
        attn = block.attn
        plain = all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
        if not plain or getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"{name}.attn ({type(attn).__name__}) has q/k norms or a gate, which the "
                                        f"pruner does not carry over")
        block.attn = SplitAttention(attn)
    return attention_groups(name, block.attn) + [ffn_group(name, block.mlp, lambda: block.attn.q.in_features)]


@register_model(VisionTransformer)
def width_groups(model: nn.Module) -> list[Group]:
    """The residual-stream width of a timm VisionTransformer (`common.stream_width`; with a distilled DeiT's second
    token and classifier). Pruning it changes the LayerNorms' statistics, so outputs move slightly even for
    channels that carry nothing."""
    return stream_width(model, lambda: list(model.blocks))
