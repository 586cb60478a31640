"""EfficientViT models trained and benchmarked side by side: accuracy against throughput (the paper's Fig. 1).

    python -m experiments.family                                   # M0-M5, one fixed budget on Fashion-MNIST
    python -m experiments.family --models evit_m0,results/taylor_prune/deit_proxy_allocation.yaml --seeds 0,1,2
    python -m experiments.family --data imagefolder:/data/imagenet --img-size 224 --launcher slurm --partition gpu \
        --gpus-per-job 8 --time 2880                               # each model a Slurm job (docs/launch.md)

Every model (an evit preset or an evit config file) is trained with the same budget at proxy resolution
(Fashion-MNIST, 64 px) once per seed (--seeds), and timed with the paper's speed method at 224 px (BN folded,
traced; --device cpu: batch 16, 1 thread; --device cuda: batch 2048, AMP). Training runs sit in OUT/runs (job logs in
its `jobs/`), keyed by model, seed and budget, and resume when interrupted, so a re-run only times the models again.
The table has one row per model: accuracy as mean and std over its seeds, and whether it is on the Pareto front of
accuracy against measured throughput.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from evit.builder.config import PAPER
from evit.builder.io import save_figure, write_csv
from evit import launch
from experiments.benchmark import MAIN_BATCH, benchmark_model
from evit.claims import CONFIRMED, INCONCLUSIVE, REFUTED, Claim, names
from evit.cli import UserError, option, parse_settings, run_cli
from evit.launch import Launcher
from evit.models import check_model
from evit.train import TrainConfig

PRESET_MODELS = tuple(f"evit_m{i}" for i in range(6))
# One budget for every model: short enough for M0-M5 to train in about half an hour on one core.
BUDGET = dict(data="fashion_mnist", img_size=64, epochs=3, limit_train=20000, limit_val=5000, batch_size=128,
              lr=1e-3, threads=1)


def budget_config(model: str, **overrides: Any) -> TrainConfig:
    return TrainConfig(model=model, **{**BUDGET, **overrides})


def over_seeds(trained: pd.DataFrame) -> pd.DataFrame:
    """Per model (in order of appearance) of a table with one row per finished run (model, seed, val_acc,
    train_time_s): accuracy's mean and std over its seeds (NaN with one seed: no spread was measured), how many
    seeds finished, and the mean training time."""
    return trained.groupby("model", sort=False, as_index=False).agg(
        val_acc=("val_acc", "mean"), val_acc_std=("val_acc", "std"), seeds=("seed", "count"),
        train_time_s=("train_time_s", "mean"))


def train_and_time(models: Sequence[str], runs_dir: Path = Path("runs/family/runs"), quick_timing: bool = True,
                   launcher: Optional[Launcher] = None, seeds: Sequence[int] = (0,), device: str = "cpu",
                   **budget: Any) -> pd.DataFrame:
    """One row per model that trained: proxy accuracy after the budget (mean and std over `seeds`), params, FLOPs,
    throughput at 224 px on `device` (column throughput_<device>) and whether it is on the Pareto front. Every
    model trains once per seed first (as `launcher`'s jobs, default inline, each in its folder under `runs_dir`
    keyed by model, seed and budget; finished runs are kept), then the trained ones are timed; the runs that
    failed are named on stderr, and a model keeps the seeds that finished."""
    from tqdm import tqdm

    grid = [(name, seed) for name in models for seed in seeds]
    outcomes = launch.run_trainings([budget_config(name, seed=seed, **budget) for name, seed in grid], runs_dir,
                                    launcher)
    missing = launch.missing_report(outcomes)
    if missing:
        print(missing, file=sys.stderr)
    finished = [dict(model=name, seed=seed, val_acc=o.metrics["val_acc"], train_time_s=o.train_time_s)
                for (name, seed), o in zip(grid, outcomes) if o.finished]
    if not finished:
        raise UserError(f"no model of the family trained; {missing}")
    timing = dict(warmup_s=1.0, seconds=1.0, repeats=3) if quick_timing else {}
    if device == "cpu":  # the paper's CPU setting, whether or not a training ran (and set threads) in this process
        torch.set_num_threads(1)
    speed_column = f"throughput_{device}"
    rows = []
    for accuracy in tqdm(over_seeds(pd.DataFrame(finished)).to_dict("records"), desc="family", unit="model"):
        name = accuracy.pop("model")
        cfg = budget_config(name, **budget)
        speed = benchmark_model(name, device, batches=(MAIN_BATCH[device],), backends=("trace",), **timing)
        if not speed:  # benchmark_model printed why
            continue
        (speed,), paper = speed, PAPER.get(name.removeprefix("evit_"), {})
        rows.append(dict(model=Path(name).stem, params_m=speed["params_m"], flops_m=speed["flops_m"], **accuracy,
                         data=cfg.data, epochs=cfg.epochs, limit_train=cfg.limit_train, img_size=cfg.img_size,
                         batch_size=cfg.batch_size, **{speed_column + end: speed["throughput" + end]
                                                       for end in ("", "_min", "_max")},
                         paper_top1=paper.get("top1"), paper_v100_img_s=paper.get("v100_img_s")))
    if not rows:
        raise UserError(f"no model of the family could be timed on {device}")
    df = pd.DataFrame(rows)
    return df.assign(pareto=pareto_front(df))


def throughput_column(df: pd.DataFrame) -> str:
    """The table's throughput column: throughput_cpu or throughput_cuda (the device the models were timed on)."""
    return next(c for c in ("throughput_cpu", "throughput_cuda") if c in df)


def pareto_front(df: pd.DataFrame) -> pd.Series:
    """Whether each row is on the Pareto front of val_acc against throughput: no other row is at least as
    accurate and at least as fast, and strictly better in one (equal rows are all on it)."""
    acc, speed = df.val_acc.to_numpy()[:, None], df[throughput_column(df)].to_numpy()[:, None]
    # dominated[i, j]: row j dominates row i
    dominated = (acc.T >= acc) & (speed.T >= speed) & ((acc.T > acc) | (speed.T > speed))
    return pd.Series(~dominated.any(axis=1), index=df.index, name="pareto")


def is_preset(df: pd.DataFrame) -> pd.Series:
    return df.model.str.fullmatch(r"evit_m\d")


# How close the presets come to the paper's table: its FLOPs in M (ours within this percentage), its params
# rounded to 0.1 M (ours within the rounding).
FLOPS_TOLERANCE_PCT, PARAMS_TOLERANCE_M = 0.5, 0.05
# The rank correlation of accuracy with throughput at or below which faster presets are the less accurate.
TRADE_OFF_CORRELATION = -0.6


def presets_claims(presets: pd.DataFrame) -> list[Claim]:
    """The presets have the paper's params and FLOPs (BN folded), judged on evit.builder.summary's preset table."""
    flops_gap = float(presets.flops_fused_vs_paper_pct.abs().max())
    params_gap = float((presets.params_fused_m - presets.paper_params_m).abs().max())
    close = flops_gap <= FLOPS_TOLERANCE_PCT and params_gap <= PARAMS_TOLERANCE_M
    return [Claim("the presets have the paper's params and FLOPs.", CONFIRMED if close else REFUTED,
                  f"with BN folded, every preset's fvcore FLOPs are within {flops_gap:.2f}% of the paper's and its "
                  f"params within {params_gap:.2f} M (the paper gives them to 0.1 M).",
                  {"largest FLOPs gap to the paper (%)": flops_gap, "largest params gap to the paper (M)": params_gap})]


def claims(family: pd.DataFrame) -> list[Claim]:
    """Larger presets trade speed for accuracy, judged on `train_and_time`'s table (none with fewer than two
    presets)."""
    presets = family[is_preset(family)]
    if len(presets) < 2:
        return []
    correlation = float(presets.val_acc.corr(presets[throughput_column(presets)], method="spearman"))
    return [Claim("larger presets trade speed for accuracy.",
                  CONFIRMED if correlation <= TRADE_OFF_CORRELATION else INCONCLUSIVE,
                  f"the Spearman rank correlation of accuracy with throughput is {correlation:+.2f} (a trade-off: "
                  f"{TRADE_OFF_CORRELATION:+.1f} or below); {seeds_text(presets)} and a short budget on upsampled "
                  f"28 px images favour models that converge fast, so this is a weak test.",
                  {"Spearman correlation of accuracy with throughput": correlation})]


def seeds_text(df: pd.DataFrame) -> str:
    """'one seed' or 'N seeds' (the most any row had; tables written before --seeds had one)."""
    most = int(df.seeds.max()) if "seeds" in df else 1
    return "one seed" if most == 1 else f"{most} seeds"


def allocation_claims(df: pd.DataFrame, reference: str = "evit_m0") -> list[Claim]:
    """Configs derived from pruning beat `reference` at the same budget, judged on `train_and_time`'s table of
    the reference and the config files (the rows that are not presets): a config beats a model when its mean
    accuracy is higher by more than the two std combined, sqrt(std_a² + std_b²). None without the reference, a
    derived config, or two seeds of each."""
    ref = df[df.model == reference]
    derived = df[~is_preset(df) & (df.model != reference) & (df.seeds >= 2)] if "seeds" in df else df.iloc[:0]
    if ref.empty or derived.empty or int(ref.seeds.iat[0]) < 2:
        return []
    ref = ref.iloc[0]
    speed = throughput_column(df)
    gap = derived.val_acc - ref.val_acc
    margin = np.sqrt(derived.val_acc_std ** 2 + ref.val_acc_std ** 2)
    ratio = derived[speed] / ref[speed]
    verdict = CONFIRMED if (gap > margin).any() else REFUTED if (gap < -margin).all() else INCONCLUSIVE
    each = [f"{r.model} {r.val_acc:.2f} ± {r.val_acc_std:.2f}% at {q:.2f}x {reference}'s throughput ({g:+.2f} "
            f"points, margin {m:.2f})" for r, g, m, q in zip(derived.itertuples(), gap, margin, ratio)]
    numbers = {f"{reference} accuracy (%)": float(ref.val_acc), f"{reference} accuracy std (%)": float(ref.val_acc_std)}
    for r, g, m, q in zip(derived.itertuples(), gap, margin, ratio):
        numbers.update({f"{r.model} accuracy gap to {reference} (points)": float(g),
                        f"{r.model} margin (points)": float(m), f"{r.model} throughput / {reference}'s": float(q)})
    return [Claim(f"configs derived from pruning, matched to {reference}'s measured throughput, are more accurate "
                  f"than {reference} at the same budget.", verdict,
                  f"{reference} reaches {ref.val_acc:.2f} ± {ref.val_acc_std:.2f}% (mean ± std over "
                  f"{int(ref.seeds)} seeds); {'; '.join(each)}. A config beats {reference} (or loses to it) when the "
                  f"gap exceeds the margin sqrt(std_a² + std_b²); confirmed if one beats it, refuted if "
                  f"{reference} beats all of {names(derived.model)}.", numbers)]


# How each device's throughput was measured (benchmark_model with its main batch).
SPEED_METHOD = {"throughput_cpu": f"CPU, 1 thread, batch {MAIN_BATCH['cpu']}",
                "throughput_cuda": f"GPU, AMP, batch {MAIN_BATCH['cuda']}"}


def plot(df: pd.DataFrame):
    """Left: our proxy accuracy (mean ± std over seeds) vs our measured throughput, presets and config files apart,
    with the Pareto front. Right: the paper's ImageNet top-1 vs V100 throughput."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6))
    ours, theirs = fig.subplots(1, 2)
    speed = throughput_column(df)
    presets = is_preset(df)
    for rows, marker, label in ((df[presets], "o", "presets"), (df[~presets], "s", "config files")):
        if not rows.empty:
            ours.errorbar(rows[speed], rows.val_acc, yerr=rows.val_acc_std.fillna(0),
                          xerr=[rows[speed] - rows[f"{speed}_min"], rows[f"{speed}_max"] - rows[speed]],
                          fmt=marker, capsize=3, label=label)
    front = df[df.pareto].sort_values(speed)
    # The front's staircase: up to each front point's throughput, the best accuracy reached is that point's.
    ours.step(front[speed], front.val_acc, "k--", where="pre", lw=1, label="Pareto front")
    ours.scatter(front[speed], front.val_acc, s=160, facecolors="none", edgecolors="k", lw=1)
    for r in df.itertuples():
        ours.annotate(r.model, (getattr(r, speed), r.val_acc), fontsize=7, xytext=(4, 4), textcoords="offset points")
    first = df.iloc[0]
    images = "all" if pd.isna(first.limit_train) else int(first.limit_train)
    ours.set(xlabel=f"images / s ({SPEED_METHOD[speed]}, 224 px, BN folded + traced)",
             ylabel=f"{first.data} val accuracy (%), mean ± std",
             title=f"this run: {first.epochs} epochs on {images} images at {first.img_size} px, "
                   f"{seeds_text(df)}")
    ours.legend(fontsize=7)
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
    models: list[str] = option(list(PRESET_MODELS), "evit presets or evit config files, comma-separated "
                               "(default: M0-M5)")
    data: str = option(BUDGET["data"], "fashion_mnist | digits | imagefolder:PATH (PATH/train, PATH/val)")
    epochs: int = option(BUDGET["epochs"], "training epochs")
    limit_train: int = option(BUDGET["limit_train"], "training images (0: all)")
    limit_val: int = option(BUDGET["limit_val"], "validation images (0: all)")
    img_size: int = option(BUDGET["img_size"], "training resolution")
    batch_size: int = option(BUDGET["batch_size"], "training batch (small budgets need the updates of a small one)")
    seeds: list[int] = option([0], "training seeds, comma-separated: every model trains once per seed, and the "
                                   "table has accuracy's mean and std over them (default: 0)")
    device: str = option("cpu", f"where the models are timed (cpu: batch {MAIN_BATCH['cpu']}, 1 thread; cuda: batch "
                                f"{MAIN_BATCH['cuda']}, AMP)", choices=("cpu", "cuda"))
    full_timing: bool = option(False, "the benchmark's full timing (~35 s a model)")
    name: str = option("family", "stem of the CSV and figure")
    out: Path = option(Path("runs/family"), "output folder (the training runs in its runs/)")

    def check(self) -> None:
        super().check()
        if not self.seeds or min(self.seeds) < 0 or len(set(self.seeds)) < len(self.seeds):
            raise UserError(f"--seeds must be distinct non-negative integers, comma-separated (e.g. 0,1,2); got "
                            f"{','.join(map(str, self.seeds)) or 'none'}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda asked but no CUDA GPU is visible to torch; use --device cpu")
        for model in self.models:
            check_model(model)


def run(settings: Settings) -> pd.DataFrame:
    """Train and time every model of `settings`; write <name>.csv and <name>.png into settings.out."""
    settings.check()
    out = Path(settings.out)
    df = train_and_time(settings.models, out / "runs", not settings.full_timing, Launcher.of(settings),
                        settings.seeds, settings.device, data=settings.data, epochs=settings.epochs,
                        batch_size=settings.batch_size, img_size=settings.img_size,
                        limit_train=settings.limit_train or None, limit_val=settings.limit_val or None)
    print(f"-> {write_csv(df.round(4), out / f'{settings.name}.csv')}")
    print(f"-> {save_figure(plot(df), out / f'{settings.name}.png')}")
    print(df[["model", "params_m", "flops_m", "val_acc", "val_acc_std", "seeds", throughput_column(df), "pareto",
              "train_time_s"]].to_string(
        index=False, float_format=lambda v: f"{v:.4g}"))
    return df


def main(argv: Optional[Sequence[str]] = None) -> pd.DataFrame:
    return run_cli(lambda: run(parse_settings(Settings, argv, "python -m experiments.family", __doc__)))


if __name__ == "__main__":
    main()
