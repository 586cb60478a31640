"""How well each importance estimate predicts the loss a removal really adds, across groups of every kind: the
check behind the latency target's ranking (docs/pruning.md, "What a unit is worth").

    python -m analysis.taylor_prune.estimate_check --model deit_proxy          # -> runs/estimate_check/

A latency target divides a unit's importance by the latency it saves, an absolute amount, so importances must be
in one unit across groups (a stream-width channel against an FFN channel). For each group of a trained model this
removes `--removals` random sets of an eighth of its units (one at least), each from a fresh copy, and measures the
mean loss change on `--eval-batches` batches against what each estimate predicts for the set: `loss_change`
(LossChange, the per-batch squared Taylor sum over the structure), `taylor_sum` (torch-pruning's |w * dL/dw| summed,
no normalization) and `taylor_mean` (the same normalized by its group's mean, the MAC path's default). Per estimate
the summary gives the rank correlation with the measured change over all removals, and per kind the median of
measured / estimated: an estimate whose ratios agree across kinds ranks units of different kinds as the loss does.

Outputs (--out): <model>_removals.csv (one row per removal) and <model>_estimates.csv (one row per estimate).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import spearmanr

from analysis.taylor_prune import cli as prune_cli
from analysis.taylor_prune.builders import prepare, prunable
from analysis.taylor_prune.groups import prune_channels
from analysis.taylor_prune.importance import Batches, LossChange, TaylorImportance, accumulate_gradients
from evit.builder.io import write_csv
from evit.cli import UserError, option, parse_settings, run_cli
from evit.data import load_batches
from evit.models import model_img_size
from evit.zoo import load_for_command

ESTIMATES = ("loss_change", "taylor_sum", "taylor_mean")


def mean_loss(model: nn.Module, batches: Batches) -> float:
    with torch.no_grad():
        total = sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in batches)
    return total / sum(len(y) for _, y in batches)


def removals(model: nn.Module, gradient_batches: Batches, eval_batches: Batches, per_group: int = 2,
             seed: int = 0) -> pd.DataFrame:
    """One row per removal: a group's kind, block, units removed, each estimate's prediction for them and the
    measured change of the mean loss on `eval_batches` (each removal on a fresh copy of `model`)."""
    model = prunable(copy.deepcopy(model)).eval()
    groups = prepare(model)
    loss_change = LossChange()
    accumulate_gradients(model, gradient_batches, lambda: loss_change.observe(groups))
    scores = {name: [scorer(g) for g in groups] for name, scorer in
              (("loss_change", loss_change), ("taylor_sum", TaylorImportance("none", "sum")),
               ("taylor_mean", TaylorImportance("mean", "sum")))}
    base = mean_loss(model, eval_batches)
    rng = np.random.default_rng(seed)
    rows = []
    for i, group in enumerate(groups):
        per_head = group.channels // group.heads
        for _ in range(per_group):
            picked = rng.choice(per_head, max(1, per_head // 8), replace=False)
            channels = sorted(h * per_head + int(c) for h in range(group.heads) for c in picked)
            copied = copy.deepcopy(model)
            prune_channels(prepare(copied)[i], channels)
            rows.append(dict(kind=group.kind, block=group.block, units=len(picked), channels=len(channels),
                             measured=mean_loss(copied, eval_batches) - base,
                             **{name: float(s[i][channels].sum()) for name, s in scores.items()}))
    return pd.DataFrame(rows)


def estimates(table: pd.DataFrame) -> pd.DataFrame:
    """Per estimate: Spearman correlation with the measured change, and per kind the median of measured /
    estimated (removals that lowered the loss count as no change), with the spread of those medians (max / min)."""
    rows = []
    measured = table.measured.clip(lower=0)
    for name in ESTIMATES:
        ratio = (measured / table[name].clip(lower=1e-12)).groupby(table.kind).median()
        positive = ratio[ratio > 0]
        rows.append(dict(estimate=name, spearman=float(spearmanr(table[name], table.measured).statistic),
                         **{f"ratio_{kind}": float(r) for kind, r in ratio.items()},
                         ratio_spread=float(positive.max() / positive.min()) if len(positive) > 1 else np.nan))
    return pd.DataFrame(rows)


@dataclass
class Settings:
    """What `python -m analysis.taylor_prune.estimate_check` measures: its fields are the command's flags."""
    model: str = option("deit_proxy", "a model `python -m analysis.taylor_prune` prunes")
    weights: str = option("auto", "auto | proxy | quick-proxy | pretrained | random | PATH (a trained model: random "
                          "weights say nothing about importance)")
    data: str = option("fashion_mnist", "fashion_mnist | digits | imagefolder:PATH (the data the weights were "
                       "trained on)")
    data_dir: Optional[str] = option(None, "folder holding the data (None: the default location)")
    batches: int = option(4, "gradient batches (as the pruning's --batches)")
    batch: int = option(32, "images per batch")
    eval_batches: int = option(16, "batches of 64 training images the loss change is measured on")
    removals: int = option(2, "random removals per group")
    seed: int = option(0, "which channels are removed")
    threads: int = option(1, "torch CPU threads")
    out: Path = option(Path("runs/estimate_check"), "output folder")

    def check(self) -> None:
        if min(self.batches, self.batch, self.eval_batches, self.removals, self.threads) < 1:
            raise UserError("--batches, --batch, --eval-batches, --removals and --threads must be >= 1")
        prune_cli.check_inputs(prune_cli.Settings(model=self.model, weights=self.weights, data=self.data,
                                        data_dir=self.data_dir))


def run(settings: Settings) -> pd.DataFrame:
    settings.check()
    torch.set_num_threads(settings.threads)
    model, weights = load_for_command(settings.model, settings.weights)
    img_size = model_img_size(model)
    gradient, _, _ = load_batches(settings.data, img_size, settings.batches, settings.batch, 0, settings.data_dir)
    # The loss is measured on other training images than the gradients' (a later part of the same fixed order).
    measured_on, _, _ = load_batches(settings.data, img_size, settings.batches + settings.eval_batches, 64, 0,
                                     settings.data_dir)
    table = removals(model, gradient, measured_on[settings.batches:], settings.removals, settings.seed)
    summary = estimates(table).assign(model=settings.model, weights=weights, removals=len(table))
    stem = Path(settings.model).stem
    print(f"-> {write_csv(table.round(8), Path(settings.out) / f'{stem}_removals.csv')}")
    print(f"-> {write_csv(summary.round(5), Path(settings.out) / f'{stem}_estimates.csv')}")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> pd.DataFrame:
    return run_cli(lambda: run(parse_settings(Settings, argv, "python -m analysis.taylor_prune.estimate_check",
                                              __doc__)))


if __name__ == "__main__":
    main()
