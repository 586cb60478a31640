"""One command for every analysis: op profiles, head similarity, Taylor pruning, MHSA proportion, the M0-M5
family, benchmarks, figures, and a REPORT.md that sets each claim's verdict beside the committed reference's.

    python -m experiments.reproduce                        # quick scale (~29 min on 2 cores) -> runs/quick/
    python -m experiments.reproduce --force head_similarity    # redo one step (finished steps are skipped)
    python -m experiments.reproduce --scale standard       # the budgets behind results/ (about 1.5 h on 2 cores)
    python -m experiments.reproduce --scale paper --data imagefolder:/data/imagenet   # pretrained, GPU
    python -m experiments.reproduce --scale paper --data imagefolder:/data/imagenet --launcher slurm \
        --partition gpu --gpus-per-job 8 --time 2880        # the trainings (Fig. 3's subnetworks, M0-M5) on Slurm
    python -m experiments.reproduce --scale standard --out results   # regenerate the committed reference

Each step writes its own CSVs and figures under the run folder (runs/<scale>, ignored by git) and is skipped when
they exist and the step ended (a step killed part-way runs again); trained proxies and training runs are cached
(evit.zoo), so a re-run only redoes what is missing. The report reads the CSVs back, puts the paper's values
beside ours, gives each claim a verdict at this scale (each analysis judges its own claims) and sets the verdicts
and key numbers beside those of the committed results of the scale (results/quick, results/, results/paper).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pandas as pd

from analysis import head_similarity, mhsa_ratio, op_profile, taylor_prune
from analysis.taylor_prune import claims as pruning_claims
from evit import PRESETS, EfficientViTConfig, get_preset, zoo
from evit.builder import summary
from evit.builder.io import markdown_table, save_figure, write_json, write_text
from evit.claims import Claim, names
from evit.cli import UserError, option, parse_settings, run_cli
from evit.launch import Launcher, side_by_side
from evit.timing import describe_load, other_load
from experiments import benchmark, family, prune_study

RESULTS = Path("results")
# OUT/.running/<step> exists from a step's start to its success: a step killed or failed part-way (some of its
# outputs written, or all of them but a figure) is run again, however many of its outputs exist.
RUNNING = ".running"
LOAD_FILE = "machine_load.json"  # step -> cores' worth of CPU other processes used as it started (evit.timing)
SCALES = ("quick", "standard", "paper")


@dataclass
class Step:
    name: str
    outputs: tuple[str, ...]  # files under the output folder whose presence means the step is done ({device})
    run: Callable[[Path, "Settings"], object]
    scales: tuple[str, ...] = SCALES


PROFILED = ("deit_tiny", "swin_tiny", "deit_proxy", "swin_proxy") + tuple(f"evit_m{i}" for i in range(6))
# The models the analyses of trained networks use: proxies at the proxy scales, the paper's at paper scale.
PROXY_SCALE_MODELS = dict(deit="deit_proxy", swin="swin_proxy", evit="evit_m0_proxy")
PAPER_SCALE_MODELS = dict(deit="deit_tiny", swin="swin_tiny", evit="evit_m4")
# Each scale computes into its run folder, and sets its claims beside the committed results of the scale.
DEFAULT_OUT = {scale: Path("runs") / scale for scale in SCALES}
REFERENCE = {"quick": RESULTS / "quick", "standard": RESULTS, "paper": RESULTS / "paper"}
# What the steps run at each proxy scale. 'standard' made the committed results/ (about 1.5 h on 2 cores);
# 'quick' runs in about 29 minutes from nothing (docs/reproduce.md): proxies on 5k images, fewer epochs, images
# and variants, a subset of the benchmark's peers. Its numbers are indicative only, and its verdicts say so.
BUDGETS = {
    "quick": dict(
        weights="quick-proxy",
        op_profile=dict(iters=2, warmup=1),
        head_similarity=dict(num_images=32),
        taylor_prune=dict(steps=3, batches=4, batch=32, val_images=1000, finetune_epochs=1, finetune_images=4000),
        prune_study=dict(batches=2, latency_batch=8, finetune_images=2000),
        # Small budgets need a small batch: with 128 the few updates leave evit at chance.
        mhsa_ratio=dict(deit=dict(epochs=2, limit_train=2000, limit_val=1000, batch_size=32,
                                  shares=[0.0, 0.25, 0.5, 1.0]),
                        evit=dict(epochs=2, limit_train=1500, limit_val=1000, batch_size=32, shares=[0.0, 0.25, 1.0],
                                  img_size=32)),
        family=dict(epochs=2, limit_train=1200, limit_val=1000, batch_size=32, img_size=32),
        benchmark=dict(models=["evit_m0", "evit_m4", "efficientvit_m0", "mobilenetv3_large_100",
                               "deit_tiny_patch16_224"], warmup=0.5, seconds=0.5),
        # evit.deploy's default only: its choice times the compiled and traced paths itself (two compiles)
        fast_path=dict(models=["evit_m0"], warmup=1, seconds=1, deploy_backends=["auto"]),
    ),
    "standard": dict(
        weights="proxy",
        op_profile=dict(iters=5),
        head_similarity=dict(num_images=64),
        taylor_prune=dict(batches=8, batch=64, val_images=2000, finetune_epochs=1),
        prune_study=dict(finetune_epochs=2, finetune_images=10000),
        mhsa_ratio=dict(deit=dict(epochs=4, limit_train=20000), evit=dict(epochs=2, limit_train=5000)),
        family={},
        benchmark=dict(quick=True),
        fast_path=dict(quick=True, with_compile=True),
    ),
}
# Paper scale: the paper's models with their hub weights on ImageNet-format data (--data), on the GPU; the
# trainings (Fig. 3's subnetworks, M0-M5) as the launcher's jobs (--launcher slurm on a cluster). Our budget:
# 100 epochs at 224 px, not the paper's 300.
PAPER_BUDGET = dict(op_profile=dict(iters=10), head_similarity=dict(weights="pretrained", num_images=256),
                    taylor_prune=dict(weights="pretrained", img_size=224, batch=32),
                    mhsa_ratio=dict(epochs=100, limit_train=0, limit_val=0, batch_size=256, img_size=224),
                    family=dict(epochs=100, limit_train=0, limit_val=0, batch_size=256, img_size=224))
# The paper's Fig. 3 subnetworks: DeiT-T and Swin-T downscaled to run 1.25x and 1.5x faster.
PAPER_SUBNETWORKS = dict(family=["deit", "swin"], downscale=(1.25, 1.5))


def _models(opts: Settings) -> dict[str, str]:
    return PAPER_SCALE_MODELS if opts.scale == "paper" else PROXY_SCALE_MODELS


def _output_names(opts: Settings) -> dict[str, str]:
    """What the steps' output templates name: the device, the models, the MHSA study's first and last series."""
    if opts.scale == "paper":
        first, *_, last = [mhsa_ratio.runs_csv(Path(), family, factor).stem
                           for factor in PAPER_SUBNETWORKS["downscale"] for family in PAPER_SUBNETWORKS["family"]]
    else:
        first, *_, last = [mhsa_ratio.runs_csv(Path(), family).stem for family in BUDGETS[opts.scale]["mhsa_ratio"]]
    return dict(device=opts.device, mhsa_first=first, mhsa_last=last, **_models(opts))


def _budget(opts: Settings, step: str) -> dict[str, Any]:
    """A step's settings at the run's scale (the weights keyword of a proxy scale included where it applies)."""
    if opts.scale == "paper":
        return dict(PAPER_BUDGET.get(step, {}), **({"data": opts.data} if step != "op_profile" else {}))
    budget = BUDGETS[opts.scale]
    weights = {"weights": budget["weights"]} if step in ("head_similarity", "taylor_prune", "prune_study") else {}
    return dict(budget[step], **weights)


def _proxies(out: Path, opts: Settings) -> None:
    """Train the proxies the analyses of trained networks read, side by side (each is cached: a second run loads
    them), so that no later step trains one alone."""
    budget = _budget(opts, "head_similarity")["weights"]
    side_by_side(zoo.train_proxy, [(name, False, budget) for name in PROXY_SCALE_MODELS.values()], opts.parallel)


def _presets(out: Path, opts: Settings) -> None:
    summary.save_presets(summary.preset_table(), out / "presets")


def _op_profile(out: Path, opts: Settings) -> None:
    common = dict(device=opts.device, batch=16 if opts.device == "cpu" else 256, out=out / "op_profile",
                  **_budget(opts, "op_profile"))
    op_profile.run(op_profile.Settings(models=list(PROFILED), **common))
    op_profile.run(op_profile.Settings(models=[m for m in PROFILED if m.startswith("evit")], fused=True, **common))


def _head_similarity(out: Path, opts: Settings) -> None:
    models = _models(opts)
    # Proxy scales: trained proxies on Fashion-MNIST. Paper: ImageNet weights on ImageNet validation images.
    folder = out / "head_similarity"
    budget = dict(out=folder, **_budget(opts, "head_similarity"))
    # the paper's two comparisons, MHSA (DeiT vs Swin) and DeiT vs cascaded group attention; DeiT computed once
    deit, _ = head_similarity.run(head_similarity.Settings(models=[models["deit"], models["swin"]], **budget))
    (evit,) = head_similarity.run(head_similarity.Settings(models=[models["evit"]], **budget))
    save_figure(head_similarity.plot([deit, evit]), folder / f"{deit.model.iat[0]}_vs_{evit.model.iat[0]}.png")


def _taylor_prune(out: Path, opts: Settings) -> None:
    # The MHSA-proportion study's best evit share goes into the derived configs (it runs first; the paper's
    # subnetworks hold no evit series).
    study = out / "mhsa_ratio" / "summary.csv"
    share = str(study) if study.is_file() and opts.scale != "paper" else None
    for kind, model in _models(opts).items():
        # evit's blocks hold too few of its MACs at 64 px for 50%: every group would sit at its floor.
        target = dict(target_macs=0.8) if kind == "evit" and opts.scale != "paper" else {}
        # The derived config is matched to M0's measured deploy throughput on the run's device, not its FLOPs.
        taylor_prune.run(taylor_prune.Settings(model=model, out=out / "taylor_prune", attention_share_from=share,
                                               match="throughput", device=opts.device, **target,
                                               **_budget(opts, "taylor_prune")))


def _prune_study(out: Path, opts: Settings) -> None:
    models = _models(opts)
    prune_study.run(prune_study.Settings(models=[models["deit"], models["swin"]], device=opts.device,
                                         out=out / "prune_study", **_launcher(opts), **_budget(opts, "prune_study")))


def _launcher(opts: Settings) -> dict[str, Any]:
    """The run's launcher settings, for the steps that train."""
    return dataclasses.asdict(opts.launcher)


def _mhsa_ratio(out: Path, opts: Settings) -> None:
    common = dict(seeds=[0, 1, 2], out=out / "mhsa_ratio", **_launcher(opts))
    if opts.scale == "paper":
        for factor in PAPER_SUBNETWORKS["downscale"]:
            mhsa_ratio.run(mhsa_ratio.Settings(family=PAPER_SUBNETWORKS["family"], downscale=factor, **common,
                                               **_budget(opts, "mhsa_ratio")))
        return
    for kind, budget in BUDGETS[opts.scale]["mhsa_ratio"].items():
        mhsa_ratio.run(mhsa_ratio.Settings(family=[kind], **common, **budget))


# The derived configs against M0 at equal measured throughput: seeds enough for a mean and a spread.
ALLOCATION_SEEDS = (0, 1, 2)


def _family(out: Path, opts: Settings) -> None:
    budget = dict(_budget(opts, "family"), out=out / "family", **_launcher(opts))
    family.run(family.Settings(**budget))
    # The pruning-derived allocations beside the preset whose FLOPs they were scaled to.
    derived = [str(out / "taylor_prune" / f"{model}_allocation.yaml") for model in _models(opts).values()]
    family.run(family.Settings(models=["evit_m0"] + derived, name="allocation", seeds=list(ALLOCATION_SEEDS),
                               **budget))


def _benchmark(out: Path, opts: Settings) -> None:
    device = dict(device=opts.device, out=out / "benchmark")
    budget = BUDGETS.get(opts.scale, BUDGETS["standard"])
    benchmark.run(benchmark.Settings(accuracy_csv=out / "family" / "family.csv", **budget["benchmark"], **device))
    if opts.device == "cpu":
        benchmark.run(benchmark.Settings(fast_path=True, **budget["fast_path"], **device))


STEPS = [
    # No outputs under the run folder (the proxies live in the zoo's cache): it runs each time, loading them.
    Step("proxies", (), _proxies, ("quick", "standard")),
    Step("presets", ("presets/presets.csv",), _presets),
    Step("op_profile", tuple(f"op_profile/{m}_{{device}}_classes.csv" for m in PROFILED), _op_profile),
    Step("head_similarity", ("head_similarity/{deit}.csv", "head_similarity/{swin}.csv",
                             "head_similarity/{evit}.csv"), _head_similarity),
    # At paper scale these train on ImageNet: a cluster's job (--launcher slurm, docs/launch.md).
    Step("mhsa_ratio", ("mhsa_ratio/{mhsa_first}.csv", "mhsa_ratio/{mhsa_last}.csv"), _mhsa_ratio),
    Step("taylor_prune", ("taylor_prune/{deit}.csv", "taylor_prune/{swin}.csv", "taylor_prune/{evit}.csv"),
         _taylor_prune),
    # Our MAC and latency targets and torch-pruning's Taylor pruning at equal MACs and at equal measured latency:
    # proxy scales only.
    Step("prune_study", ("prune_study/summary.csv",), _prune_study, ("quick", "standard")),
    Step("family", ("family/family.csv", "family/allocation.csv"), _family),
    Step("benchmark", ("benchmark/{device}.csv",), _benchmark),
]


# --- the report ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Section:
    """A part of the report, named as its step or a part of one. `read` gets back from a results folder what the
    section's claims are judged on (None when the folder lacks those results), `judge` turns it into the claims (the
    analysis's own function) and `render` into the section's markdown: its tables and figures, and the claims
    where they belong. `timed_in`: the step whose timings its verdicts rest on, marked when that step started on
    a busy machine (the render passes the same mark to its claims)."""
    name: str
    read: Callable[[Path], Any]
    judge: Callable[[Any], list[Claim]]
    render: Callable[[Path, Any], str]
    timed_in: Optional[str] = None


def step_load(out: Path, step: Optional[str]) -> str:
    """The load `step` was measured under in `out` (describe_load: '' when quiet, unknown or no step)."""
    path = out / LOAD_FILE
    loads = json.loads(path.read_text()) if step and path.is_file() else {}
    return describe_load(loads.get(step))


def _marked(claims: list[Claim], load: str) -> list[Claim]:
    return [dataclasses.replace(claim, load=load) for claim in claims] if load else claims


def _claims_text(claims: list[Claim], load: str = "") -> str:
    return "".join(f"\n{claim.markdown()}\n" for claim in _marked(claims, load))


def _figures(out: Path, step: str) -> str:
    return "\n" + "\n".join(f"![{p.name}]({step}/{p.name})" for p in sorted((out / step).glob("*.png"))) + "\n"


def _read_csv(path: Path) -> Optional[pd.DataFrame]:
    return pd.read_csv(path) if path.is_file() else None


def _read_stacked(paths: list[Path], label: Callable[[Path], dict[str, str]] = lambda path: {}
                  ) -> Optional[pd.DataFrame]:
    """The CSVs at `paths` stacked, each with the columns `label` gives it from its path (None for no path)."""
    return pd.concat([pd.read_csv(p).assign(**label(p)) for p in paths], ignore_index=True) if paths else None


def _render_presets(out: Path, presets: pd.DataFrame) -> str:
    return ("## M0-M5: params and FLOPs\n" + _claims_text(family.presets_claims(presets)) + "\n"
            + markdown_table(presets, ".2f"))


def _read_op_profile(out: Path) -> Optional[pd.DataFrame]:
    classes = _read_stacked(sorted((out / "op_profile").glob("*_classes.csv")),
                            lambda p: dict(setting="fused" if "_fused_" in p.name else "eager"))
    if classes is None:
        return None
    shares = op_profile.memory_bound_shares(classes)
    ridges = op_profile.read_rooflines(out / "op_profile")[["device", "setting", "ridge"]]
    return shares.merge(ridges, on=["device", "setting"], how="left") if len(ridges) else shares


def _render_op_profile(out: Path, shares: pd.DataFrame) -> str:
    return ("## Memory-bound operators (Fig. 2)\n\nShare of runtime per operator class and the share spent in "
            "memory-bound ops (arithmetic intensity below the measured roofline ridge); CPU: batch 16, 1 thread; "
            "`fused` = evit deploy mode (BN folded, traced).\n\n" + markdown_table(shares)
            + _claims_text(op_profile.claims(shares), step_load(out, "op_profile")) + _figures(out, "op_profile"))


def _read_head_similarity(out: Path) -> Optional[pd.DataFrame]:
    return _read_stacked(sorted((out / "head_similarity").glob("*.csv")))


def _render_head_similarity(out: Path, heads: pd.DataFrame) -> str:
    return ("## Head similarity (Fig. 4)\n\nMean over blocks and heads of each head's maximum cosine similarity to "
            "another head of its block (raw = the paper's measure; centred = uniform 1/N removed).\n\n"
            + markdown_table(head_similarity.mean_similarity(heads)) + _claims_text(head_similarity.claims(heads))
            + _figures(out, "head_similarity"))


def _read_taylor_prune(out: Path) -> Optional[pd.DataFrame]:
    """Every pruned model's per-block table, stacked with a `model` column."""
    models = [p.name.removesuffix("_summary.csv") for p in sorted((out / "taylor_prune").glob("*_summary.csv"))]
    return _read_stacked([out / "taylor_prune" / f"{model}.csv" for model in models],
                         lambda p: dict(model=p.stem))


def _render_taylor_prune(out: Path, blocks: pd.DataFrame) -> str:
    summaries = pd.concat(pd.read_csv(p) for p in sorted((out / "taylor_prune").glob("*_summary.csv")))
    cols = [c for c in ("model", "weights", "target_macs", "steps", "macs_before_m", "macs_after_m", "params_before_m",
                        "params_after_m", "val_images", "acc_before", "acc_after", "finetune_epochs", "acc_finetuned",
                        "normalizer", "reduction") if c in summaries]
    return ("## Taylor structured pruning (Fig. 5)\n\nEach model pruned to `target_macs` of its MACs in `steps` Taylor "
            "steps (Q/K, V, FFN hidden and the residual-stream width as separate groups), accuracy on `val_images` "
            "validation images before, after, and after a `finetune_epochs` fine-tune; kept widths relative to each "
            "block's input width, averaged over early/middle/late thirds of the blocks.\n\n"
            + markdown_table(summaries[cols], ".2f")
            + "\nFraction of each group's channels kept (early / middle / late blocks):\n\n"
            + markdown_table(pruning_claims.kept_by_thirds(blocks), ".2f")
            + _claims_text(pruning_claims.claims(blocks))
            + _figures(out, "taylor_prune"))


def _render_mhsa_ratio(out: Path, summary: pd.DataFrame) -> str:
    return ("## MHSA proportion (Fig. 3)\n\n" + markdown_table(summary)
            + _claims_text(mhsa_ratio.claims(summary), step_load(out, "mhsa_ratio"))
            + "\n![mhsa_ratio](mhsa_ratio/mhsa_ratio.png)\n")


def _read_prune_study(out: Path) -> Optional[pd.DataFrame]:
    """The study's summary; None for one written before its two operating points (rerun the step)."""
    summary = _read_csv(out / "prune_study" / "summary.csv")
    return summary if summary is not None and "point" in summary else None


def _render_prune_study(out: Path, summary: pd.DataFrame) -> str:
    cols = ["model", "point", "method", "acc_mean", "acc_std", "seeds", "acc_pruned", "acc_unpruned", "macs_kept",
            "macs_vs_anchor", "latency_kept", "latency_vs_anchor", "pruning_ratio"]
    anchor = {point: summary[(summary.point == point) & (summary.method == method)].iloc[0]
              for point, method in prune_study.ANCHORS.items()}
    return ("## Taylor pruning side by side: ours and torch-pruning's, at equal MACs and at equal latency\n\n"
            "Each proxy pruned from the same weights and gradient batches by our MAC target (`macs`), our latency "
            "target (`latency`) and torch-pruning 1.6's BasePruner with GroupTaylorImportance, global (`tp_global`) "
            "and isomorphic (`tp_isomorphic`), at two points: equal MACs (our MAC target to "
            f"{anchor['equal_macs'].target_macs:.2f} of the MACs, the others bisected to its MACs) and equal latency "
            f"(our latency target to {anchor['equal_latency'].target_latency:.2f} of the measured latency, the "
            "others bisected to it, each probe timed against it); every model fine-tuned with the same budget per "
            "seed. MACs are counted alike for every model (attention matmuls included); latencies are timed on this "
            "run's device against the unpruned model in both call orders, and against the point's anchor "
            "(`*_vs_anchor`).\n\n" + markdown_table(summary[cols], ".3f")
            + _claims_text(prune_study.claims(summary), step_load(out, "prune_study"))
            + "\n![prune_study](prune_study/prune_study.png)\n")


def _render_family(out: Path, trained: pd.DataFrame) -> str:
    speed = family.throughput_column(trained)
    cols = ["model", "params_m", "flops_m", "val_acc", speed, "paper_top1", "paper_v100_img_s"]
    first = trained.iloc[0]
    return (f"## The M0-M5 family (Fig. 1 shape)\n\nEach model trained {first.epochs} epochs on {first.limit_train} "
            f"Fashion-MNIST images at {first.img_size} px ({family.seeds_text(trained)}), timed at 224 px "
            f"({family.SPEED_METHOD[speed]}, BN folded + traced).\n\n" + markdown_table(trained[cols], ".1f")
            + _claims_text(family.claims(trained)) + "\n![family](family/family.png)\n")


def _render_allocation(out: Path, derived: pd.DataFrame) -> str:
    speed = family.throughput_column(derived)
    derived = derived.assign(vs_m0_throughput=derived[speed] / derived[speed].iat[0],
                             attention_blocks=[_attention_blocks(out, m) for m in derived.model])
    cols = [c for c in ("model", "params_m", "flops_m", "attention_blocks", "val_acc", "val_acc_std", "seeds", speed,
                        "vs_m0_throughput", "pareto") if c in derived]
    return ("## Pruning-derived allocations against M0\n\nThe Taylor-pruning ratios turned into EfficientViT configs "
            f"(analysis.taylor_prune.allocate, scaled until {_allocation_match(out)}; attention in the "
            "MHSA-proportion study's best share of the blocks), trained with the family's budget for "
            f"{family.seeds_text(derived)} and timed the same way.\n\n" + markdown_table(derived[cols], ".2f")
            + _claims_text(family.allocation_claims(derived), step_load(out, "family"))
            + "\n![allocation](family/allocation.png)\n")


def _allocation_match(out: Path) -> str:
    """What the pruning step scaled its derived configs to equal in M0 (its summaries say; FLOPs before --match)."""
    summaries = [pd.read_csv(p) for p in sorted((out / "taylor_prune").glob("*_summary.csv"))]
    matches = {m for s in summaries for m in s.get("allocation_match", pd.Series(["flops"]))}
    return ("their measured deploy throughput matches M0's" if matches == {"throughput"}
            else "their FLOPs match M0's" if matches <= {"flops"} else f"they match M0 ({', '.join(sorted(matches))})")


def _attention_blocks(out: Path, model: str) -> str:
    """'attention blocks / blocks' of a preset or of a derived config written by the taylor_prune step."""
    path = out / "taylor_prune" / f"{model}.yaml"
    if not path.is_file() and model.removeprefix("evit_") not in PRESETS:
        return "n/a"
    config = EfficientViTConfig.from_file(path) if path.is_file() else get_preset(model)
    mixers = [m for stage in config.mixers for m in stage]
    return f"{sum(m != 'none' for m in mixers)}/{len(mixers)}"


def _read_benchmark(out: Path) -> Optional[list[Path]]:
    """The peer and fast-path tables (the levers' table is shown in docs/benchmarks.md, not in the report)."""
    return [path for path in sorted((out / "benchmark").glob("*.csv")) if not path.name.startswith("levers")] or None


def _fast_paths(paths: list[Path]) -> Iterator[tuple[str, pd.DataFrame]]:
    """(device, table) of each fast-path CSV among `paths` ('fast_path_<device>[_batch<n>].csv')."""
    for path in paths:
        if path.name.startswith("fast_path_"):
            yield path.stem.removeprefix("fast_path_").split("_batch")[0], pd.read_csv(path)


def _judge_fast_paths(paths: list[Path]) -> list[Claim]:
    return [claim for device, table in _fast_paths(paths) for claim in benchmark.fast_path_claims(table, device)]


def _render_peers(path: Path) -> str:
    df = pd.read_csv(path)
    main = df[df.batch == df.batch.max()].pivot_table(index="model", columns="backend", values="throughput")
    latency = df[df.batch == 1].pivot_table(index="model", columns="backend", values="latency_ms")
    return (f"## Speed against peers ({path.stem}: images/s at batch {df.batch.max()}, and batch-1 latency in ms)\n\n"
            f"{df.machine.iloc[0]}. Quick timing.\n\n" + markdown_table(main.join(latency.add_suffix(" batch-1 ms"))
                                                                .reset_index(), ".1f")
            + f"\n![{path.stem}](benchmark/{path.stem}.png)\n\n")


def _render_fast_path(device: str, df: pd.DataFrame, load: str) -> str:
    on_gpu = device.startswith("cuda")
    claims = benchmark.fast_path_claims(df, device)  # only at the device's main batch, where the target is set
    amp = " under AMP" if on_gpu else ""
    threads = "" if on_gpu else f", {df.threads.iloc[0]} thread"
    pivot = df.pivot(index="model", columns="variant", values="ratio_vs_timm_eager").reset_index()
    text = (f"## Fast path: evit.deploy vs timm's port ({device.replace('cpu', 'CPU')}, batch {df.batch.iloc[0]}{amp}"
            f"{threads})\n\nThroughput ratio to timm eager, same weights.\n\n" + markdown_table(pivot, ".2f")
            + _claims_text(claims, load))
    parity = df[df.variant == benchmark.default_variant(df)].get("ratio_vs_onnxruntime", pd.Series(dtype=float))
    if parity.notna().any():  # ONNX Runtime is timed on CPU only (and older CSVs lack the column)
        text += (f"{'Beyond: ' if claims else ''}ONNX Runtime's throughput from PyTorch: evit.deploy / ORT = "
                 f"{parity.min():.2f}-{parity.max():.2f}x.\n")
    return text


def _render_benchmark(out: Path, paths: list[Path]) -> str:
    peers = [path for path in paths if not path.name.startswith("fast_path")]
    return ("".join(_render_peers(path) for path in peers)
            + "".join(_render_fast_path(device, table, step_load(out, "benchmark"))
                      for device, table in _fast_paths(paths)))


SECTIONS = (
    Section("presets", lambda out: _read_csv(out / "presets" / "presets.csv"), family.presets_claims,
            _render_presets),
    Section("op_profile", _read_op_profile, op_profile.claims, _render_op_profile, "op_profile"),
    Section("head_similarity", _read_head_similarity, head_similarity.claims, _render_head_similarity),
    Section("taylor_prune", _read_taylor_prune, pruning_claims.claims, _render_taylor_prune),
    Section("mhsa_ratio", lambda out: _read_csv(out / "mhsa_ratio" / "summary.csv"), mhsa_ratio.claims,
            _render_mhsa_ratio, "mhsa_ratio"),
    Section("prune_study", _read_prune_study, prune_study.claims, _render_prune_study, "prune_study"),
    Section("family", lambda out: _read_csv(out / "family" / "family.csv"), family.claims, _render_family),
    Section("allocation", lambda out: _read_csv(out / "family" / "allocation.csv"), family.allocation_claims,
            _render_allocation, "family"),
    Section("benchmark", _read_benchmark, _judge_fast_paths, _render_benchmark, "benchmark"),
)


# --- this run beside the reference ---------------------------------------------------------------------------

def judge_folder(out: Path) -> dict[str, list[Claim]]:
    """The claims judged on the results in `out`, by report section; a section whose results it lacks is left out."""
    return {section.name: _marked(section.judge(data), step_load(out, section.timed_in))
            for section in SECTIONS if (data := section.read(out)) is not None}


def beside_reference(out: Path, reference: Path) -> str:
    """Markdown: each claim's verdict in `out` beside the reference's, then the key numbers side by side; steps the
    reference lacks are named and left out."""
    if out.resolve() == reference.resolve():
        return f"This folder is the reference ({reference}): nothing to set beside it.\n"
    ours, theirs = judge_folder(out), judge_folder(reference)
    lacking = [section for section in ours if section not in theirs]
    text = f"The reference ({reference}) lacks the results of {names(lacking)}: left out.\n\n" if lacking else ""
    compared = [section for section in ours if section in theirs]
    if not compared:
        return text or f"This folder holds no results to set beside the reference ({reference}).\n"
    run = [claim for section in compared for claim in ours[section]]
    ref = [claim for section in compared for claim in theirs[section]]
    return (text + _side_by_side("claim", {c.claim: c.verdict_and_load for c in run},
                                {c.claim: c.verdict_and_load for c in ref})
            + "\n" + _side_by_side("number", _numbers(run), _numbers(ref)))


def _numbers(claims: list[Claim]) -> dict[str, float]:
    return {name: value for claim in claims for name, value in claim.numbers.items()}


def _side_by_side(key: str, run: dict[str, Any], ref: dict[str, Any]) -> str:
    """A table of every key of either side (this run's first) with its value on each side ('-' where it has none)."""
    rows = [(name, run.get(name, "-"), ref.get(name, "-")) for name in {**run, **ref}]
    return markdown_table(pd.DataFrame(rows, columns=[key, "this run", "reference"]))


def write_report(out: Path, scale: str = "quick", reference: Optional[Path] = None) -> Path:
    """REPORT.md in `out`: every step's section whose results `out` holds, then the claims beside those of
    `reference` (default: the committed results of the scale)."""
    where = {"quick": "quick proxy scale (Fashion-MNIST, CPU, minutes of training: indicative only)",
             "standard": "proxy scale (Fashion-MNIST, CPU), not ImageNet",
             "paper": "paper scale (ImageNet weights and data)"}[scale]
    parts = [f"# evit report\n\nGenerated by `python -m experiments.reproduce --scale {scale} --out {out}` from the "
             f"CSVs in this folder; re-run it to regenerate. Verdicts are at {where}.\n"]
    parts += [section.render(out, data) for section in SECTIONS if (data := section.read(out)) is not None]
    parts.append("## This run beside the reference\n\n" + beside_reference(out, reference or REFERENCE[scale]))
    return write_text(out / "REPORT.md", "\n".join(parts))


def record_load(out: Path, step: str, cores: Optional[float]) -> None:
    """Keep the load `step` started under in OUT/machine_load.json (the report marks its timed verdicts by it)."""
    path = out / LOAD_FILE
    write_json(path, {**(json.loads(path.read_text()) if path.is_file() else {}), step: cores})


def run_isolated(step: Step, args: Settings) -> None:
    """Run a step in a child process, so that the run's peak memory is its largest step's, not that plus what the
    steps before it left in this process (allocator caches, compiled graphs, models): the quick scale peaked at
    4.2 GB in one process. Forked, not spawned: the child inherits the parsed settings and needs nothing pickled;
    this process has run no torch computation yet, so no thread pool is forked. A step that fails exits with its
    code (2 for a user error, whose one line the step has printed)."""
    child = multiprocessing.get_context("fork").Process(target=run_cli, args=(partial(step.run, args.out, args),),
                                                        name=step.name)
    child.start()
    child.join()
    if child.exitcode:
        raise SystemExit(child.exitcode if child.exitcode > 0 else 1)


@dataclass
class Settings(Launcher):
    """The run's settings: where its trainings run (the launcher's flags: --launcher slurm --partition ...), then
    its own. `parallel`, `device`, `out` and `reference` left unset take the machine's and the scale's
    (`resolved`): independent trainings run one per core, each on one thread, so the run uses the machine's cores
    while every timing step still runs alone."""

    parallel: Optional[int] = option(None, "inline: trainings side by side, one worker process each (None: one "
                                           "per core of this machine with --launcher inline, else 1)")
    scale: str = option("quick", "quick: proxies on Fashion-MNIST with minutes of training, about 29 min on 2 cores "
                                 "(runs/quick). standard: the proxy budgets behind results/ (about 1.5 h). paper: "
                                 "the paper's models with pretrained weights on ImageNet-format --data, on --device "
                                 "(default cuda)", choices=SCALES)
    data: Optional[str] = option(None, "paper scale: imagefolder:PATH (PATH/train, PATH/val)")
    device: Optional[str] = option(None, "where op profiles and benchmarks run (None: cpu at proxy scales, cuda "
                                         "at paper)", choices=["cpu", "cuda"])
    steps: list[str] = option([], "steps to run, comma-separated (default: all of the scale)")
    force: list[str] = option([], "steps to redo even if their outputs exist, comma-separated, or 'all'")
    out: Optional[Path] = option(None, "run folder (None: runs/<scale>, ignored by git); the committed reference "
                                       "is regenerated with --out results/quick, results or results/paper")
    reference: Optional[Path] = option(None, "results to set this run's claims beside (None: the committed "
                                             "results of the scale: results/quick, results or results/paper)")

    @property
    def launcher(self) -> Launcher:
        return Launcher.of(self)

    def scale_steps(self) -> list[Step]:
        return [s for s in STEPS if self.scale in s.scales]

    def check(self) -> None:
        Launcher.check(self.resolved())
        if self.scale == "paper" and not (self.data or "").startswith("imagefolder:"):
            raise UserError("--scale paper needs --data imagefolder:PATH (ImageNet-format folders PATH/train, "
                            "PATH/val)")
        steps = self.scale_steps()
        unknown = sorted((set(self.steps) | set(self.force)) - {"all"} - {s.name for s in steps})
        if unknown:
            raise UserError(f"unknown step(s) {', '.join(unknown)} at {self.scale} scale; valid: "
                            f"{', '.join(s.name for s in steps)}")

    def resolved(self) -> "Settings":
        """These settings with the scale's device, run folder and reference where they were left unset."""
        cores = len(os.sched_getaffinity(0))
        return dataclasses.replace(self, device=self.device or ("cuda" if self.scale == "paper" else "cpu"),
                                   parallel=self.parallel or (cores if self.kind == "inline" else 1),
                                   out=Path(self.out or DEFAULT_OUT[self.scale]),
                                   reference=Path(self.reference or REFERENCE[self.scale]))


def run(settings: Settings) -> Path:
    """Run the scale's steps that are not done (or are forced), each in its own process, then write the report."""
    settings.check()
    args = settings.resolved()
    steps = args.scale_steps()
    wanted = set(args.steps) or {s.name for s in steps}
    forced = {s.name for s in steps} if "all" in args.force else set(args.force)
    for step in steps:
        if step.name not in wanted:
            continue
        names = _output_names(args)
        running = args.out / RUNNING / step.name
        done = (step.outputs and not running.exists()
                and all((args.out / o.format(**names)).is_file() for o in step.outputs))
        if done and step.name not in forced:
            print(f"[reproduce] {step.name}: cached, skipped (--force {step.name} to redo)")
            continue
        load = other_load()  # before the step's process starts: the other processes' share alone
        start = time.perf_counter()
        print(f"[reproduce] {step.name} ...{' (' + describe_load(load) + ')' if describe_load(load) else ''}",
              flush=True)
        running.parent.mkdir(parents=True, exist_ok=True)
        running.touch()
        run_isolated(step, args)
        record_load(args.out, step.name, load)
        running.unlink()
        print(f"[reproduce] {step.name}: {time.perf_counter() - start:.0f} s", flush=True)
    report = write_report(args.out, args.scale, args.reference)
    print(f"[reproduce] this run beside the reference:\n\n{beside_reference(args.out, args.reference)}")
    print(f"[reproduce] wrote {report}")
    return report


def main(argv: Optional[list[str]] = None) -> Path:
    return run_cli(lambda: run(parse_settings(Settings, argv, "python -m experiments.reproduce", __doc__)))


if __name__ == "__main__":
    main()
