"""MAC- against latency-targeted Taylor pruning at equal measured latency, each fine-tuned alike over seeds.

    python -m experiments.prune_study                                 # deit_proxy and swin_proxy, to 0.6 of latency
    python -m experiments.prune_study --weights quick-proxy --batches 2 --latency-batch 8 --finetune-images 2000
    python -m experiments.prune_study --launcher slurm --partition cpu       # the fine-tunes as Slurm jobs

Per model: prune to `--target-latency` of its measured latency (units ranked by Taylor importance per ms saved,
docs/pruning.md "Latency targets"). Then the MAC path (units ranked by importance alone, its target saying only where
it stops) is pruned to the MAC target at which it runs as fast as that model, found by bisection: each probe is a
whole MAC-targeted pruning timed against the latency-targeted model. Both pruned models are then timed against the
unpruned one interleaved, in both orders (the latency fractions in the tables), and against each other (equal latency
is judged on this ratio), evaluated on the fine-tune's validation images before fine-tuning, and fine-tuned with the
same budget once per seed (the pruning itself is deterministic given the weights and the gradient batches).

Outputs (--out, default results/prune_study): runs.csv (one row per model, method and seed), summary.csv (per model
and method: accuracy mean and std over seeds, before fine-tuning, latency and MACs kept) and prune_study.png. The
pruned models sit in OUT/pruned/<model>-<key>/ (key: the weights, the pruning settings and the machine) and the
fine-tunes in OUT/runs (keyed by their settings and the pruned model they start from), so a killed study resumes
without pruning or training anything twice.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
import torch
import torch.nn as nn

from analysis import taylor_prune as tpr
from analysis.taylor_prune.cli import check_inputs as check_pruning
from analysis.taylor_prune.importance import Batches
from analysis.taylor_prune.prune import LATENCY_TOLERANCE
from evit.io import save_figure, torch_save, write_csv, write_json
from experiments import launch
from experiments.claims import CONFIRMED, INCONCLUSIVE, REFUTED, Claim
from experiments.cli import UserError, option, parse_settings, run_cli
from experiments.data import build_datasets, subset
from experiments.launch import Launcher, Run
from experiments.models import model_img_size
from experiments.train import TrainConfig
from experiments.zoo import KEYWORDS, cache_dir, resolve_model

METHODS = ("macs", "latency")  # the pruning target: MACs (bisected to the latency) or measured latency
LATENCY_MATCH = 0.05  # the MAC-targeted model within 5% of the latency-targeted one's latency: equal latency
PRUNED = "pruning.json"  # written last in a pruned folder: its models are complete


@dataclass
class Settings(Launcher):
    """What `python -m experiments.prune_study` prunes, times and fine-tunes, and where the fine-tunes run (the
    launcher's flags): its fields are the command's flags."""
    models: list[str] = option(["deit_proxy", "swin_proxy"], "models to prune, comma-separated (proxies, or any "
                               "model `python -m analysis.taylor_prune` prunes)")
    weights: str = option("proxy", "proxy | quick-proxy | pretrained | random | auto | PATH (the same for every model)")
    data: str = option("fashion_mnist", "fashion_mnist | digits | imagefolder:PATH (the data the weights were "
                       "trained on)")
    data_dir: Optional[str] = option(None, "folder holding the data (None: the default location)")
    target_latency: float = option(0.6, "fraction of the unpruned model's measured latency the latency target keeps")
    device: str = option("cpu", "where latency is timed", choices=("cpu", "cuda"))
    latency_batch: int = option(16, "images per timed call")
    timing_calls: int = option(200, "calls per model when both pruned models are timed against the unpruned one")
    probes: int = option(6, "MAC targets tried at most in bisecting the MAC target to the latency")
    steps: int = option(5, "iterative pruning steps")
    batches: int = option(4, "data batches for the gradients of each step")
    batch: int = option(32, "images per gradient batch")
    seeds: list[int] = option([0, 1, 2], "fine-tuning seeds, comma-separated")
    finetune_epochs: int = option(1, "fine-tuning epochs")
    finetune_images: int = option(5000, "fine-tuning training images")
    val_images: int = option(2000, "validation images (accuracy before and after fine-tuning)")
    batch_size: int = option(128, "fine-tuning batch")
    lr: float = option(5e-4, "fine-tuning learning rate (cosine to 1e-5, no warm-up)")
    threads: int = option(1, "torch CPU threads (pruning, timing and fine-tunes)")
    out: Path = option(Path("results/prune_study"), "output folder (pruned models in its pruned/, fine-tunes in runs/)")

    def check(self) -> None:
        super().check()
        if not self.models or not self.seeds or len(set(self.seeds)) < len(self.seeds):
            raise UserError(f"--models and --seeds must name at least one each, the seeds distinct; got models "
                            f"{self.models} and seeds {self.seeds}")
        if self.weights not in (*KEYWORDS, "auto") and not Path(self.weights).is_file():
            raise UserError(f"--weights must be one of {', '.join((*KEYWORDS, 'auto'))} or a checkpoint file; "
                            f"{self.weights} not found")
        sizes = (self.timing_calls, self.probes, self.finetune_epochs, self.val_images, self.threads)
        if min(sizes) < 1 or self.lr <= 0:
            raise UserError("--timing-calls, --probes, --finetune-epochs, --val-images and --threads must be >= 1 "
                            "and --lr more than 0")
        if self.finetune_images < self.batch_size:
            raise UserError(f"--finetune-images ({self.finetune_images}) must hold at least one --batch-size "
                            f"({self.batch_size}) batch")
        for model in self.models:  # the pruning's own checks: its flags, the data, the model and its groups
            check_pruning(self.pruning(model))

    def pruning(self, model: str) -> tpr.Settings:
        """`python -m analysis.taylor_prune`'s settings for the latency target on `model`."""
        return tpr.Settings(model=model, weights=self.weights, data=self.data, data_dir=self.data_dir,
                            target_latency=self.target_latency, device=self.device,
                            latency_batch=self.latency_batch, steps=self.steps, batches=self.batches,
                            batch=self.batch, threads=self.threads)


# --- equal latency ----------------------------------------------------------------------------------------------

def prune_macs_to_latency(model: nn.Module, batches: Batches, match: nn.Module, latency: tpr.LatencyModel,
                          probes: int = 6, **prune: Any) -> tpr.PruneResult:
    """The MAC-targeted pruning of `model` (a copy each probe; `prune`: taylor_prune's other arguments) as fast as
    `match`: the MAC target bisected over at most `probes` prunings, each timed against `match` itself (one
    measured ratio rather than two fractions of the unpruned latency, each with its own noise), stopping within
    LATENCY_TOLERANCE of it. Its summary gets latency_probes ('MAC target:latency over match's' per probe)."""
    images = latency.images(batches)
    low, high = 0.0, 1.0
    tried: list[tuple[float, float, tpr.PruneResult]] = []
    for _ in range(probes):
        target = (low + high) / 2
        result = tpr.taylor_prune(copy.deepcopy(model), batches, target_macs=target, **prune)
        ratio = latency.measure(match, result.model, images)[2]
        tried.append((target, ratio, result))
        if abs(ratio - 1) <= LATENCY_TOLERANCE:
            break
        low, high = (target, high) if ratio < 1 else (low, target)
    best = min(tried, key=lambda t: abs(t[1] - 1))[2]
    best.summary.update(latency_probes=" ".join(f"{t:.4f}:{r:.3f}" for t, r, _ in tried))
    return best


def prune_to_equal_latency(model: nn.Module, batches: Batches, target_latency: float, latency: tpr.LatencyModel,
                           probes: int = 6, **prune: Any) -> dict[str, tpr.PruneResult]:
    """{'latency': `model` pruned to `target_latency` of its measured latency, 'macs': the MAC-targeted pruning
    as fast as that one}; `model` itself is left as it is."""
    by_latency = tpr.taylor_prune(copy.deepcopy(model), batches, target_latency=target_latency, latency=latency,
                                  **prune)
    by_macs = prune_macs_to_latency(model, batches, by_latency.model, latency, probes, **prune)
    return dict(macs=by_macs, latency=by_latency)


# --- per model: pruned (or read back), timed, evaluated ---------------------------------------------------------

def weights_digest(model: nn.Module) -> str:
    """A hash of the model's weights: a pruning is keyed by it, so that retrained weights are pruned afresh."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def pruned_model(path: str) -> nn.Module:
    """A pruned model saved whole (its layers' shapes are the pruning's; no name rebuilds them): the fine-tunes'
    builder, at module level so that a job can import it."""
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file: a pickled module


def _accuracy(model: nn.Module, val: tpr.ServedBatches) -> float:
    return tpr.top1_accuracy(model.eval(), val)[0]


def prune_or_read(name: str, model: nn.Module, settings: Settings, latency: tpr.LatencyModel,
                  out: Path) -> tuple[dict[str, Path], dict[str, dict]]:
    """({method: its pruned model's file}, {method: its pruning summary}): pruned into OUT/pruned/<name>-<key> unless
    done there already. A file is named by its method and weights (the fine-tunes that start from it are keyed by
    its path, and the latency path prunes differently when its timings differ); beside it <method>.csv, the block
    table."""
    key_parts = dict(model=name, weights=weights_digest(model), data=settings.data, machine=latency.describe(),
                     **{k: getattr(settings, k) for k in ("target_latency", "device", "latency_batch", "probes",
                                                          "steps", "batches", "batch")})
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:12]
    folder = out / "pruned" / f"{Path(name).stem}-{key}"
    if not (folder / PRUNED).is_file():
        train, _, _ = tpr.load_batches(settings.data, model_img_size(model), settings.batches, settings.batch, 0,
                                       settings.data_dir)
        print(f"{name}: pruning to {settings.target_latency} of its latency, then the MAC target to the same "
              f"latency -> {folder}")
        results = prune_to_equal_latency(model, train, settings.target_latency, latency, settings.probes,
                                         steps=settings.steps)
        files = {m: f"{m}-{weights_digest(r.model)}.pth" for m, r in results.items()}
        for method, result in results.items():
            torch_save(result.model, folder / files[method])
            write_csv(result.blocks.round(5), folder / f"{method}.csv")
        write_json(folder / PRUNED, dict(key=key_parts, files=files,
                                         summaries={m: r.summary for m, r in results.items()}))
    record = json.loads((folder / PRUNED).read_text())
    return {m: folder / f for m, f in record["files"].items()}, record["summaries"]


def latency_model(settings: Settings) -> tpr.LatencyModel:
    """How latency is timed: on --device at --latency-batch, the tables kept beside the trained proxies (they depend
    on the model and the machine, not the study)."""
    return tpr.LatencyModel(settings.device, settings.latency_batch, cache_dir=cache_dir() / "latency")


def measure_both_orders(timer: tpr.LatencyModel, reference: nn.Module, models: dict[str, nn.Module],
                        images: torch.Tensor) -> tuple[float, dict[str, tuple[float, float]]]:
    """`timer.measure_many`'s (ms of `reference`, {name: (ms, fraction of reference's)}), each the geometric mean of
    two runs with `models` called in opposite orders: a small model called right after the unpruned one runs a few
    % slower (its weights were evicted from the cache), as much as the tolerance on equal latency."""
    runs = [timer.measure_many(reference, dict(order), images)
            for order in (list(models.items()), list(reversed(models.items())))]

    def mean(values: list[float]) -> float:
        return math.prod(values) ** (1 / len(values))

    return mean([ms for ms, _ in runs]), {k: (mean([t[k][0] for _, t in runs]), mean([t[k][1] for _, t in runs]))
                                          for k in models}


def measure_model(name: str, settings: Settings, out: Path) -> list[dict]:
    """One row per method for model `name`: pruned (or read back), both pruned models timed against the unpruned
    one interleaved (in both orders) and against each other, and each evaluated before fine-tuning on the
    fine-tune's validation images."""
    model, weights = resolve_model(name, settings.weights)
    img_size = model_img_size(model)
    latency = latency_model(settings)
    files, summaries = prune_or_read(name, model, settings, latency, out)
    pruned = {m: pruned_model(str(files[m])).eval() for m in METHODS}
    data = build_datasets(settings.data, img_size, settings.data_dir)
    images = torch.stack([data.train[i][0] for i in range(settings.latency_batch)])
    timer = dataclasses.replace(latency, calls=settings.timing_calls)
    unpruned_ms, timed = measure_both_orders(timer, model, pruned, images)
    # Equal latency is judged on the MAC-targeted model timed against the latency-targeted one directly, as the
    # bisection matched them: a ratio of two fractions of the unpruned latency adds both fractions' noise.
    matched = dict(latency=1.0, macs=timer.measure(pruned["latency"], pruned["macs"], images)[2])
    val_set = subset(data.val, settings.val_images)  # the fine-tunes' own validation images (TrainConfig.limit_val)
    val = tpr.ServedBatches(val_set, list(range(len(val_set))), settings.batch_size)
    acc_unpruned = _accuracy(model, val)
    return [dict(model=Path(name).stem, method=method, weights=weights, img_size=img_size,
                 acc_unpruned=acc_unpruned, acc_pruned=_accuracy(pruned[method], val),
                 latency_kept=timed[method][1], latency_ms=timed[method][0], unpruned_ms=unpruned_ms,
                 latency_vs_latency_target=matched[method],
                 macs_kept=summaries[method]["macs_kept"],
                 params_kept=summaries[method]["params_after_m"] / summaries[method]["params_before_m"],
                 target_latency=settings.target_latency, target_macs=summaries[method]["target_macs"],
                 latency_probes=summaries[method].get("latency_probes"), latency_device=latency.describe(),
                 latency_batch=settings.latency_batch, pruned=str(files[method]))
            for method in METHODS]


# --- fine-tunes, tables, claims ---------------------------------------------------------------------------------

def finetune_run(settings: Settings, pruned: dict, seed: int) -> Run:
    """The fine-tune of one pruned model (a row of `measure_model`) with one seed; the model file keys it too."""
    config = TrainConfig(model=pruned["model"], data=settings.data, data_dir=settings.data_dir,
                         img_size=pruned["img_size"], epochs=settings.finetune_epochs, warmup_epochs=0,
                         batch_size=settings.batch_size, lr=settings.lr, limit_train=settings.finetune_images,
                         limit_val=settings.val_images, threads=settings.threads, seed=seed)
    return Run(config, build=pruned_model, build_kwargs=dict(path=str(Path(pruned["pruned"]).resolve())))


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Per model and method: fine-tuned accuracy mean and std over seeds, beside what does not vary by seed."""
    fixed = ["acc_unpruned", "acc_pruned", "latency_kept", "latency_vs_latency_target", "latency_ms", "unpruned_ms",
             "macs_kept", "params_kept", "target_latency", "target_macs"]
    return runs.groupby(["model", "method"], as_index=False, sort=False).agg(
        acc_mean=("acc_finetuned", "mean"), acc_std=("acc_finetuned", "std"), seeds=("seed", "count"),
        **{column: (column, "first") for column in fixed})


def _latency_beats_macs(model: str, by_latency: pd.Series, by_macs: pd.Series) -> Claim:
    """Latency-targeted against MAC-targeted accuracy, each give or take its seeds' std (as the MHSA study
    judges), the MAC-targeted model's latency within LATENCY_MATCH of the latency-targeted one's."""
    gap = by_latency.acc_mean - by_macs.acc_mean
    spread = by_latency.acc_std + by_macs.acc_std
    seeds = int(min(by_latency.seeds, by_macs.seeds))
    latency_ratio = by_macs.latency_vs_latency_target
    equal = abs(latency_ratio - 1) <= LATENCY_MATCH
    if seeds < 2 or not equal:
        verdict = INCONCLUSIVE
    else:
        verdict = CONFIRMED if gap > spread else REFUTED if gap < -spread else INCONCLUSIVE
    caveat = ("" if equal else f"; not at equal latency (timed against each other they differ by "
                               f"{100 * abs(latency_ratio - 1):.0f}%, more than {100 * LATENCY_MATCH:.0f}%)") + (
        "; one seed, no spread" if seeds < 2 else "")
    return Claim(
        f"latency-aware pruning keeps more accuracy at equal latency ({model}).", verdict,
        f"fine-tuned accuracy {by_latency.acc_mean:.2f} ± {by_latency.acc_std:.2f} with a latency target against "
        f"{by_macs.acc_mean:.2f} ± {by_macs.acc_std:.2f} with the MAC target of the same measured latency (mean ± "
        f"std over {seeds} seeds; a gap beyond the sum of the stds decides), at {by_latency.latency_kept:.2f} and "
        f"{by_macs.latency_kept:.2f} of the unpruned latency (the MAC-targeted model at {latency_ratio:.3f} of the "
        f"latency-targeted one's, timed against it), keeping {100 * by_latency.macs_kept:.0f}% and "
        f"{100 * by_macs.macs_kept:.0f}% of the MACs; {by_latency.acc_pruned:.1f}% and {by_macs.acc_pruned:.1f}% "
        f"before fine-tuning, {by_latency.acc_unpruned:.1f}% unpruned{caveat}.",
        {f"{model} accuracy, latency target": float(by_latency.acc_mean),
         f"{model} accuracy, MAC target at equal latency": float(by_macs.acc_mean),
         f"{model} latency kept, latency target": float(by_latency.latency_kept),
         f"{model} latency kept, MAC target": float(by_macs.latency_kept),
         f"{model} latency of the MAC target over the latency target's": float(latency_ratio)})


def claims(summary: pd.DataFrame) -> list[Claim]:
    """The latency target against the MAC target at equal latency, per model of `summarize`'s table with both."""
    found = []
    for model, rows in summary.groupby("model", sort=False):
        by_method = rows.set_index("method")
        if set(METHODS) <= set(by_method.index):
            found.append(_latency_beats_macs(model, by_method.loc["latency"], by_method.loc["macs"]))
    return found


LABELS = dict(macs="MAC target, bisected to the same latency", latency="latency target")


def plot(summary: pd.DataFrame):
    """Fine-tuned accuracy per model and method (mean ± std over seeds), before fine-tuning (x) and unpruned
    (dashed); each bar labelled with the latency and MACs it keeps."""
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(summary.model))
    fig = Figure(figsize=(2.6 * len(models) + 2.4, 4.2))
    ax = fig.subplots()
    width = 0.38
    for j, method in enumerate(METHODS):
        rows = summary[summary.method == method].set_index("model").reindex(models)
        x = [i + (j - 0.5) * width for i in range(len(models))]
        ax.bar(x, rows.acc_mean, width * 0.95, yerr=rows.acc_std.fillna(0), capsize=3, label=LABELS[method])
        ax.scatter(x, rows.acc_pruned, marker="x", color="black", zorder=3,
                   label="before fine-tuning" if j == 0 else None)
        for xi, r in zip(x, rows.itertuples()):
            ax.annotate(f"latency {r.latency_kept:.2f}\nMACs {r.macs_kept:.2f}", (xi, 1), ha="center", fontsize=7,
                        xytext=(0, 3), textcoords="offset points")
    unpruned = summary.groupby("model", sort=False).acc_unpruned.first().reindex(models)
    ax.hlines(unpruned, [i - 0.45 for i in range(len(models))], [i + 0.45 for i in range(len(models))],
              colors="gray", linestyles="--", label="unpruned")
    ax.set_xticks(range(len(models)), models)
    first = summary.iloc[0]
    ax.set(ylabel="validation accuracy (%)", ylim=(0, 118),
           title=f"pruned to {first.target_latency:.2f} of the measured latency, fine-tuned; mean ± std over "
                 f"{int(first.seeds)} seeds")
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.tight_layout()
    return fig


def run(settings: Settings) -> pd.DataFrame:
    """Prune, time and fine-tune every model of `settings`; write runs.csv, summary.csv and prune_study.png into
    settings.out and return the runs table."""
    settings.check()
    torch.set_num_threads(settings.threads)
    out = Path(settings.out)
    pruned = [row for name in settings.models for row in measure_model(name, settings, out)]
    grid = [(row, seed) for row in pruned for seed in settings.seeds]
    outcomes = launch.run_trainings([finetune_run(settings, row, seed) for row, seed in grid], out / "runs",
                                    Launcher.of(settings))
    missing = launch.missing_report(outcomes)
    if missing:
        print(missing, file=sys.stderr)
    rows = [dict(row, seed=seed, acc_finetuned=outcome.metrics["val_acc"], finetune_epochs=settings.finetune_epochs,
                 finetune_images=settings.finetune_images, val_images=settings.val_images,
                 train_time_s=outcome.train_time_s, run=outcome.folder.name)
            for (row, seed), outcome in zip(grid, outcomes) if outcome.finished]
    if not rows:
        raise UserError(f"no fine-tune finished in {out / 'runs'}: {missing}")
    runs = pd.DataFrame(rows)
    summary = summarize(runs)
    print(f"-> {write_csv(runs.round(4), out / 'runs.csv')}")
    print(f"-> {write_csv(summary.round(4), out / 'summary.csv')}")
    print(f"-> {save_figure(plot(summary), out / 'prune_study.png')}")
    print(summary[["model", "method", "acc_mean", "acc_std", "seeds", "acc_pruned", "acc_unpruned", "latency_kept",
                   "macs_kept"]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for row in summary[summary.method == "macs"].itertuples():
        if abs(row.latency_vs_latency_target - 1) > LATENCY_MATCH:
            print(f"note: {row.model}'s MAC-targeted model runs at {row.latency_vs_latency_target:.3f} of the "
                  f"latency-targeted one's latency, more than {100 * LATENCY_MATCH:.0f}% off (raise --probes, or time "
                  f"on a quieter machine)", file=sys.stderr)
    for claim in claims(summary):
        print(claim.markdown())
    return runs


def main(argv: Optional[Sequence[str]] = None) -> pd.DataFrame:
    return run_cli(lambda: run(parse_settings(Settings, argv, "python -m experiments.prune_study", __doc__)))


if __name__ == "__main__":
    main()
