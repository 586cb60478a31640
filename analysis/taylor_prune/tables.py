"""Per-block and per-stage tables of a pruned model's widths, ratios, MACs and params."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import pandas as pd

from analysis.taylor_prune.groups import Group

GROUP_LABELS = {"qk": "Q/K", "v": "V", "ffn": "FFN hidden"}


def block_table(groups: Sequence[Group], macs_before: dict[str, float], macs_after: dict[str, float],
                params_before: dict[str, int], params_after: dict[str, int],
                group_ms: Optional[dict[int, tuple[float, float]]] = None) -> pd.DataFrame:
    """One row per block: the block's input width before and after (the residual stream, if pruned) and their
    ratio (width_kept), and per group kind the channels before and after (an evit sandwich's two FFNs summed),
    their ratio to the input width (per FFN) before and after, the kept fraction, and the block's MACs and params.
    With `group_ms` (id(group) -> ms before, after, from the latency table): per kind the ms its channels cost
    before and after ({kind}_ms_before, {kind}_ms; NaN for a group without a table)."""
    rows: dict[str, dict] = {}
    for group in (g for g in groups if g.kind != "width"):
        row = rows.setdefault(group.block, dict(block=len(rows), name=group.block, stage=group.stage, heads=1,
                                                in_dim_before=group.in_dim_before, in_dim=group.width()))
        if group.kind != "ffn":
            row["heads"] = group.heads
        kind = group.kind
        n = row[f"_{kind}_groups"] = row.get(f"_{kind}_groups", 0) + 1
        row[f"{kind}_dim_before"] = row.get(f"{kind}_dim_before", 0) + group.original * group.dims
        row[f"{kind}_dim"] = row.get(f"{kind}_dim", 0) + group.channels * group.dims
        row[f"{kind}_ratio_before"] = row[f"{kind}_dim_before"] / (n * row["in_dim_before"])
        row[f"{kind}_ratio"] = row[f"{kind}_dim"] / (n * row["in_dim"])
        row[f"{kind}_kept"] = row[f"{kind}_dim"] / row[f"{kind}_dim_before"]
        if group_ms is not None:
            before, after = group_ms.get(id(group), (math.nan, math.nan))
            row[f"{kind}_ms_before"] = row.get(f"{kind}_ms_before", 0.0) + before
            row[f"{kind}_ms"] = row.get(f"{kind}_ms", 0.0) + after
    for name, row in rows.items():
        row["width_kept"] = row["in_dim"] / row["in_dim_before"]
        prefix = name + "."
        row["macs_before_m"] = sum(v for k, v in macs_before.items() if k.startswith(prefix)) / 1e6
        row["macs_after_m"] = sum(v for k, v in macs_after.items() if k.startswith(prefix)) / 1e6
        row["params_before_m"], row["params_after_m"] = params_before[name] / 1e6, params_after[name] / 1e6
    df = pd.DataFrame(rows.values())
    suffixes = ("dim_before", "dim", "ratio_before", "ratio", "kept") + (("ms_before", "ms") if group_ms is not None
                                                                        else ())
    for kind in GROUP_LABELS:  # blocks without attention (evit 'none' mixers) leave NaN; keep the columns regardless
        for suffix in suffixes:
            if f"{kind}_{suffix}" not in df:
                df[f"{kind}_{suffix}"] = math.nan
    return df.loc[:, ~df.columns.str.startswith("_")]


def stage_table(blocks: pd.DataFrame) -> pd.DataFrame:
    """One row per stage: input width before and after, mean ratios and kept fractions over its blocks, and the
    MACs and params of its blocks (the stage transitions not included); ms per kind summed, where the blocks have
    them."""
    means = {c: (c, "mean") for k in GROUP_LABELS for c in (f"{k}_ratio", f"{k}_kept")}
    ms = {c: (c, "sum") for k in GROUP_LABELS for c in (f"{k}_ms_before", f"{k}_ms") if c in blocks}
    df = blocks.groupby("stage", as_index=False).agg(
        blocks=("block", "count"), in_dim_before=("in_dim_before", "first"), in_dim=("in_dim", "first"), **means,
        macs_before_m=("macs_before_m", "sum"), macs_after_m=("macs_after_m", "sum"),
        params_before_m=("params_before_m", "sum"), params_after_m=("params_after_m", "sum"), **ms)
    df.insert(4, "width_kept", df.in_dim / df.in_dim_before)
    return df
