"""timm Swin Transformer v2 (`swinv2_*`) and its second implementation (`swinv2_cr_*`): Q/K, V and FFN-hidden
groups per block through a split cosine attention (their stage widths: swin.py, with v1's)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import SwinTransformerV2Block, WindowAttention
from timm.models.swin_transformer_v2_cr import SwinTransformerV2CrBlock, WindowMultiHeadAttention

from analysis.taylor_prune.attention import PrunedAttention
from analysis.taylor_prune.builders import register_block
from analysis.taylor_prune.builders.common import attention_groups, ffn_group, split_heads, split_rows
from analysis.taylor_prune.groups import Group

MAX_LOGIT_SCALE = math.log(1. / 0.01)  # timm's clamp of the per-head logit scale, before exp


class CosineWindowAttention(PrunedAttention):
    """Swin v2's window attention (timm's WindowAttention, swinv2_cr's WindowMultiHeadAttention) with separate q, k,
    v projections. Cosine attention: each head's q and k are L2-normalized, so a Q/K dim that is zero for every
    token leaves q/|q| and k/|k| and so the output unchanged when removed; there is no softmax scale, only the
    per-head logit scale, kept as it is. The original module stays as `bias_owner`, without its projections, for
    its logit scale and continuous position bias (an MLP on the window's coordinate table, one value per head)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        qkv = attn.qkv
        # swinv2_cr has a fused bias; v2 has q_bias and v_bias (its k bias is a zero buffer, so k gets none)
        biases = qkv.bias.chunk(3) if qkv.bias is not None else (attn.q_bias, None, attn.v_bias)
        self.q, self.k, self.v = split_rows(qkv, biases)
        self.num_heads = attn.num_heads
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop
        del attn.qkv
        attn.proj = None
        if isinstance(attn, WindowAttention):
            attn.q_bias = attn.v_bias = None  # now the q and v Linears' biases
        self.bias_owner = attn

    def matmul_channels(self) -> int:
        return self.q.out_features + self.v.out_features

    def position_bias(self) -> torch.Tensor:
        """(1, heads, N, N): v2's is 16 * sigmoid of its MLP, gathered from the (2Wh-1)(2Ww-1) relative offsets;
        swinv2_cr's MLP runs on every query-key pair."""
        owner = self.bias_owner
        if isinstance(owner, WindowMultiHeadAttention):
            return owner._relative_positional_encodings()
        area = owner.window_size[0] * owner.window_size[1]
        table = owner.cpb_mlp(owner.relative_coords_table).view(-1, self.num_heads)
        bias = table[owner.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = (split_heads(layer(x), self.num_heads) for layer in (self.q, self.k, self.v))
        self.record(q, k)
        logit_scale = torch.clamp(self.bias_owner.logit_scale.view(-1, 1, 1), max=MAX_LOGIT_SCALE).exp()
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * logit_scale + self.position_bias()
        if mask is not None:  # the shifted-window mask, (num_windows, N, N)
            windows = mask.shape[0]
            attn = attn.view(-1, windows, self.num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, tokens, tokens)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(out))


@register_block((SwinTransformerV2Block, SwinTransformerV2CrBlock), family="Swin v2 (incl. swinv2_cr)")
def block_groups(name: str, block: nn.Module) -> list[Group]:
    """Swin v2 block: its attention split (CosineWindowAttention); Q/K, V and FFN-hidden groups."""
    if not isinstance(block.attn, CosineWindowAttention):
        block.attn = CosineWindowAttention(block.attn)
    return attention_groups(name, block.attn) + [ffn_group(name, block.mlp, lambda: block.attn.q.in_features)]
