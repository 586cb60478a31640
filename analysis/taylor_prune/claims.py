"""The paper's claims of Fig. 5, judged on pruned models' per-block tables (`<model>.csv`, block_table's rows):
which channels Taylor pruning keeps, by group kind, in the early, middle and late thirds of the blocks."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.taylor_prune.tables import GROUP_LABELS
from evit.claims import CONFIRMED, INCONCLUSIVE, REFUTED, Claim, names, tally

GROUPS = (*GROUP_LABELS, "width")  # the `<group>_kept` columns: the group kinds and the residual-stream width
THIRDS = ("early", "middle", "late")


def kept_by_thirds(blocks: pd.DataFrame) -> pd.DataFrame:
    """One row per model and group kind: the mean kept fraction in the early, middle and late thirds of its
    blocks (a third of at least one block). `blocks`: per-block tables, stacked, with a `model` column."""
    rows = []
    for model, table in blocks.groupby("model", sort=False):
        table = table.sort_values("block")
        bounds = [round(i * len(table) / 3) for i in range(4)]
        thirds = [table.iloc[bounds[i]:max(bounds[i + 1], bounds[i] + 1)] for i in range(3)]
        rows += [dict(model=model, group=group, **{name: float(third[f"{group}_kept"].mean())
                                                   for name, third in zip(THIRDS, thirds)})
                 for group in GROUPS if f"{group}_kept" in table]
    return pd.DataFrame(rows)


def claims(blocks: pd.DataFrame) -> list[Claim]:
    """Both claims on per-block tables, stacked with a `model` column: V kept wider than Q/K (left out when no
    model gives evidence), and early blocks kept wider than late ones."""
    kept = kept_by_thirds(blocks).set_index(["model", "group"])
    tables = {model: table for model, table in blocks.groupby("model", sort=False)}
    # CGA's V follows the stage width through its cascade (V / input width stays 1): no evidence either way.
    v_follows_width = [model for model, table in tables.items()
                       if np.allclose(table.v_ratio, table.get("v_ratio_before", table.v_ratio / table.v_kept))]
    with_v = [model for model in tables if model not in v_follows_width]
    found = [_v_wider_than_qk(kept, with_v, v_follows_width)] if with_v else []
    return found + [_early_wider_than_late(kept)]


def _v_wider_than_qk(kept: pd.DataFrame, models: list[str], no_evidence: list[str]) -> Claim:
    holds = {model: kept.at[(model, "v"), "early"] > kept.at[(model, "qk"), "early"] for model in models}
    aside = f"; {names(no_evidence)} left out (V follows the stage width there)" if no_evidence else ""
    return Claim("V is kept closer to the input width than Q/K (early blocks).", _verdict(holds),
                 f"the early blocks keep a larger fraction of V than of Q/K {tally(holds)}{aside}.",
                 {f"{model} {name} kept, early blocks": float(kept.at[(model, group), "early"])
                  for model in models for group, name in (("qk", "Q/K"), ("v", "V"))})


def _early_wider_than_late(kept: pd.DataFrame) -> Claim:
    # Every group kind of a model counts alike: the mean of their kept fractions.
    overall = kept.groupby("model", sort=False)[list(THIRDS)].mean()
    holds = {model: row.early > row.late for model, row in overall.iterrows()}
    return Claim("early blocks keep more channels than late ones.", _verdict(holds),
                 f"the early third of the blocks keeps a larger mean fraction of channels than the late third "
                 f"{tally(holds)}.",
                 {f"{model} mean kept fraction, {third} blocks": float(overall.at[model, third])
                  for model in overall.index for third in ("early", "late")})


def _verdict(holds: dict[str, bool]) -> str:
    """Confirmed when the claim holds for every model, refuted when for none, inconclusive otherwise."""
    if not any(holds.values()):
        return REFUTED
    return CONFIRMED if all(holds.values()) else INCONCLUSIVE
