"""timm Swin Transformer v1: one residual-stream width group per stage, through PatchMerging (its blocks are
timm blocks, see vit.py)."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from timm.models.swin_transformer import PatchMerging, SwinTransformer

from analysis.taylor_prune.builders import register_model
from analysis.taylor_prune.builders.common import block_stream
from analysis.taylor_prune.groups import Group, Slice, set_sizes, whole
from experiments.models import UnsupportedModelError


@register_model(SwinTransformer)
def width_groups(model: nn.Module) -> list[Group]:
    """One residual-stream width per timm Swin stage: its input projection (patch embedding for stage 0, the
    stage's PatchMerging reduction rows otherwise), every block's LayerNorms and stream Linears, and its reader
    after the stage: the next PatchMerging (norm channels and reduction columns c, C+c, 2C+c, 3C+c, the 2x2
    neighbours being concatenated channel-wise), or the final norm and the classifier."""
    stages, groups = list(model.layers), []
    for s, stage in enumerate(stages):
        nxt = stages[s + 1].downsample if s + 1 < len(stages) else None
        if (s and not isinstance(stage.downsample, PatchMerging)) or (nxt is not None and not isinstance(
                nxt, PatchMerging)):
            raise UnsupportedModelError(f"layers.{s}: a Swin stage without timm's PatchMerging between stages")

        def count(stage: nn.Module = stage) -> int:
            return stage.blocks[0].norm1.normalized_shape[0]

        def layout(s: int = s, stage: nn.Module = stage, nxt: Optional[nn.Module] = nxt) -> list[Slice]:
            width = count(stage)
            entries = [(model.patch_embed.proj, "out"), (model.patch_embed.norm, "out")] if s == 0 else [
                (stage.downsample.reduction, "out")]
            entries += [e for block in stage.blocks for e in block_stream(block)]
            if nxt is None:
                entries += [(model.norm, "out"), (model.head.fc, "in")]
            slices = whole(width, entries)
            if nxt is not None:
                slices += [Slice(layer, axis, k * width, 0, width) for k in range(4)
                           for layer, axis in ((nxt.norm, "out"), (nxt.reduction, "in"))]
            return slices

        def resize(removed: int, s: int = s, stage: nn.Module = stage, nxt: Optional[nn.Module] = nxt) -> None:
            width = count(stage)
            for block in stage.blocks:
                set_sizes(block, dim=width)
            if s:
                set_sizes(stage.downsample, out_dim=width)
            if nxt is not None:
                set_sizes(stages[s + 1], dim=width)
                set_sizes(nxt, dim=width)
            else:
                set_sizes(model, num_features=width, head_hidden_size=width)
                set_sizes(model.head, in_features=width, num_features=width)

        groups.append(Group("width", block=f"layers.{s}", stage=s, heads=1, width=count, layout=layout,
                            count=count, on_prune=resize))
    return groups
