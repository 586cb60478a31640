"""timm EVA / EVA-02 and the other ViTs of timm's eva.py (EVA-01 eva_giant_*, eva02_*, timm's SBB ViTs with RoPE,
RoPE-ViT, DINOv3, LingBot, Perception Encoder without attention pooling): Q/K, V and FFN-hidden groups per block
(EvaBlock and the post-norm EvaBlockPostNorm, with EvaAttention or timm's AttentionRope), and the model's
residual-stream width.

Rotary position embedding (RoPE). timm rotates the patch tokens' q and k (not the prefix tokens: class and
register tokens) in PAIRS of a head's dims: pair j is dims (2j, 2j+1) in the interleaved layout (the default) or
(j, j + d/2) in the half layout (`rotate_half`: DINOv3, LingBot), rotated by the angle of frequency j, read from the
table the model passes to every block ([sin | cos], each (..., tokens, d) in the same layout; one per head for
mixed RoPE). One element of a pair alone is no unit: removing it turns the rotation into another function. So the
Q/K group counts PAIRS: at split time each head's q and k rows are permuted once into [first elements of its pairs
| second elements] (the same permutation for q and k, so q . k is unchanged, and the rotation is then in the half
layout); pair j of head h is rows h*d + j and h*d + d/2 + j, and group channel h*P + j is that pair (P pairs per
head). Heads lose different pairs, so each attention keeps `rope_pairs`, the original index of every kept pair of
every head, and rotates with those columns of the table: the kept pairs keep their own frequencies. The index is
one more slice of the Q/K group (a buffer, cut with the rows; an integer tensor, it has no importance). Without
RoPE (EVA-01) the group is in pairs too: a unit is two dims per head.
A pair costs two channels of q @ k^T (`matmuls=2`).

V: v rows, the sub-LN over the attention output (scale_attn_inner: its channels are the V channels) and proj
columns. FFN: timm's Mlp, GluMlp (fc1 rows c and hidden + c are channel c's two halves, gate and value) or SwiGLU
(fc1_g and fc1_x rows c): one group whose channel c covers both halves, the norm over the hidden channels
(scale_mlp) and fc2 column c. Where a LayerNorm spans V or FFN channels, removing one changes its statistics, so
outputs move slightly even for channels that carry nothing.

Refused (one line): q/k norms (one LayerNorm over the head dim, shared by all heads, cannot lose a different dim in
each head), grouped-query attention, the sigmoid output gate, odd head dims, norms other than LayerNorm (RmsNorm);
attention pooling (global_pool 'map') is refused by `prepare` (AttentionPoolLatent has no builder).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import GluMlp, Mlp, SwiGLU, maybe_add_mask, resolve_self_attn_mask
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm

from analysis.taylor_prune.attention import PrunedAttention
from analysis.taylor_prune.builders import register_block, register_model
from analysis.taylor_prune.builders.common import split_heads, split_rows, stream_width
from analysis.taylor_prune.groups import Group, Slice, stage_of, whole
from evit.models import UnsupportedModelError


def _require_layer_norms(owner: str, norms: dict[str, nn.Module]) -> None:
    """Only LayerNorm (or no norm) is pruned per channel here; an RmsNorm would be left out of its group."""
    for name, norm in norms.items():
        if not isinstance(norm, (nn.LayerNorm, nn.Identity)):
            raise UnsupportedModelError(f"{owner}.{name} ({type(norm).__name__}) is not a LayerNorm, which the "
                                        f"pruner does not carry over")


def _refuse_variants(name: str, attn: nn.Module) -> None:
    """One line for each attention variant whose channels cannot be carried over."""
    reason = None
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        reason = "q/k norms (one norm over the head dim for all heads: no head can lose a dim of its own)"
    elif getattr(attn, "num_kv_groups", 1) > 1:
        reason = "grouped-query attention (fewer K/V heads than Q heads)"
    elif attn.gate is not None:
        reason = "a sigmoid output gate"
    elif attn.head_dim % 2:
        reason = f"an odd head dim ({attn.head_dim}): Q/K dims are pruned in rotary pairs"
    if reason:
        raise UnsupportedModelError(f"{name} ({type(attn).__name__}) has {reason}, which the pruner does not "
                                    f"carry over")
    _require_layer_norms(name, {"norm": attn.norm})


def _pair_order(num_heads: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """Row order putting each head's interleaved pairs (2j, 2j+1) into [all 2j | all 2j+1]."""
    within = torch.cat([torch.arange(0, head_dim, 2, device=device), torch.arange(1, head_dim, 2, device=device)])
    return (torch.arange(num_heads, device=device)[:, None] * head_dim + within).flatten()


class SplitEvaAttention(PrunedAttention):
    """EvaAttention / AttentionRope with separate q, k, v projections (a fused qkv is split; EvaAttention's q_bias
    and v_bias become q's and v's biases, its k_bias is a constant zero), q and k rows in the half rotary layout,
    and `rope_pairs`, the original pair index of every kept Q/K pair per head (see the module docstring). The
    softmax scale stays the original one, the sub-LN `norm` and the prefix tokens' exemption from RoPE stay."""

    def __init__(self, attn: nn.Module, name: str):
        super().__init__()
        _refuse_variants(name, attn)
        if attn.qkv is None:
            self.q, self.k, self.v = attn.q_proj, attn.k_proj, attn.v_proj
        else:
            fused_bias = attn.qkv.bias.chunk(3) if attn.qkv.bias is not None else (None,) * 3
            biases = (attn.q_bias, None, attn.v_bias) if isinstance(attn, EvaAttention) else fused_bias
            self.q, self.k, self.v = split_rows(attn.qkv, biases)
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.num_prefix_tokens = attn.num_prefix_tokens
        self.rotate_half = attn.rotate_half  # the layout of the model's rope tables (q and k rows: always half)
        self.attn_drop, self.norm, self.proj, self.proj_drop = attn.attn_drop, attn.norm, attn.proj, attn.proj_drop
        device = self.q.weight.device
        if not self.rotate_half:
            rows = _pair_order(self.num_heads, attn.head_dim, device)
            with torch.no_grad():
                for param in (self.q.weight, self.q.bias, self.k.weight, self.k.bias):
                    if param is not None:
                        param.copy_(param[rows])
        pairs = attn.head_dim // 2
        self.register_buffer("rope_pairs", torch.arange(pairs, device=device).repeat(self.num_heads))

    def matmul_channels(self) -> int:
        return self.q.out_features + self.v.out_features

    def _per_head(self, table: torch.Tensor) -> torch.Tensor:
        """A per-pair table (..., [heads or 1,] tokens, pairs) as (..., heads, tokens, kept pairs): each head's
        kept pairs at their own frequencies."""
        table = table if table.dim() > 2 else table.unsqueeze(0)
        shape = (*table.shape[:-3], self.num_heads, table.shape[-2])
        index = self.rope_pairs.view(self.num_heads, 1, -1).expand(*shape, -1)
        return table.expand(*shape, table.shape[-1]).gather(-1, index)

    def _rotate(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """timm's rotation of every pair (a, b) -> (a cos - b sin, b cos + a sin), in the half layout."""
        first, second = x.chunk(2, dim=-1)
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = (split_heads(layer(x), self.num_heads) for layer in (self.q, self.k, self.v))
        if rope is not None:
            sin, cos = rope.chunk(2, dim=-1)  # (..., tokens, original head dim) each, in the model's layout
            half = sin.shape[-1] // 2
            sin, cos = (self._per_head(t[..., :half] if self.rotate_half else t[..., 0::2]) for t in (sin, cos))
            npt = self.num_prefix_tokens
            q, k = (torch.cat([t[:, :, :npt], self._rotate(t[:, :, npt:], sin, cos)], dim=2).type_as(v)
                    for t in (q, k))
        self.record(q, k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(tokens, attn, attn_mask, is_causal=is_causal))
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(self.norm(out)))


def _qk_layout(attn: SplitEvaAttention) -> list[Slice]:
    """Pair j of head h (group channel h*P + j): rows h*d + j and h*d + P + j of q and of k, and its entry in the
    pair index."""
    pairs = attn.q.out_features // (2 * attn.num_heads)
    slices = [Slice(layer, "out", h * 2 * pairs + half * pairs, h * pairs, pairs)
              for layer in (attn.q, attn.k) for h in range(attn.num_heads) for half in (0, 1)]
    return slices + [Slice(attn, "last", 0, 0, attn.num_heads * pairs, param="rope_pairs")]


def _ffn_rows(name: str, mlp: nn.Module) -> list[tuple[nn.Linear, int]]:
    """(layer, offset) of each place a hidden channel's row lives: fc1 (Mlp), both halves of fc1 (GluMlp), fc1_g
    and fc1_x (SwiGLU)."""
    if isinstance(mlp, SwiGLU):
        return [(mlp.fc1_g, 0), (mlp.fc1_x, 0)]
    if isinstance(mlp, GluMlp):
        return [(mlp.fc1, 0), (mlp.fc1, mlp.fc2.in_features)]
    if isinstance(mlp, Mlp):
        return [(mlp.fc1, 0)]
    raise UnsupportedModelError(f"{name}.mlp ({type(mlp).__name__}) is not timm's Mlp, GluMlp or SwiGLU")


def _ffn_layout(name: str, mlp: nn.Module) -> list[Slice]:
    hidden = mlp.fc2.in_features
    rows = [Slice(layer, "out", offset, 0, hidden) for layer, offset in _ffn_rows(name, mlp)]
    return rows + whole(hidden, [(mlp.norm, "out"), (mlp.fc2, "in")])


@register_block((EvaBlock, EvaBlockPostNorm), family="EVA/EVA-02 and timm's eva.py ViTs (RoPE, DINOv3, PE)")
def block_groups(name: str, block: nn.Module) -> list[Group]:
    """An eva.py block (pre- or post-norm): its attention split (see SplitEvaAttention); Q/K in rotary pairs,
    V with the sub-LN, FFN with both halves of a gated FFN."""
    if not isinstance(block.attn, SplitEvaAttention):
        _require_layer_norms(name, {"norm1": block.norm1, "norm2": block.norm2, "mlp.norm": block.mlp.norm})
        _ffn_rows(name, block.mlp)
        block.attn = SplitEvaAttention(block.attn, f"{name}.attn")
    attn, mlp = block.attn, block.mlp
    common = dict(block=name, stage=stage_of(name), width=lambda: attn.q.in_features)
    return [Group("qk", heads=attn.num_heads, attention=attn, matmuls=2, dims=2,
                  count=lambda: attn.q.out_features // 2, layout=lambda: _qk_layout(attn), **common),
            Group("v", heads=attn.num_heads, attention=attn, count=lambda: attn.v.out_features,
                  layout=lambda: whole(attn.v.out_features, [(attn.v, "out"), (attn.norm, "out"), (attn.proj, "in")]),
                  **common),
            Group("ffn", heads=1, count=lambda: mlp.fc2.in_features, layout=lambda: _ffn_layout(name, mlp),
                  **common)]


def _block_stream(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """The layers of a (split) eva.py block that read or write the residual stream (its norms too: pre-norm ones
    read it, post-norm ones write it)."""
    attn, mlp = block.attn, block.mlp
    fc1 = [(layer, "in") for layer in dict.fromkeys(layer for layer, _ in _ffn_rows("", mlp))]  # GluMlp: once
    return [(block.norm1, "out"), (attn.q, "in"), (attn.k, "in"), (attn.v, "in"), (attn.proj, "out"),
            (block.norm2, "out"), *fc1, (mlp.fc2, "out")]


@register_model(Eva)
def width_groups(model: nn.Module) -> list[Group]:
    """The residual-stream width of an eva.py Eva: patch embedding outputs, class and register tokens, position
    embedding, the pre-blocks norm, every block's norms, Linears on the stream and LayerScale gammas, the final
    norm or the pooled features' fc_norm, and the classifier. Rotary tables are per head dim: not in it."""
    _require_layer_norms("model", {"patch_embed.norm": model.patch_embed.norm, "norm_pre": model.norm_pre,
                                   "norm": model.norm, "fc_norm": model.fc_norm})
    return stream_width(model, lambda: list(model.blocks), _block_stream)
