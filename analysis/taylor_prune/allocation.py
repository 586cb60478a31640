"""Findings -> builder: an EfficientViT config from a pruned model's kept ratios, at a preset's FLOPs."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import pandas as pd

from evit import EfficientViTConfig, get_preset


def allocation_config(blocks: pd.DataFrame, preset: str = "m0", match_flops: bool = True,
                      name: str = "taylor_allocation", mixer: str = "cga",
                      attention_share: Optional[float] = None) -> EfficientViTConfig:
    """An EfficientViT config from a pruned model's block table. The blocks are cut into as many consecutive
    parts as the preset has stages (early, middle, late); each part's means set that stage's
    - width: the preset's width times the kept input width (width_kept; 1 without that column),
    - Q/K dim per head: qk_ratio * width / heads, FFN ratio: ffn_ratio,
    - V: mixer 'cga' keeps V = width / heads (the cascade needs it; the paper's finding that V stays close to the
      input width agrees), mixer 'mhsa' takes v_ratio (MHSA allows any V dim).
    attention_share (the MHSA-proportion study's finding, Fig. 3): attention in that share of the blocks, evenly
    spaced and ending at the last one (analysis.mhsa_ratio.attention_blocks), the others mixer 'none'; None keeps
    attention in every block.
    With match_flops the widths are then scaled together until the config's BN-folded fvcore FLOPs at 224 px are
    closest to the preset's, for a comparison at equal cost."""
    from analysis.mhsa_ratio import attention_blocks, staged_mixers

    if mixer not in ("cga", "mhsa"):
        raise ValueError(f"mixer must be 'cga' or 'mhsa', got {mixer!r}")
    if attention_share is not None and not 0 <= attention_share <= 1:
        raise ValueError(f"attention_share must lie in [0, 1], got {attention_share}")
    base = get_preset(preset)
    mixers = mixer if attention_share is None else staged_mixers(
        base.depths, attention_blocks(sum(base.depths), attention_share), mixer)
    parts = _split(blocks.sort_values("block"), base.num_stages)

    def means(values: Callable[[pd.DataFrame], pd.Series], defaults: Sequence[float]) -> list[float]:
        out = []
        for part, default in zip(parts, defaults):
            value = values(part).mean() if len(part) else math.nan
            out.append(default if math.isnan(value) else float(value))
        return out

    column = lambda c: (lambda p: p[c] if c in p else pd.Series(dtype=float))  # noqa: E731
    ones = [1.0] * base.num_stages
    width = means(column("width_kept"), ones)
    qk, v, ffn = means(column("qk_ratio"), ones), means(column("v_ratio"), ones), means(column("ffn_ratio"),
                                                                                       base.mlp_ratio)

    def build(scale: float) -> EfficientViTConfig:
        dims = []
        for i, (c, w, h) in enumerate(zip(base.embed_dims, width, base.num_heads)):
            # C / H a multiple of 4; stage 0 also divisible by the patch embedding's halvings
            step = math.lcm(4 * h, 2 ** (base.stem_depth - 1) if i == 0 else 1)
            dims.append(max(step, round(c * w * scale / step) * step))
        key_dims = tuple(max(4, round(r * c / h / 4) * 4) for r, c, h in zip(qk, dims, base.num_heads))
        v_ratio = tuple(max(0.25, round(r, 2)) for r in v) if mixer == "mhsa" else 1.0
        return base.replace(embed_dims=tuple(dims), key_dims=key_dims, v_ratio=v_ratio, mixers=mixers,
                            mlp_ratio=tuple(max(0.5, round(r * 4) / 4) for r in ffn), name=name)

    if not match_flops:
        return build(1.0)
    goal, low, high = _flops(base), 0.25, 4.0
    for _ in range(10):  # FLOPs grow with the width scale: bisect (widths are rounded anyway)
        mid = (low * high) ** 0.5
        low, high = (mid, high) if _flops(build(mid)) < goal else (low, mid)
    return min((build(low), build(high)), key=lambda c: abs(_flops(c) - goal))


def _split(df: pd.DataFrame, parts: int) -> list[pd.DataFrame]:
    """`parts` consecutive chunks of the rows, as equal as possible (a row repeats when there are fewer rows)."""
    bounds = [round(i * len(df) / parts) for i in range(parts + 1)]
    return [df.iloc[min(bounds[i], len(df) - 1):max(bounds[i + 1], bounds[i] + 1)] for i in range(parts)]


def _flops(config: EfficientViTConfig) -> float:
    from evit import fuse
    from evit.efficientvit import EfficientViT
    from evit.summary import count_flops

    return count_flops(fuse(EfficientViT(config.replace(img_size=224)).eval()), 224)
