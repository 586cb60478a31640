"""MHSA proportion (paper Fig. 3): subnetworks of a fixed depth whose blocks use attention in 0..100% of blocks.

Blocks without attention keep their FFN (DeiT proxy: the block becomes FFN-only, and every variant pools
its tokens by averaging instead of a class token; EfficientViT: the block's mixer is `none`, leaving its DWConv
token interaction and FFNs). Every variant gets the same training budget
on Fashion-MNIST and several seeds; we report accuracy (mean ± std), CPU throughput and the runtime share of
memory-bound operators (analysis.op_profile) per proportion.

    python -m analysis.mhsa_ratio --family deit --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd
import torch
import torch.nn as nn

import evit
from evit.io import save_figure, write_csv
from experiments.claims import CONFIRMED, INCONCLUSIVE, REFUTED, Claim
from experiments.data import build_datasets, check_data
from experiments.models import PROXY_MODELS, create_model
from experiments.train import TrainConfig, run_cli, train

SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
# family -> (proxy name, input size); the proxies are defined in experiments.models.PROXY_MODELS.
FAMILIES = {"deit": ("deit_proxy", 28), "evit": ("evit_m0_proxy", 64)}


def attention_blocks(depth: int, share: float) -> list[int]:
    """Indices of the blocks that keep attention: round(share * depth) of them, evenly spaced and ending at
    the last block (attention matters most where tokens are few and features abstract)."""
    count = round(share * depth)
    return sorted({depth - 1 - round(i * depth / count) for i in range(count)}) if count else []


class FFNOnlyBlock(nn.Module):
    """A timm ViT block without its attention: x + FFN(norm(x)), reusing the block's own FFN modules."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def stage_depths(family: str) -> tuple[int, ...]:
    """Blocks per stage of the family's proxy (a ViT is one stage)."""
    timm_name, kwargs = PROXY_MODELS[FAMILIES[family][0]]
    return (kwargs["depth"],) if family == "deit" else evit.get_preset(timm_name).depths


def build_variant(family: str, share: float, mixer: str = "cga",
                  img_size: Optional[int] = None) -> tuple[nn.Module, list[int]]:
    """The family's proxy (at `img_size`, default the family's) with attention in `share` of its blocks; returns
    the model and those block indices."""
    name, default_size = FAMILIES[family]
    size = dict(img_size=img_size or default_size)
    depths = stage_depths(family)
    keep = attention_blocks(sum(depths), share)
    if family == "deit":
        # Average-pooled tokens, no class token: with a class token, blocks without attention would never let
        # it see the image, and the 0% variant would sit at chance.
        model = create_model(name, global_pool="avg", class_token=False, **size)
        for i in range(len(model.blocks)):
            if i not in keep:
                model.blocks[i] = FFNOnlyBlock(model.blocks[i])
        return model, keep
    return create_model(name, mixers=staged_mixers(depths, keep, mixer), **size), keep


def staged_mixers(depths: Sequence[int], keep: Sequence[int], mixer: str = "cga") -> tuple[tuple[str, ...], ...]:
    """Per-stage, per-block evit mixers: `mixer` for the blocks in `keep` (indices over all stages), 'none' else."""
    mixers, start = [], 0
    for depth in depths:
        mixers.append(tuple(mixer if start + j in keep else "none" for j in range(depth)))
        start += depth
    return tuple(mixers)


def best_share(summary: pd.DataFrame, family: str = "evit") -> float:
    """The attention proportion with the best mean accuracy in a study's summary (the smaller one on a tie)."""
    rows = summary[summary.family == family]
    if rows.empty:
        raise ValueError(f"the MHSA study summary has no '{family}' rows; families there: "
                         f"{', '.join(map(str, summary.family.unique())) or 'none'}")
    return float(rows[rows.val_acc_mean == rows.val_acc_mean.max()].share.min())


def measure_speed(model: nn.Module, img_size: int, peaks: tuple[float, float], batch: int = 16) -> dict[str, float]:
    """CPU throughput (eager, one thread) and the memory-bound runtime share from the op profiler, against
    the roofline `peaks` (measured once per study, so every variant is judged by the same ridge point)."""
    from analysis.op_profile import profile_model
    from experiments.timing import time_callable

    model = model.eval()
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.inference_mode():
        timing = time_callable(lambda: model(x), batch, warmup_s=0.5, seconds=1.0, repeats=5, sync=lambda: None)
    profile = profile_model(model, batch=batch, img_size=img_size, iters=5, peaks=peaks)
    return dict(throughput=timing.throughput, memory_bound_share=profile.memory_bound_share)


def speed_table(family: str, shares: Sequence[float] = SHARES, mixer: str = "cga",
                img_size: Optional[int] = None) -> pd.DataFrame:
    """Throughput and memory-bound share per proportion, all judged by one roofline measured here."""
    from analysis.op_profile import measure_peaks

    peaks = measure_peaks("cpu")
    size = img_size or FAMILIES[family][1]
    return pd.DataFrame([dict(share=share, **measure_speed(build_variant(family, share, mixer, size)[0], size, peaks))
                         for share in shares])


def run_study(family: str = "deit", shares: Sequence[float] = SHARES, seeds: Sequence[int] = (0, 1, 2),
              epochs: int = 2, limit_train: Optional[int] = 10000, limit_val: Optional[int] = 2000,
              mixer: str = "cga", data_dir: Optional[str] = None, batch_size: int = 128,
              img_size: Optional[int] = None) -> pd.DataFrame:
    """One row per (share, seed): accuracy after the fixed budget, params, throughput, memory-bound share."""
    from tqdm import tqdm

    if family not in FAMILIES:
        raise ValueError(f"unknown family '{family}'; valid: {', '.join(FAMILIES)}")
    name, img_size = FAMILIES[family][0], img_size or FAMILIES[family][1]
    data = build_datasets("fashion_mnist", img_size, data_dir)
    budget = TrainConfig(model=name, data="fashion_mnist", img_size=img_size, epochs=epochs, batch_size=batch_size,
                         lr=1e-3, limit_train=limit_train, limit_val=limit_val, threads=1)
    rows = []
    for share in tqdm(shares, desc=f"{family} MHSA proportions", unit="share"):
        for seed in seeds:
            torch.manual_seed(seed)  # the same initial weights for a given seed across runs
            model, keep = build_variant(family, share, mixer, img_size)
            metrics = train(model, dataclasses.replace(budget, seed=seed), data)
            rows.append(dict(
                family=family, model=name, share=share, attention_blocks=" ".join(map(str, keep)),
                actual_share=len(keep) / sum(stage_depths(family)), seed=seed, epochs=epochs, limit_train=limit_train,
                batch_size=batch_size, img_size=img_size,
                val_acc=metrics["val_acc"], params_m=sum(p.numel() for p in model.parameters()) / 1e6))
    # Speed after training, all variants back to back: timings taken together compare best.
    return pd.DataFrame(rows).merge(speed_table(family, shares, mixer, img_size), on="share")


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std of accuracy over seeds per proportion (speed is per architecture, not per seed)."""
    return df.groupby(["family", "share", "actual_share"], as_index=False).agg(
        val_acc_mean=("val_acc", "mean"), val_acc_std=("val_acc", "std"), seeds=("seed", "count"),
        throughput=("throughput", "first"), memory_bound_share=("memory_bound_share", "first"),
        params_m=("params_m", "first"))


# The paper's band of attention proportions, and what counts as more attention than it.
BAND, MORE = (0.2, 0.4), 0.5
BAND_TEXT = f"{100 * BAND[0]:.0f}-{100 * BAND[1]:.0f}%"


def claims(summary: pd.DataFrame) -> list[Claim]:
    """The paper's claim of Fig. 3, per family of `summarize`'s table that has proportions in the band and above."""
    found = []
    for family, rows in summary.groupby("family"):
        band, more = rows[rows.actual_share.between(*BAND)], rows[rows.actual_share > MORE]
        if not (band.empty or more.empty):
            found.append(_band_beats_more(family, band.loc[band.val_acc_mean.idxmax()],
                                          more.loc[more.val_acc_mean.idxmax()]))
    return found


def _band_beats_more(family: str, band: pd.Series, more: pd.Series) -> Claim:
    """The best of the band against the best with more attention, each give or take its seeds' std."""
    if band.val_acc_mean - band.val_acc_std > more.val_acc_mean + more.val_acc_std:
        verdict = CONFIRMED
    elif more.val_acc_mean - more.val_acc_std > band.val_acc_mean + band.val_acc_std:
        verdict = REFUTED
    else:
        verdict = INCONCLUSIVE
    return Claim(f"attention in {BAND_TEXT} of the blocks beats more attention ({family} family).", verdict,
                 f"{band.val_acc_mean:.2f} ± {band.val_acc_std:.2f} at {100 * band.actual_share:.0f}% attention vs "
                 f"{more.val_acc_mean:.2f} ± {more.val_acc_std:.2f} at {100 * more.actual_share:.0f}% (validation "
                 f"accuracy, mean ± std over {int(band.seeds)} seeds).",
                 {f"{family} accuracy, best at {BAND_TEXT} attention": float(band.val_acc_mean),
                  f"{family} accuracy, best above {100 * MORE:.0f}% attention": float(more.val_acc_mean)})


def plot(summary: pd.DataFrame, path: Path) -> Path:
    import matplotlib.pyplot as plt

    families = list(summary.family.unique())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for family in families:
        rows = summary[summary.family == family]
        x = 100 * rows.actual_share
        axes[0].errorbar(x, rows.val_acc_mean, yerr=rows.val_acc_std.fillna(0), marker="o", capsize=3, label=family)
        axes[1].plot(x, rows.throughput, marker="o", label=f"{family} throughput")
    axes[0].set(xlabel="blocks with attention (%)", ylabel="Fashion-MNIST val accuracy (%)",
                title="accuracy, mean ± std over seeds")
    axes[1].set(xlabel="blocks with attention (%)", ylabel="images / s (CPU, 1 thread, batch 16)",
                title="speed and memory-bound share")
    share_ax = axes[1].twinx()
    for family in families:
        rows = summary[summary.family == family]
        share_ax.plot(100 * rows.actual_share, 100 * rows.memory_bound_share, ls="--", marker="x",
                      label=f"{family} memory-bound share")
    share_ax.set_ylabel("memory-bound runtime share (%)")
    for ax in (axes[0], axes[1], share_ax):
        ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(prog="python -m analysis.mhsa_ratio", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="deit", help=f"comma-separated, from {', '.join(FAMILIES)}")
    parser.add_argument("--shares", default=",".join(map(str, SHARES)), help="attention proportions in [0, 1]")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit-train", type=int, default=10000, help="training images per run (0: all 60k)")
    parser.add_argument("--limit-val", type=int, default=2000, help="validation images (0: all 10k)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch (small budgets need a small one)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input size (default: the family's, " + ", ".join(f"{f} {s}" for f, (_, s) in FAMILIES.items())
                        + ")")
    parser.add_argument("--mixer", default="cga", choices=["cga", "mhsa"], help="attention type in evit blocks")
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    parser.add_argument("--speed-only", action="store_true",
                        help="keep the trained accuracies in --out, measure throughput and memory-bound share again")
    parser.add_argument("--out", type=Path, default=Path("results/mhsa_ratio"))
    args = parser.parse_args(argv)
    families = args.family.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown family {', '.join(unknown)}; valid: {', '.join(FAMILIES)}")
    shares = [float(s) for s in args.shares.split(",")]
    if any(not 0 <= s <= 1 for s in shares):
        parser.error(f"--shares must lie in [0, 1], got {args.shares}")
    seeds = [int(s) for s in args.seeds.split(",")]
    missing = [str(runs_csv(args.out, f)) for f in families if args.speed_only and not runs_csv(args.out, f).is_file()]
    if missing:
        parser.error(f"--speed-only needs the study's results in {', '.join(missing)}; run it without --speed-only "
                     f"first")
    return run_cli(lambda: study(args, families, shares, seeds))


def runs_csv(out: Path, family: str) -> Path:
    return out / f"{FAMILIES[family][0]}.csv"


def study(args: argparse.Namespace, families: list[str], shares: list[float], seeds: list[int]) -> pd.DataFrame:
    """Train (or, with --speed-only, time again) every family's variants; write the runs, summary and figure."""
    if not args.speed_only:
        check_data("fashion_mnist", args.data_dir)  # before the first variant trains
    for family in families:
        path = runs_csv(args.out, family)
        if args.speed_only:
            trained = pd.read_csv(path).drop(columns=["throughput", "memory_bound_share"])
            size = args.img_size or (int(trained.img_size.iat[0]) if "img_size" in trained else None)
            df = trained.merge(speed_table(family, sorted(trained.share.unique()), args.mixer, size), on="share")
        else:
            df = run_study(family, shares, seeds, args.epochs, args.limit_train or None, args.limit_val or None,
                           args.mixer, args.data_dir, args.batch_size, args.img_size)
        write_csv(df.round(5), path)
    # The summary and figure cover every family run so far in this folder, not only this call's.
    runs = pd.concat(pd.read_csv(path) for family in FAMILIES if (path := runs_csv(args.out, family)).is_file())
    summary = summarize(runs)
    write_csv(summary.round(5), args.out / "summary.csv")
    plot(summary, args.out / "mhsa_ratio.png")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return runs


if __name__ == "__main__":
    main()
