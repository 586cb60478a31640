"""EfficientViT models trained and benchmarked side by side: accuracy against throughput (the paper's Fig. 1).

    python -m experiments.family                                   # M0-M5, one fixed budget on Fashion-MNIST
    python -m experiments.family --models evit_m0,results/taylor_prune/deit_proxy_allocation.yaml

Every model (an evit preset or an evit config file) is trained with the same budget at proxy resolution
(Fashion-MNIST, 64 px), and timed with the paper's speed method at 224 px (BN folded, traced, CPU, batch 16,
1 thread). Training runs are cached in experiments.zoo.cache_dir() / "family", keyed by model and budget, and
resume when interrupted, so a re-run only times the models again.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from evit.config import PAPER
from evit.io import save_figure, write_csv
from experiments.benchmark import benchmark_model
from experiments.claims import CONFIRMED, INCONCLUSIVE, REFUTED, Claim
from experiments.models import is_config_file
from experiments.train import FINAL, TrainConfig, fit, load_checkpoint, run_cli
from experiments.zoo import cache_dir

PRESETS = tuple(f"evit_m{i}" for i in range(6))
# One budget for every model: short enough for M0-M5 to train in about half an hour on one core.
BUDGET = dict(data="fashion_mnist", img_size=64, epochs=3, limit_train=20000, limit_val=5000, batch_size=128,
              lr=1e-3, threads=1)


def budget_config(model: str, **overrides: Any) -> TrainConfig:
    return TrainConfig(model=model, **{**BUDGET, **overrides})


def run_dir(cfg: TrainConfig) -> Path:
    """Cache folder of a training run, keyed by what determines its weights (a config file by its content)."""
    recipe = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "resume", "workers", "threads")}
    if is_config_file(cfg.model):
        recipe["model"] = Path(cfg.model).read_text()
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_dir() / "family" / f"{Path(cfg.model).stem}-{key}"


def train_once(cfg: TrainConfig) -> dict[str, Any]:
    """Final metrics of the run `cfg` describes, training it (or resuming it) unless it finished before."""
    out = run_dir(cfg)
    if not (out / FINAL).is_file():
        fit(dataclasses.replace(cfg, out=str(out), resume="auto"))
    history = json.loads((out / "metrics.json").read_text())["history"]
    metrics = load_checkpoint(out / FINAL).get("metrics", {})
    return dict(val_acc=metrics.get("val_acc"), train_time_s=sum(row["epoch_time_s"] for row in history))


def train_and_time(models: Sequence[str], quick_timing: bool = True, **budget: Any) -> pd.DataFrame:
    """One row per model: proxy accuracy after the budget, params, FLOPs and CPU throughput at 224 px."""
    from tqdm import tqdm

    timing = dict(warmup_s=1.0, seconds=1.0, repeats=3) if quick_timing else {}
    rows = []
    for name in tqdm(models, desc="family", unit="model"):
        cfg = budget_config(name, **budget)
        trained = train_once(cfg)
        speed = benchmark_model(name, "cpu", batches=(16,), backends=("trace",), **timing)[0]
        preset = name.removeprefix("evit_")
        paper = PAPER.get(preset, {})
        rows.append(dict(model=Path(name).stem, params_m=speed["params_m"], flops_m=speed["flops_m"], **trained,
                         epochs=cfg.epochs, limit_train=cfg.limit_train, img_size=cfg.img_size,
                         batch_size=cfg.batch_size,
                         throughput_cpu=speed["throughput"], throughput_cpu_min=speed["throughput_min"],
                         throughput_cpu_max=speed["throughput_max"], paper_top1=paper.get("top1"),
                         paper_v100_img_s=paper.get("v100_img_s")))
    return pd.DataFrame(rows)


# How close the presets come to the paper's table: its FLOPs in M (ours within this percentage), its params
# rounded to 0.1 M (ours within the rounding).
FLOPS_TOLERANCE_PCT, PARAMS_TOLERANCE_M = 0.5, 0.05
# The rank correlation of accuracy with throughput at or below which faster presets are the less accurate.
TRADE_OFF_CORRELATION = -0.6


def presets_claims(presets: pd.DataFrame) -> list[Claim]:
    """The presets have the paper's params and FLOPs (BN folded), judged on evit.summary's preset table."""
    flops_gap = float(presets.flops_fused_vs_paper_pct.abs().max())
    params_gap = float((presets.params_fused_m - presets.paper_params_m).abs().max())
    close = flops_gap <= FLOPS_TOLERANCE_PCT and params_gap <= PARAMS_TOLERANCE_M
    return [Claim("the presets have the paper's params and FLOPs.", CONFIRMED if close else REFUTED,
                  f"with BN folded, every preset's fvcore FLOPs are within {flops_gap:.2f}% of the paper's and its "
                  f"params within {params_gap:.2f} M (the paper gives them to 0.1 M).",
                  {"largest FLOPs gap to the paper (%)": flops_gap, "largest params gap to the paper (M)": params_gap})]


def claims(family: pd.DataFrame) -> list[Claim]:
    """Larger presets trade speed for accuracy, judged on `train_and_time`'s table (none with fewer than two presets)."""
    presets = family[family.model.str.fullmatch(r"evit_m\d")]
    if len(presets) < 2:
        return []
    correlation = float(presets.val_acc.corr(presets.throughput_cpu, method="spearman"))
    return [Claim("larger presets trade speed for accuracy.",
                  CONFIRMED if correlation <= TRADE_OFF_CORRELATION else INCONCLUSIVE,
                  f"the Spearman rank correlation of accuracy with throughput is {correlation:+.2f} (a trade-off: "
                  f"{TRADE_OFF_CORRELATION:+.1f} or below); one seed and a short budget on upsampled 28 px images "
                  f"favour models that converge fast, so this is a weak test.",
                  {"Spearman correlation of accuracy with throughput": correlation})]


def plot(df: pd.DataFrame):
    """Left: our proxy accuracy vs our CPU throughput. Right: the paper's ImageNet top-1 vs V100 throughput."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ours, theirs = fig.subplots(1, 2)
    ours.errorbar(df.throughput_cpu, df.val_acc, xerr=[df.throughput_cpu - df.throughput_cpu_min,
                                                        df.throughput_cpu_max - df.throughput_cpu],
                  fmt="o-", capsize=3)
    for r in df.itertuples():
        ours.annotate(r.model, (r.throughput_cpu, r.val_acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    first = df.iloc[0]
    ours.set(xlabel="images / s (CPU, 1 thread, batch 16, 224 px, BN folded + traced)",
             ylabel="Fashion-MNIST val accuracy (%)",
             title=f"this run: {first.epochs} epochs on {first.limit_train or 60000} images at {first.img_size} px")
    paper = df.dropna(subset=["paper_top1"])
    theirs.plot(paper.paper_v100_img_s, paper.paper_top1, "s-", color="gray")
    for r in paper.itertuples():
        theirs.annotate(r.model, (r.paper_v100_img_s, r.paper_top1), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    theirs.set(xlabel="images / s (paper: V100, batch 2048)", ylabel="ImageNet top-1 (%)",
               title="paper (different data and hardware)")
    for ax in (ours, theirs):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv: Optional[Sequence[str]] = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(prog="python -m experiments.family", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(PRESETS), help="evit presets or evit config files, comma-separated")
    parser.add_argument("--epochs", type=int, default=BUDGET["epochs"])
    parser.add_argument("--limit-train", type=int, default=BUDGET["limit_train"], help="training images (0: all)")
    parser.add_argument("--limit-val", type=int, default=BUDGET["limit_val"], help="validation images (0: all)")
    parser.add_argument("--img-size", type=int, default=BUDGET["img_size"], help="training resolution")
    parser.add_argument("--batch-size", type=int, default=BUDGET["batch_size"],
                        help="training batch (small budgets need the updates of a small one)")
    parser.add_argument("--full-timing", action="store_true", help="the benchmark's full timing (~35 s a model)")
    parser.add_argument("--name", default="family", help="stem of the CSV and figure")
    parser.add_argument("--out", type=Path, default=Path("results/family"))
    args = parser.parse_args(argv)

    def body() -> pd.DataFrame:
        df = train_and_time(args.models.split(","), not args.full_timing, epochs=args.epochs, batch_size=args.batch_size,
                      img_size=args.img_size,
                      limit_train=args.limit_train or None, limit_val=args.limit_val or None)
        print(f"-> {write_csv(df.round(4), args.out / f'{args.name}.csv')}")
        print(f"-> {save_figure(plot(df), args.out / f'{args.name}.png')}")
        print(df[["model", "params_m", "flops_m", "val_acc", "throughput_cpu", "train_time_s"]].to_string(
            index=False, float_format=lambda v: f"{v:.4g}"))
        return df

    return run_cli(body)


if __name__ == "__main__":
    main()
