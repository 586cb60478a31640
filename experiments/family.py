"""EfficientViT models trained and benchmarked side by side: accuracy against throughput (the paper's Fig. 1).

    python -m experiments.family                                   # M0-M5, one fixed budget on Fashion-MNIST
    python -m experiments.family --models evit_m0,results/taylor_prune/deit_proxy_allocation.yaml
    python -m experiments.family --data imagefolder:/data/imagenet --img-size 224 --launcher slurm --partition gpu \
        --gpus-per-job 8 --time 2880                               # each model a Slurm job (docs/launch.md)

Every model (an evit preset or an evit config file) is trained with the same budget at proxy resolution
(Fashion-MNIST, 64 px), and timed with the paper's speed method at 224 px (BN folded, traced, CPU, batch 16,
1 thread). Training runs sit in OUT/runs (job logs in its `jobs/`), keyed by model and budget, and resume when
interrupted, so a re-run only times the models again.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from evit.config import PAPER
from evit.io import save_figure, write_csv
from experiments import launch
from experiments.benchmark import benchmark_model
from experiments.claims import CONFIRMED, INCONCLUSIVE, REFUTED, Claim
from experiments.cli import UserError, option, parse_settings, run_cli
from experiments.launch import Launcher
from experiments.models import check_model
from experiments.train import TrainConfig

PRESETS = tuple(f"evit_m{i}" for i in range(6))
# One budget for every model: short enough for M0-M5 to train in about half an hour on one core.
BUDGET = dict(data="fashion_mnist", img_size=64, epochs=3, limit_train=20000, limit_val=5000, batch_size=128,
              lr=1e-3, threads=1)


def budget_config(model: str, **overrides: Any) -> TrainConfig:
    return TrainConfig(model=model, **{**BUDGET, **overrides})


def train_and_time(models: Sequence[str], runs_dir: Path = Path("results/family/runs"), quick_timing: bool = True,
                   launcher: Optional[Launcher] = None, **budget: Any) -> pd.DataFrame:
    """One row per model that trained: proxy accuracy after the budget, params, FLOPs and CPU throughput at
    224 px. Every model trains first (as `launcher`'s jobs, default inline, each in its folder under `runs_dir`
    keyed by model and budget; finished runs are kept), then the trained ones are timed; the runs that failed are
    named on stderr."""
    from tqdm import tqdm

    configs = [budget_config(name, **budget) for name in models]
    outcomes = launch.run_trainings(configs, runs_dir, launcher)
    missing = launch.missing_report(outcomes)
    if missing:
        print(missing, file=sys.stderr)
    timing = dict(warmup_s=1.0, seconds=1.0, repeats=3) if quick_timing else {}
    rows = []
    for name, cfg, outcome in tqdm(list(zip(models, configs, outcomes)), desc="family", unit="model"):
        if not outcome.finished:
            continue
        speed = benchmark_model(name, "cpu", batches=(16,), backends=("trace",), **timing)[0]
        preset = name.removeprefix("evit_")
        paper = PAPER.get(preset, {})
        rows.append(dict(model=Path(name).stem, params_m=speed["params_m"], flops_m=speed["flops_m"],
                         val_acc=outcome.metrics["val_acc"], train_time_s=outcome.train_time_s,
                         epochs=cfg.epochs, limit_train=cfg.limit_train, img_size=cfg.img_size,
                         batch_size=cfg.batch_size,
                         throughput_cpu=speed["throughput"], throughput_cpu_min=speed["throughput_min"],
                         throughput_cpu_max=speed["throughput_max"], paper_top1=paper.get("top1"),
                         paper_v100_img_s=paper.get("v100_img_s")))
    if not rows:
        raise UserError(f"no model of the family trained; {missing}")
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


@dataclass
class Settings(Launcher):
    """What `python -m experiments.family` trains and times, and where its trainings run (the launcher's flags):
    its fields are the command's flags."""
    models: list[str] = option(list(PRESETS), "evit presets or evit config files, comma-separated (default: M0-M5)")
    data: str = option(BUDGET["data"], "fashion_mnist | digits | imagefolder:PATH (PATH/train, PATH/val)")
    epochs: int = option(BUDGET["epochs"], "training epochs")
    limit_train: int = option(BUDGET["limit_train"], "training images (0: all)")
    limit_val: int = option(BUDGET["limit_val"], "validation images (0: all)")
    img_size: int = option(BUDGET["img_size"], "training resolution")
    batch_size: int = option(BUDGET["batch_size"], "training batch (small budgets need the updates of a small one)")
    full_timing: bool = option(False, "the benchmark's full timing (~35 s a model)")
    name: str = option("family", "stem of the CSV and figure")
    out: Path = option(Path("results/family"), "output folder (the training runs in its runs/)")

    def check(self) -> None:
        super().check()
        for model in self.models:
            check_model(model)


def run(settings: Settings) -> pd.DataFrame:
    """Train and time every model of `settings`; write <name>.csv and <name>.png into settings.out."""
    settings.check()
    out = Path(settings.out)
    df = train_and_time(settings.models, out / "runs", not settings.full_timing, Launcher.of(settings),
                        data=settings.data, epochs=settings.epochs, batch_size=settings.batch_size, img_size=settings.img_size,
                        limit_train=settings.limit_train or None, limit_val=settings.limit_val or None)
    print(f"-> {write_csv(df.round(4), out / f'{settings.name}.csv')}")
    print(f"-> {save_figure(plot(df), out / f'{settings.name}.png')}")
    print(df[["model", "params_m", "flops_m", "val_acc", "throughput_cpu", "train_time_s"]].to_string(
        index=False, float_format=lambda v: f"{v:.4g}"))
    return df


def main(argv: Optional[Sequence[str]] = None) -> pd.DataFrame:
    return run_cli(lambda: run(parse_settings(Settings, argv, "python -m experiments.family", __doc__)))


if __name__ == "__main__":
    main()
