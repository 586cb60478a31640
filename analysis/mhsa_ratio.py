"""MHSA proportion (paper Fig. 3): subnetworks of a fixed depth whose blocks use attention in 0..100% of blocks.

Blocks without attention keep their FFN (DeiT and Swin proxies: the block becomes FFN-only, with no attention
and no windows, and every DeiT variant pools its tokens by averaging instead of a class token; EfficientViT: the
block's mixer is `none`, leaving its DWConv token interaction and FFNs). Every variant gets the same training
budget on one dataset (--data) and several seeds; we report accuracy (mean ± std), CPU throughput and the runtime
share of memory-bound operators (analysis.op_profile) per proportion.

    python -m analysis.mhsa_ratio --family deit --seeds 0,1,2
    python -m analysis.mhsa_ratio --family deit,swin --data digits
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd
import torch
import torch.nn as nn

import evit
from evit.builder.io import save_figure, write_csv
from evit.claims import CONFIRMED, INCONCLUSIVE, REFUTED, Claim
from evit.data import build_datasets, check_data
from evit.models import PROXY_MODELS, PROXY_NUM_CLASSES, create_model
from evit.cli import UserError, option, parse_settings, run_cli
from evit.launch import Launcher, Run, missing_report, run_trainings
from evit.train import TrainConfig

SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
# family -> (proxy name, input size); the proxies are defined in evit.models.PROXY_MODELS.
PROXY_BASES = {"deit": ("deit_proxy", 28), "swin": ("swin_proxy", 32), "evit": ("evit_m0_proxy", 64)}
# The paper's Fig. 3 subnetworks are cut from DeiT-T and Swin-T with their widths scaled down until they run 1.25x
# or 1.5x faster than the originals (--downscale).
PAPER_BASES = {"deit": "deit_tiny_patch16_224", "swin": "swin_tiny_patch4_window7_224"}
# Widths tried by the downscaling: steps of 12 keep every head's dim a multiple of 4 (3 heads in DeiT-T and in
# Swin-T's first stage), down to a third of the original width.
WIDTH_STEP, NARROWEST = 12, 1 / 3


@dataclass(frozen=True)
class Base:
    """What a series of variants is cut from: a model name with its kwargs, the input size it trains and is timed
    at, and the series' label (the `family` column of the tables: deit, or deit_tiny/1.25 for DeiT-T downscaled
    to run 1.25x faster)."""
    family: str
    name: str
    img_size: int
    kwargs: dict = field(default_factory=dict)
    label: str = ""

    @property
    def series(self) -> str:
        return self.label or self.family


def attention_blocks(depth: int, share: float) -> list[int]:
    """Indices of the blocks that keep attention: round(share * depth) of them, evenly spaced and ending at
    the last block (attention matters most where tokens are few and features abstract)."""
    count = round(share * depth)
    return sorted({depth - 1 - round(i * depth / count) for i in range(count)}) if count else []


class FFNOnlyBlock(nn.Module):
    """A timm ViT or Swin block without its attention: x + FFN(norm(x)), reusing the block's own FFN modules (the
    FFN acts per token, so a Swin block's (B, H, W, C) layout needs no windows)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm2, self.mlp, self.drop_path2 = block.norm2, block.mlp, block.drop_path2
        self.ls2 = getattr(block, "ls2", nn.Identity())  # Swin has no LayerScale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def stage_blocks(model: nn.Module) -> list[nn.ModuleList]:
    """The block lists of a model's stages: a ViT's one, a Swin's or an evit's per stage."""
    if hasattr(model, "layers"):
        return [layer.blocks for layer in model.layers]
    if hasattr(model, "stages"):
        return [stage.blocks for stage in model.stages]
    return [model.blocks]


def family_base(family: str, img_size: Optional[int] = None) -> Base:
    """The family's proxy, at `img_size` (default the family's)."""
    name, default_size = PROXY_BASES[family]
    return Base(family, name, img_size or default_size)


def build_variant(family: str, share: float, mixer: str = "cga", img_size: Optional[int] = None,
                  num_classes: int = PROXY_NUM_CLASSES, base: Optional[Base] = None) -> tuple[nn.Module, list[int]]:
    """`base` (default: the family's proxy at `img_size`) with attention in `share` of its blocks; returns the
    model and those block indices (counted over all stages)."""
    base = base or family_base(family, img_size)
    size = dict(img_size=base.img_size, num_classes=num_classes, **base.kwargs)
    if family == "evit":
        depths = evit.get_preset(PROXY_MODELS[base.name][0]).depths
        keep = attention_blocks(sum(depths), share)
        return create_model(base.name, mixers=staged_mixers(depths, keep, mixer), **size), keep
    if family == "deit":
        # Average-pooled tokens, no class token: with a class token, blocks without attention would never let
        # it see the image, and the 0% variant would sit at chance.
        model = create_model(base.name, global_pool="avg", class_token=False, **size)
    else:  # Swin pools its tokens already
        model = create_model(base.name, **size)
    stages = stage_blocks(model)
    keep = attention_blocks(sum(map(len, stages)), share)
    index = 0
    for blocks in stages:
        for i in range(len(blocks)):
            if index not in keep:
                blocks[i] = FFNOnlyBlock(blocks[i])
            index += 1
    return model, keep


def throughputs(models: dict[int, nn.Module], img_size: int, device: str = "cpu", batch: int = 16,
                seconds: float = 0.5) -> dict[int, float]:
    """Images per second of each model on `device` (eval, no grad), timed interleaved so the ratios are fair."""
    from evit.timing import synchronizer, time_interleaved

    x = torch.randn(batch, 3, img_size, img_size, device=device)
    runs = {}
    for key, model in models.items():
        model = model.eval().to(device)
        runs[key] = lambda model=model: model(x)
    with torch.inference_mode():
        timings = time_interleaved(runs, batch, warmup_s=seconds, seconds=seconds, repeats=3,
                                   sync=synchronizer(device))
    return {key: timing.throughput for key, timing in timings.items()}


def downscaled_base(family: str, factor: float, img_size: int = 224, device: str = "cpu",
                    measure: Optional[Callable[[dict[int, nn.Module], int, str], dict[int, float]]] = None,
                    sweep_csv: Optional[Path] = None) -> Base:
    """The paper's subnetwork: DeiT-T or Swin-T with the embedding width whose measured throughput (`measure`, on
    `device` at `img_size`) is closest to `factor` times the original's, among the original width and every
    narrower one in steps of WIDTH_STEP down to NARROWEST of it (`measure` default: `throughputs`). The sweep is
    read from `sweep_csv` when that exists, else measured and written there: the 1.25x and 1.5x subnetworks of a
    model come from one sweep."""
    name = PAPER_BASES[family]
    full = create_model(name, img_size=img_size).patch_embed.proj.out_channels
    widths = range(full, int(full * NARROWEST) - 1, -WIDTH_STEP)
    if sweep_csv is not None and Path(sweep_csv).is_file():
        sweep = pd.read_csv(sweep_csv)
        speeds = dict(zip(sweep.embed_dim.astype(int), sweep.throughput))
        print(f"{name}: width sweep read from {sweep_csv}")
    else:
        speeds = (measure or throughputs)({w: create_model(name, img_size=img_size, embed_dim=w) for w in widths},
                                          img_size, device)
        if sweep_csv is not None:
            write_csv(pd.DataFrame(dict(embed_dim=list(speeds), throughput=list(speeds.values()), device=device,
                                        img_size=img_size)), sweep_csv)
    width = min(widths, key=lambda w: abs(speeds[w] / speeds[full] - factor))
    print(f"{name} downscaled {factor:g}x: embed_dim {width} of {full} measured {speeds[width] / speeds[full]:.2f}x "
          f"as fast on {device} at {img_size} px ({', '.join(f'{w}: {speeds[w]:.0f}' for w in widths)} img/s)")
    return Base(family, name, img_size, dict(embed_dim=width), f"{name.split('_patch')[0]}/{factor:g}")


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
    from evit.timing import time_callable

    model = model.eval()
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.inference_mode():
        timing = time_callable(lambda: model(x), batch, warmup_s=0.5, seconds=1.0, repeats=5, sync=lambda: None)
    profile = profile_model(model, batch=batch, img_size=img_size, iters=5, peaks=peaks)
    return dict(throughput=timing.throughput, memory_bound_share=profile.memory_bound_share)


def speed_table(base: Base, shares: Sequence[float] = SHARES, mixer: str = "cga") -> pd.DataFrame:
    """Throughput and memory-bound share per proportion, all judged by one roofline: the best seen on this machine."""
    from analysis.op_profile import default_roofline_cache, roofline_peaks

    roofline = roofline_peaks("cpu", default_roofline_cache())
    peaks = (roofline.gflops, roofline.gbs)
    return pd.DataFrame([dict(share=share, **measure_speed(build_variant(base.family, share, mixer, base=base)[0],
                                                           base.img_size, peaks))
                         for share in shares])


def variant_model(base: dict, share: float, mixer: str, num_classes: int) -> nn.Module:
    """A variant built from JSON-able arguments: the launcher's builder of a run (its arguments key the run, and
    it sits at module level so that a job on another machine can import it)."""
    base = Base(**base)
    return build_variant(base.family, share, mixer, num_classes=num_classes, base=base)[0]


def run_study(base: Base, shares: Sequence[float] = SHARES, seeds: Sequence[int] = (0, 1, 2), epochs: int = 2,
              limit_train: Optional[int] = 10000, limit_val: Optional[int] = 2000, mixer: str = "cga",
              data: str = "fashion_mnist", data_dir: Optional[str] = None, batch_size: int = 128,
              runs_dir: Path = Path("runs/mhsa_ratio/runs"), launcher: Optional[Launcher] = None) -> pd.DataFrame:
    """One row per (share, seed) of the variants cut from `base` that finished training (each a run of
    `launcher` in its folder under `runs_dir`; finished runs are kept and the others named on stderr): accuracy
    after the fixed budget, params, throughput, memory-bound share."""
    num_classes = build_datasets(data, base.img_size, data_dir).num_classes
    budget = TrainConfig(model=base.name, data=data, data_dir=data_dir, img_size=base.img_size, epochs=epochs,
                         batch_size=batch_size, lr=1e-3, limit_train=limit_train, limit_val=limit_val, threads=1)
    grid = [(share, seed) for share in shares for seed in seeds]
    runs = [Run(dataclasses.replace(budget, seed=seed), build=variant_model,
                build_kwargs=dict(base=dataclasses.asdict(base), share=share, mixer=mixer, num_classes=num_classes))
            for share, seed in grid]
    print(f"{base.series}: {len(runs)} trainings ({len(shares)} proportions x {len(seeds)} seeds) in {runs_dir}")
    outcomes = run_trainings(runs, runs_dir, launcher)
    missing = missing_report(outcomes)
    if missing:
        print(missing, file=sys.stderr)
    rows = []
    for (share, seed), outcome in zip(grid, outcomes):
        if not outcome.finished:
            continue
        model, keep = build_variant(base.family, share, mixer, num_classes=num_classes, base=base)
        rows.append(dict(
            family=base.series, model=base.name, embed_dim=base.kwargs.get("embed_dim"), data=data, share=share,
            attention_blocks=" ".join(map(str, keep)), actual_share=len(keep) / sum(map(len, stage_blocks(model))),
            seed=seed, epochs=epochs, limit_train=limit_train, batch_size=batch_size, img_size=base.img_size,
            val_acc=outcome.metrics["val_acc"], params_m=sum(p.numel() for p in model.parameters()) / 1e6))
    if not rows:
        raise UserError(f"no {base.series} variant finished training in {runs_dir}: {missing}")
    # Speed after training, all variants back to back: timings taken together compare best.
    trained = pd.DataFrame(rows)
    return trained.merge(speed_table(base, sorted(trained.share.unique()), mixer), on="share")


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
    axes[0].set(xlabel="blocks with attention (%)", ylabel="validation accuracy (%)",
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


@dataclass
class Settings(Launcher):
    """What `python -m analysis.mhsa_ratio` trains and times, and where its trainings run (the launcher's
    flags): its fields are the command's flags."""
    family: list[str] = option(["deit"], f"families, comma-separated, from {', '.join(PROXY_BASES)} (default: deit)")
    shares: list[float] = option(list(SHARES), "attention proportions in [0, 1], comma-separated (default: "
                                 + ",".join(map(str, SHARES)) + ")")
    seeds: list[int] = option([0, 1, 2], "seeds, comma-separated (default: 0,1,2)")
    downscale: Optional[float] = option(None, "cut the variants from the paper's DeiT-T / Swin-T with the width "
                                        "that runs this many times faster, measured on this machine (the paper: "
                                        "1.25 and 1.5); None: the family's proxy")
    epochs: int = option(2, "training epochs per variant")
    limit_train: int = option(10000, "training images per run (0: all)")
    limit_val: int = option(2000, "validation images (0: all)")
    batch_size: int = option(128, "training batch (small budgets need a small one)")
    img_size: Optional[int] = option(None, "input size (None: the family's, " + ", ".join(
        f"{f} {s}" for f, (_, s) in PROXY_BASES.items()) + "; 224 with --downscale)")
    mixer: str = option("cga", "attention type in evit blocks", choices=["cga", "mhsa"])
    data: str = option("fashion_mnist", "fashion_mnist | digits | imagefolder:PATH (PATH/train, PATH/val)")
    data_dir: Optional[str] = option(None, "folder holding the data (None: the default location)")
    speed_only: bool = option(False, "keep the trained accuracies in --out, measure throughput and memory-bound "
                              "share again")
    out: Path = option(Path("runs/mhsa_ratio"), "output folder")

    def check(self) -> None:
        super().check()
        unknown = [f for f in self.family if f not in PROXY_BASES]
        if unknown or not self.family:
            raise UserError(f"unknown family {', '.join(unknown) or '(none given)'}; valid: {', '.join(PROXY_BASES)}")
        if not self.shares or any(not 0 <= s <= 1 for s in self.shares):
            raise UserError(f"--shares must lie in [0, 1], got {','.join(map(str, self.shares))}")
        if self.downscale is not None:
            if self.downscale < 1:
                raise UserError(f"--downscale is a speed-up, at least 1 (the paper's: 1.25, 1.5); got "
                                f"{self.downscale:g}")
            if [f for f in self.family if f not in PAPER_BASES]:
                raise UserError(f"--downscale cuts the paper's subnetworks from {', '.join(PAPER_BASES)}; drop "
                                f"{', '.join(f for f in self.family if f not in PAPER_BASES)} from --family")
        missing = [str(runs_csv(self.out, f, self.downscale)) for f in self.family
                   if self.speed_only and not runs_csv(self.out, f, self.downscale).is_file()]
        if missing:
            raise UserError(f"--speed-only needs the study's results in {', '.join(missing)}; run it without "
                            f"--speed-only first")


def runs_csv(out: Path, family: str, downscale: Optional[float] = None) -> Path:
    """Where a series' runs are written: <proxy>.csv, or <paper model>_x<factor>.csv for a downscaled one."""
    stem = f"{PAPER_BASES[family]}_x{downscale:g}" if downscale else PROXY_BASES[family][0]
    return Path(out) / f"{stem}.csv"


def sweep_csv(out: Path, family: str, img_size: int) -> Path:
    """Where a study keeps the width sweep of a paper model (beside the runs, out of the tables' glob)."""
    return Path(out) / "runs" / f"{PAPER_BASES[family]}_{img_size}px_width_sweep.csv"


def trained_base(family: str, runs: pd.DataFrame) -> Base:
    """The base a runs table was trained from (for --speed-only: no width is measured again)."""
    first = runs.iloc[0]
    width = first.get("embed_dim")
    kwargs = {} if width is None or pd.isna(width) else dict(embed_dim=int(width))
    return Base(family, first.model, int(first.img_size) if "img_size" in runs else PROXY_BASES[family][1], kwargs,
                first.family if first.family != family else "")


def run(settings: Settings) -> pd.DataFrame:
    """Train (or, with speed_only, time again) every family's variants; write the runs, summary and figure."""
    settings.check()
    out = Path(settings.out)
    if not settings.speed_only:
        check_data(settings.data, settings.data_dir)  # before the first variant trains
    for family in settings.family:
        path = runs_csv(out, family, settings.downscale)
        if settings.speed_only:
            trained = pd.read_csv(path).drop(columns=["throughput", "memory_bound_share"])
            base = trained_base(family, trained)
            df = trained.merge(speed_table(base, sorted(trained.share.unique()), settings.mixer), on="share")
        else:
            base = (downscaled_base(family, settings.downscale, settings.img_size or 224,
                                    sweep_csv=sweep_csv(out, family, settings.img_size or 224)) if settings.downscale
                    else family_base(family, settings.img_size))
            df = run_study(base, settings.shares, settings.seeds, settings.epochs, settings.limit_train or None,
                           settings.limit_val or None, settings.mixer, settings.data, settings.data_dir,
                           settings.batch_size, out / "runs", Launcher.of(settings))
        write_csv(df.round(5), path)
    # The summary and figure cover every series run so far in this folder, not only this call's.
    runs = pd.concat(pd.read_csv(path) for path in sorted(out.glob("*.csv")) if path.name != "summary.csv")
    summary = summarize(runs)
    write_csv(summary.round(5), out / "summary.csv")
    plot(summary, out / "mhsa_ratio.png")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return runs


def main(argv: Optional[list[str]] = None) -> pd.DataFrame:
    return run_cli(lambda: run(parse_settings(Settings, argv, "python -m analysis.mhsa_ratio", __doc__)))


if __name__ == "__main__":
    main()
