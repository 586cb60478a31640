"""timm Swin Transformers, v1 (`swin_*`), v2 (`swinv2_*`) and v2's second implementation (`swinv2_cr_*`): one
residual-stream width group per stage, through the patch mergings between stages (their blocks: vit.py for v1,
swinv2.py for v2)."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from timm.models.swin_transformer import PatchMerging, SwinTransformer
from timm.models.swin_transformer_v2 import PatchMerging as PatchMergingV2
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.swin_transformer_v2_cr import PatchMerging as PatchMergingCr
from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr

from analysis.taylor_prune.builders import register_model
from analysis.taylor_prune.builders.common import block_stream
from analysis.taylor_prune.groups import Group, Slice, set_sizes, whole
from evit.models import UnsupportedModelError

MERGINGS = (PatchMerging, PatchMergingV2, PatchMergingCr)


def merge_reads(merge: nn.Module, width: int) -> list[Slice]:
    """Where a patch merging reads the previous stage's channel c: at c, C+c, 2C+c and 3C+c of its reduction's
    columns (the 2x2 neighbours are concatenated channel-wise) and, where it normalizes before reducing (v1,
    swinv2_cr), of its norm."""
    readers = [] if isinstance(merge, PatchMergingV2) else [(merge.norm, "out")]
    readers.append((merge.reduction, "in"))
    return [Slice(layer, axis, k * width, 0, width) for k in range(4) for layer, axis in readers]


def merge_writes(merge: nn.Module) -> list[tuple[nn.Module, str]]:
    """What writes a stage's width from a patch merging: the reduction rows and, in v2, which normalizes after
    reducing, its norm."""
    return [(merge.reduction, "out")] + ([(merge.norm, "out")] if isinstance(merge, PatchMergingV2) else [])


@register_model((SwinTransformer, SwinTransformerV2, SwinTransformerV2Cr))
def width_groups(model: nn.Module) -> list[Group]:
    """One residual-stream width per stage: its writer (the patch embedding's conv and norm for stage 0, the
    stage's patch merging otherwise), every block's stream layers (v2's post-norm blocks normalize the attention
    and MLP outputs before they are added; swinv2_cr's extra norm3 on the stream), and its readers after the
    stage: the next patch merging, or the final norm (none in swinv2_cr, whose last block's norm3 is on the
    stream) and the classifier."""
    prefix = "stages" if isinstance(model, SwinTransformerV2Cr) else "layers"
    stages = list(getattr(model, prefix))
    groups = []
    for s, stage in enumerate(stages):
        nxt = stages[s + 1].downsample if s + 1 < len(stages) else None
        if (s and not isinstance(stage.downsample, MERGINGS)) or (nxt is not None and not isinstance(nxt, MERGINGS)):
            raise UnsupportedModelError(f"{prefix}.{s}: a Swin stage without timm's PatchMerging between stages")

        def count(stage: nn.Module = stage) -> int:
            return stage.blocks[0].norm1.normalized_shape[0]

        def layout(s: int = s, stage: nn.Module = stage, nxt: Optional[nn.Module] = nxt) -> list[Slice]:
            width = count(stage)
            entries = [(model.patch_embed.proj, "out"), (model.patch_embed.norm, "out")] if s == 0 else merge_writes(
                stage.downsample)
            for block in stage.blocks:
                entries += block_stream(block) + [(getattr(block, "norm3", None), "out")]
            if nxt is None:
                entries += [(getattr(model, "norm", None), "out"), (model.head.fc, "in")]
            return whole(width, entries) + (merge_reads(nxt, width) if nxt is not None else [])

        def resize(removed: int, s: int = s, stage: nn.Module = stage, nxt: Optional[nn.Module] = nxt) -> None:
            width = count(stage)
            model.feature_info[s]["num_chs"] = width
            for block in stage.blocks:
                set_sizes(block, dim=width)
            if s:
                set_sizes(stage.downsample, out_dim=width)
            else:
                set_sizes(model, embed_dim=width)
            if nxt is not None:
                set_sizes(stages[s + 1], dim=width)  # stages and mergings keep their input width as `dim`
                set_sizes(nxt, dim=width)
            else:
                set_sizes(model, num_features=width, head_hidden_size=width)
                set_sizes(model.head, in_features=width, num_features=width)

        groups.append(Group("width", block=f"{prefix}.{s}", stage=s, heads=1, width=count, layout=layout,
                            count=count, on_prune=resize))
    return groups
