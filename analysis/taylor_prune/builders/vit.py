"""timm blocks with a fused-qkv attention and a plain Mlp (ViT, DeiT, DeiT-III, Swin v1's blocks): Q/K, V and
FFN-hidden groups per block, and a VisionTransformer's residual-stream width."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.models.swin_transformer import WindowAttention
from timm.models.vision_transformer import Attention, VisionTransformer

from analysis.taylor_prune.attention import PrunedAttention
from analysis.taylor_prune.builders import register_block, register_model
from analysis.taylor_prune.groups import Group, Slice, set_sizes, stage_of, whole
from experiments.models import UnsupportedModelError


class SplitAttention(PrunedAttention):
    """timm's Attention / Swin WindowAttention with separate q, k, v projections, so that Q/K and V are separate
    pruning groups and each head's Q/K and V dims can shrink. The softmax scale stays the original one, so
    pruned channels whose weights are zero leave the output unchanged."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        qkv = attn.qkv
        width = qkv.out_features // 3
        self.q, self.k, self.v = (nn.Linear(qkv.in_features, width, bias=qkv.bias is not None,
                                            device=qkv.weight.device, dtype=qkv.weight.dtype) for _ in range(3))
        with torch.no_grad():
            for i, layer in enumerate((self.q, self.k, self.v)):
                layer.weight.copy_(qkv.weight[i * width:(i + 1) * width])
                if qkv.bias is not None:
                    layer.bias.copy_(qkv.bias[i * width:(i + 1) * width])
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop
        # Swin: keep the module that owns the relative-position bias (a table per head; heads are never pruned),
        # without its qkv and proj, whose weights now live here.
        self.bias_owner = None
        if hasattr(attn, "relative_position_bias_table"):
            del attn.qkv
            attn.proj = None
            self.bias_owner = attn

    def matmul_channels(self) -> int:
        return self.q.out_features + self.v.out_features

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        self.record(q, k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.bias_owner is not None:
            attn = attn + self.bias_owner._get_rel_pos_bias()
            if mask is not None:  # Swin's shifted-window mask, (num_windows, N, N)
                windows = mask.shape[0]
                attn = attn.view(-1, windows, self.num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, tokens, tokens)
        elif attn_mask is not None:
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
    attn, mlp = block.attn, block.mlp
    if not isinstance(mlp, Mlp) or not isinstance(mlp.norm, nn.Identity):
        raise UnsupportedModelError(f"{name}.mlp ({type(mlp).__name__}) is not a plain timm Mlp")
    common = dict(block=name, stage=stage_of(name), width=lambda: attn.q.in_features)
    return [Group("qk", heads=attn.num_heads, attention=attn, count=lambda: attn.q.out_features,
                  layout=lambda: whole(attn.q.out_features, [(attn.q, "out"), (attn.k, "out")]), **common),
            Group("v", heads=attn.num_heads, attention=attn, count=lambda: attn.v.out_features,
                  layout=lambda: whole(attn.v.out_features, [(attn.v, "out"), (attn.proj, "in")]), **common),
            Group("ffn", heads=1, count=lambda: mlp.fc1.out_features,
                  layout=lambda: whole(mlp.fc1.out_features, [(mlp.fc1, "out"), (mlp.fc2, "in")]), **common)]


def block_stream(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """The layers of a (split) timm block that read or write the residual stream."""
    attn, mlp = block.attn, block.mlp
    return [(block.norm1, "out"), (attn.q, "in"), (attn.k, "in"), (attn.v, "in"), (attn.proj, "out"),
            (getattr(block, "ls1", None), "last"), (block.norm2, "out"), (mlp.fc1, "in"), (mlp.fc2, "out"),
            (getattr(block, "ls2", None), "last")]


@register_model(VisionTransformer)
def width_groups(model: nn.Module) -> list[Group]:
    """The residual-stream width of a timm VisionTransformer: patch embedding outputs, class/distillation/register
    tokens and position embedding, every LayerNorm and LayerScale on the stream, every Linear reading or writing it.
    Pruning it changes the LayerNorms' statistics, so outputs move slightly even for channels that carry nothing."""
    if not isinstance(model.patch_embed.proj, nn.Conv2d):
        return []
    count = lambda: model.patch_embed.proj.out_channels  # noqa: E731

    def layout() -> list[Slice]:
        entries = [(model.patch_embed.proj, "out"), (model.patch_embed.norm, "out")]
        entries += [e for block in model.blocks for e in block_stream(block)]
        entries += [(model.norm, "out"), (model.fc_norm, "out"), (model.head, "in"),
                    (getattr(model, "head_dist", None), "in")]  # distilled DeiT's second classifier
        tokens = ("cls_token", "dist_token", "reg_token", "pos_embed")
        return [Slice(model, "last", 0, 0, count(), param=p) for p in tokens
                if getattr(model, p, None) is not None] + whole(count(), entries)

    def resize(removed: int) -> None:
        set_sizes(model, embed_dim=count(), num_features=count(), head_hidden_size=count())

    return [Group("width", block="embed", stage=0, heads=1, width=count, layout=layout, count=count,
                  on_prune=resize)]
