"""torch-pruning 1.6's own Taylor pruning of a timm ViT/DeiT or Swin v1, the peer that experiments.prune_study sets
beside ours: `tp.pruner.BasePruner` with `tp.importance.GroupTaylorImportance` (its defaults: mean over a group's
layers, normalized by the group's mean), global ranking, optionally `isomorphic=True` (Isomorphic Pruning: units
ranked against those of groups of the same structure only), on the gradients of the same batches our pruner uses.

What the library needs to prune these models, and what it leaves to its user (docs/pruning.md, torch-pruning's
facts):

- `num_heads={attn.qkv: heads}` for every attention; head dims are pruned (the same dim of every head, heads kept
  equal) and heads never are. timm's fused qkv ties a head dim's Q, K and V rows into one unit.
- The classifier head is ignored (its classes stay), the class/register tokens and position embeddings are
  declared as bare parameters cut on their last dim (the embedding), and Swin's relative_position_bias_table
  (one column per head) is declared and ignored: otherwise the library ties it to the heads and prunes no
  attention.
- Swin's PatchMerging concatenates each 2x2 neighbourhood channels-last through a reshape, which the library's
  graph maps wrongly (the forward then crashes). While the library traces and prunes, each merging runs the same
  function with the neighbours concatenated channels-first (`torch.cat(..., dim=1)`), which it maps correctly
  (stage channel c at c, C+c, 2C+c and 3C+c); timm's own forward is back afterwards.
- After each step timm's num_heads, head_dim and attn_dim are set from the pruned qkv. Where timm calls
  scaled_dot_product_attention its softmax scale follows the pruned head dim, so each step rescales the q rows by
  sqrt(new / old head dim) and sets `scale` to match: the attention keeps the original softmax temperature, as our
  split attention does, and removing dims that carry nothing leaves the output unchanged. (Taylor scores |w * g|
  are invariant under that rescaling.)
- A group is never cut below `floor` of its channels (`max_pruning_ratio=1 - floor`, checked by the library at the
  start of each step), as our pruner keeps a floor per group.
"""
from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass
from typing import Iterator

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from timm.layers.attention import Attention
from timm.models.swin_transformer import PatchMerging, SwinTransformer, WindowAttention
from timm.models.vision_transformer import VisionTransformer

from analysis.taylor_prune import accumulate_gradients
from analysis.taylor_prune.importance import Batches
from evit.models import UnsupportedModelError

SETTINGS = ("global", "isomorphic")  # torch-pruning's global ranking, and global + isomorphic scopes
ATTENTIONS = (Attention, WindowAttention)


@dataclass
class PeerResult:
    model: nn.Module         # the pruned model (pruned in place)
    summary: dict            # the pruner's settings
    blocks: pd.DataFrame     # one row per block: the widths kept


def check_supported(model: nn.Module) -> None:
    """UnsupportedModelError unless `model` is a timm VisionTransformer or SwinTransformer (v1) with plain
    attention, the families this runner prepares for torch-pruning."""
    if not isinstance(model, (VisionTransformer, SwinTransformer)):
        raise UnsupportedModelError(f"torch-pruning's runner prunes timm ViT/DeiT and Swin v1 models; got "
                                    f"{type(model).__name__} (leave out the tp_* methods for it)")
    for name, attn in model.named_modules():
        if isinstance(attn, Attention) and not all(
                isinstance(getattr(attn, n), nn.Identity) for n in ("q_norm", "k_norm", "norm")):
            raise UnsupportedModelError(f"{name} has q/k norms, which torch-pruning's runner does not carry over")


def _bare_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """(parameter, dim cut) of the parameters outside any layer: tokens and position embeddings, on the embedding."""
    names = ("cls_token", "reg_token", "dist_token", "pos_embed", "absolute_pos_embed")
    return [(p, p.dim() - 1) for n in names if isinstance(p := getattr(model, n, None), nn.Parameter)]


def _merge_channels_first(self: PatchMerging, x: torch.Tensor) -> torch.Tensor:
    """timm's PatchMerging.forward (v1) with the 2x2 neighbours concatenated on dim 1 of a channels-first tensor:
    the same function, in the form torch-pruning's graph maps channel by channel."""
    _, height, width, _ = x.shape
    x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2)).permute(0, 3, 1, 2)
    x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]], dim=1)
    return self.reduction(self.norm(x.permute(0, 2, 3, 1)))


@contextlib.contextmanager
def traceable_mergings(model: nn.Module) -> Iterator[None]:
    """Every Swin PatchMerging of `model` runs `_merge_channels_first` inside the block, timm's forward after."""
    mergings = [m for m in model.modules() if isinstance(m, PatchMerging)]
    for merging in mergings:
        merging.forward = types.MethodType(_merge_channels_first, merging)
    try:
        yield
    finally:
        for merging in mergings:
            del merging.forward


def _head_dim(attn: nn.Module) -> int:
    return attn.qkv.out_features // (3 * attn.num_heads)


def _sync_attention(attn: nn.Module, heads: int, old: int) -> None:
    """timm's attention attributes from its pruned qkv (`heads` heads, `old` dims per head before the step); q
    rescaled so that the softmax keeps its temperature."""
    head_dim = attn.qkv.out_features // (3 * heads)
    if head_dim != old:
        with torch.no_grad():
            rows = slice(0, heads * head_dim)  # q's rows of the fused qkv
            attn.qkv.weight[rows] *= math.sqrt(head_dim / old)
            if attn.qkv.bias is not None:
                attn.qkv.bias[rows] *= math.sqrt(head_dim / old)
    attn.num_heads, attn.scale = heads, head_dim ** -0.5
    if isinstance(attn, Attention):
        attn.head_dim, attn.attn_dim = head_dim, heads * head_dim


def _widths(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Per block (a module with an attention and an mlp): (Q/K = V dims over all heads, FFN hidden, input width)."""
    return {name: (block.attn.qkv.out_features // 3, block.mlp.fc1.out_features, block.attn.qkv.in_features)
            for name, block in model.named_modules()
            if isinstance(getattr(block, "attn", None), ATTENTIONS) and hasattr(block, "mlp")}


def block_table(before: dict[str, tuple[int, int, int]], after: dict[str, tuple[int, int, int]]) -> pd.DataFrame:
    """One row per block: its Q/K (= V), FFN-hidden and input widths before and after, and the fractions kept (the
    columns our pruner's block table has for them)."""
    rows = []
    for i, (name, (qk, ffn, width)) in enumerate(before.items()):
        qk_after, ffn_after, width_after = after[name]
        rows.append(dict(block=i, name=name, in_dim_before=width, in_dim=width_after, qk_dim_before=qk,
                         qk_dim=qk_after, qk_kept=qk_after / qk, v_dim_before=qk, v_dim=qk_after,
                         v_kept=qk_after / qk, ffn_dim_before=ffn, ffn_dim=ffn_after, ffn_kept=ffn_after / ffn,
                         width_kept=width_after / width))
    return pd.DataFrame(rows)


def tp_prune(model: nn.Module, batches: Batches, pruning_ratio: float, setting: str = "global", steps: int = 5,
             floor: float = 0.1) -> PeerResult:
    """Prune `model` in place (eval mode) with torch-pruning's BasePruner and GroupTaylorImportance, removing
    `pruning_ratio` of its units (the library's knob: a share of the channels and head dims, not of the MACs) in
    `steps` iterative steps, each after gradients of the mean loss on every batch of `batches`; `setting` one of
    SETTINGS. The pruned model is timm's own, with its attributes set to its new widths."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if not 0 < pruning_ratio < 1:
        raise ValueError(f"pruning_ratio must lie in (0, 1), got {pruning_ratio}")
    check_supported(model)
    model.eval()
    attentions = [m for m in model.modules() if isinstance(m, ATTENTIONS)]
    before = _widths(model)
    tables = [a.relative_position_bias_table for a in attentions if isinstance(a, WindowAttention)]
    with traceable_mergings(model):
        pruner = tp.pruner.BasePruner(
            model, batches[0][0][:1], importance=tp.importance.GroupTaylorImportance(), global_pruning=True,
            isomorphic=setting == "isomorphic", pruning_ratio=pruning_ratio, max_pruning_ratio=1 - floor,
            iterative_steps=steps, num_heads={a.qkv: a.num_heads for a in attentions},
            ignored_layers=[model.head, *tables],
            unwrapped_parameters=_bare_parameters(model) + [(table, 1) for table in tables])
        for _ in range(steps):
            accumulate_gradients(model, batches)
            head_dims = [_head_dim(attn) for attn in attentions]
            pruner.step()
            for attn, old in zip(attentions, head_dims):
                _sync_attention(attn, pruner.num_heads[attn.qkv], old)
        model.zero_grad(set_to_none=True)
    summary = dict(pruning_ratio=pruning_ratio, setting=setting, steps=steps, floor=floor,
                   importance="GroupTaylorImportance(group_reduction=mean, normalizer=mean)",
                   params_after_m=sum(p.numel() for p in model.parameters()) / 1e6,
                   gradient_images=sum(len(labels) for _, labels in batches))
    return PeerResult(model, summary, block_table(before, _widths(model)))

