"""The command line: `python -m analysis.taylor_prune` (see the package docstring)."""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import pandas as pd
import torch

from analysis.taylor_prune.allocation import MATCHES, DeployThroughput, allocate
from analysis.taylor_prune.builders import prepare, prunable
from analysis.taylor_prune.importance import NORMALIZERS, REDUCTIONS, LossChange, TaylorImportance
from analysis.taylor_prune.latency import LatencyModel
from analysis.taylor_prune.plot import plot
from analysis.taylor_prune.prune import PruneResult, prune_to_target
from analysis.taylor_prune.saved import save_pruned
from evit import get_preset
from evit.builder.io import save_figure, write_csv
from evit.cli import UserError, option, parse_settings, run_cli
from evit.data import build_datasets, check_data, load_batches
from evit.models import check_model, model_img_size, skeleton
from evit.train import TrainConfig, train as train_model
from evit.zoo import cache_dir, load_for_command

DEFAULT_OUT = "runs/taylor_prune"
IMPORTANCES = ("auto", "taylor", "loss_change")
FINETUNE_TEACHERS = ("none", "unpruned")

@dataclass
class Settings:
    """What `python -m analysis.taylor_prune` prunes and how: its fields are the command's flags."""
    model: str = option("deit_proxy", "a proxy (deit_proxy, swin_proxy, evit_m0_proxy..), an evit preset or config "
                        "file, or a timm model of a family the README's support table marks (ViT/DeiT, CaiT, EVA, "
                        "BEiT, Swin v1/v2, LeViT, PVT-v2, Twins, MobileViT, efficientvit_m*)")
    weights: str = option("auto", "auto (proxy for proxies, else pretrained, else an error) | proxy | quick-proxy | "
                          "pretrained | random | PATH")
    data: str = option("fashion_mnist", "fashion_mnist | digits | imagefolder:PATH (the data the weights were "
                       "trained on)")
    data_dir: Optional[str] = option(None, "folder holding the data (None: the default location)")
    img_size: Optional[int] = option(None, "input size (None: the model's own)")
    target_macs: float = option(0.5, "fraction of MACs to keep")
    target_latency: Optional[float] = option(None, "fraction of the unpruned model's latency on --device to keep, "
                                                   "instead of --target-macs (units chosen by the loss they add per ms "
                                                   "saved; docs/pruning.md)")
    device: str = option("cpu", "where latency is timed (with --target-latency or --match throughput)",
                         choices=("cpu", "cuda"))
    latency_batch: int = option(16, "images per timed call (with --target-latency or --match throughput)")
    steps: int = option(5, "iterative pruning steps")
    batches: int = option(4, "data batches for the gradients of each step")
    batch: int = option(32, "images per batch")
    val_images: int = option(256, "validation images for accuracy before/after (256: a quick check; 2000 for a "
                             "firm one)")
    importance: str = option("auto", "how channels are scored: taylor (|w * dL/dw| reduced and normalized per group "
                             "as torch-pruning's GroupTaylorImportance: --normalizer, --reduction) | loss_change (the "
                             "loss a channel's removal adds, comparable across groups) | auto (taylor for a MAC "
                             "target, loss_change for a latency target)", choices=IMPORTANCES)
    normalizer: str = option("mean", "taylor's normalization within a group, torch-pruning's", choices=NORMALIZERS)
    reduction: str = option("sum", "how a channel's layers combine, torch-pruning's group_reduction (sum: Molchanov)",
                            choices=REDUCTIONS)
    floor: float = option(0.1, "fraction of each group always kept")
    width: bool = option(True, "prune the residual-stream widths too")
    finetune_epochs: int = option(0, "short fine-tune after pruning (0: none)")
    finetune_images: int = option(20000, "training images of the fine-tune")
    finetune_teacher: str = option("none", "teacher of the fine-tune: none (labels only) or unpruned (distill from "
                                   "the unpruned model: soft KD on the class logits, or its distillation head where "
                                   "the model has one)", choices=FINETUNE_TEACHERS)
    save_model: Optional[Path] = option(None, "write the pruned (and fine-tuned) model here: it reloads without "
                                              "pruning, as --weights PATH of the analyses, evit.train and "
                                              "experiments.benchmark (docs/pruned_models.md)")
    preset: str = option("m0", "evit preset the allocation is scaled to (see --match)")
    match: str = option("flops", f"what the allocation matches in --preset: {' | '.join(MATCHES)} (flops: BN-folded "
                        "FLOPs at 224 px; throughput: deploy-mode img/s measured on --device at --latency-batch, side "
                        "by side, within 5%; none: widths unscaled)")
    mixer: str = option("cga", "allocation's attention: cga (V = C/H) or mhsa (V from the measured V ratio)",
                        choices=("cga", "mhsa"))
    # The flag's text (a number or a file); the allocation gets the share it names (read_attention_share).
    attention_share_from: Optional[str] = option(
        None, "allocation's share of blocks with attention: a number in [0, 1], or an MHSA-proportion summary.csv "
              "(analysis.mhsa_ratio) whose best evit share is taken (None: every block)",
        flags=("--attention-share",))
    config_out: Optional[Path] = option(None, "where to write the allocation config (None: "
                                              "OUT/<model>_allocation.yaml)")
    threads: int = option(1, "torch CPU threads")
    out: Path = option(Path(DEFAULT_OUT), "output folder")

    def check(self) -> None:
        if not 0 < self.target_macs < 1:
            raise UserError(f"--target-macs must lie in (0, 1), got {self.target_macs}")
        if self.target_latency is not None and not 0 < self.target_latency < 1:
            raise UserError(f"--target-latency must lie in (0, 1), got {self.target_latency}")
        if self.target_latency is not None and self.importance == "taylor" and self.normalizer != "none":
            raise UserError(f"--target-latency divides importance by absolute savings: --importance taylor with "
                            f"--normalizer {self.normalizer} scores each group on its own scale; pass --normalizer "
                            f"none or --importance loss_change")
        if self.match not in MATCHES:
            raise UserError(f"--match must be one of {', '.join(MATCHES)}; got {self.match!r}")
        get_preset(self.preset)  # an unknown name is a ConfigError: one line, before the pruning
        timed = self.target_latency is not None or self.match == "throughput"
        if timed and self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda asked but no CUDA GPU is visible to torch; use --device cpu")
        sizes = (self.steps, self.batches, self.batch, self.val_images, self.latency_batch)
        if min(sizes) < 1 or not 0 < self.floor <= 1:
            raise UserError("--steps, --batches, --batch, --val-images and --latency-batch must be >= 1 and --floor in "
                            "(0, 1]")
        read_attention_share(self.attention_share_from)
        if self.finetune_teacher not in FINETUNE_TEACHERS:
            raise UserError(f"--finetune-teacher must be one of {', '.join(FINETUNE_TEACHERS)}; got "
                            f"{self.finetune_teacher!r}")
        if self.finetune_teacher != "none" and not self.finetune_epochs:
            raise UserError(f"--finetune-teacher {self.finetune_teacher} teaches the fine-tune: add --finetune-epochs "
                            f"N")


def read_attention_share(value: Optional[str]) -> Optional[float]:
    """--attention-share as a number: given, or the best evit share of an MHSA-proportion summary CSV."""
    from analysis.mhsa_ratio import best_share

    if value is None:
        return None
    try:
        share = float(value)
    except ValueError:
        if not Path(value).is_file():
            raise UserError(f"--attention-share must be a number in [0, 1] or an existing summary.csv of "
                            f"analysis.mhsa_ratio; got {value!r}") from None
        try:
            share = best_share(pd.read_csv(value), "evit")
        except (ValueError, KeyError, pd.errors.ParserError) as e:
            raise UserError(f"--attention-share {value}: not an MHSA-proportion summary with evit rows ({e})") from e
    if not 0 <= share <= 1:
        raise UserError(f"--attention-share must lie in [0, 1], got {share}")
    return share


def importance_of(settings: Settings) -> Union[TaylorImportance, LossChange]:
    """The scorer --importance names (auto: by the target)."""
    if settings.importance == "loss_change" or (settings.importance == "auto" and settings.target_latency is not None):
        return LossChange()
    return TaylorImportance(settings.normalizer, settings.reduction)


def check_inputs(settings: Settings) -> None:
    """Fail at once, reading no data and loading no weights, on a bad setting, a missing dataset, an unknown data
    spec or model name, a bad config file or a model this analysis cannot prune: before a proxy is trained or
    weights are fetched from the hub."""
    settings.check()
    check_data(settings.data, settings.data_dir)
    check_model(settings.model)
    prepare(prunable(skeleton(settings.model)))


def prune_model(settings: Settings) -> PruneResult:
    """The pruned model and its tables, written nowhere (`run` writes them)."""
    check_inputs(settings)
    model, weights = load_for_command(settings.model, settings.weights)
    img_size = settings.img_size or model_img_size(model)
    train, val, num_classes = load_batches(settings.data, img_size, settings.batches, settings.batch,
                                           settings.val_images, settings.data_dir)
    with torch.no_grad():
        outputs = model(train[0][0][:1]).shape[-1]
    if outputs != num_classes:
        print(f"note: the model has {outputs} outputs but {settings.data} has {num_classes} classes: gradients and "
              f"accuracy use its own head (pass the data it was trained on)", file=sys.stderr)
    importance = importance_of(settings)
    # the pruning works in place: the teacher is the model as loaded
    teacher = copy.deepcopy(model) if settings.finetune_teacher == "unpruned" else None
    # Latency tables are kept beside the trained proxies: they depend on the model and the machine, not the run.
    latency = (LatencyModel(settings.device, settings.latency_batch, cache_dir=cache_dir() / "latency")
               if settings.target_latency is not None else None)
    result = prune_to_target(model, train, settings.target_macs, settings.steps, importance, settings.floor, val,
                          prune_width=settings.width, target_latency=settings.target_latency, latency=latency)
    result.summary.update(model=settings.model, weights=weights, data=settings.data, img_size=img_size)
    if settings.finetune_epochs:
        cfg = TrainConfig(model=settings.model, data=settings.data, img_size=img_size,
                          epochs=settings.finetune_epochs, warmup_epochs=0, lr=2e-4,
                          limit_train=settings.finetune_images, limit_val=settings.val_images,
                          threads=settings.threads, distillation_type="soft")
        metrics = train_model(result.model, cfg, build_datasets(settings.data, img_size, settings.data_dir), teacher)
        result.summary.update(acc_finetuned=metrics["val_acc"], finetune_epochs=settings.finetune_epochs,
                              finetune_teacher=settings.finetune_teacher)
        result.model.eval()
    return result


def run(settings: Settings) -> PruneResult:
    """Prune, then write the per-block, stage and summary tables, the figure and the allocation config into
    settings.out."""
    torch.set_num_threads(settings.threads)
    result = prune_model(settings)
    out, stem, s = Path(settings.out), Path(settings.model).stem, result.summary
    if settings.save_model:  # first: the pruning is the long part, and what follows could still fail
        print(f"pruned model -> {save_pruned(result.model, settings.save_model, settings.model, s['weights'], s)}")
    blocks_csv = write_csv(result.blocks.round(5), out / f"{stem}.csv")
    write_csv(result.stages.round(5), out / f"{stem}_stages.csv")
    measure = DeployThroughput(settings.device, settings.latency_batch)
    allocation = allocate(result.blocks, settings.preset, settings.match, name=f"{stem}_taylor", mixer=settings.mixer,
                          attention_share=read_attention_share(settings.attention_share_from), measure=measure)
    s.update(allocation.summary, **(measure.fields() if settings.match == "throughput" else {}))
    write_csv(pd.DataFrame([s]).round(5), out / f"{stem}_summary.csv")
    config = allocation.config
    config_path = settings.config_out or out / f"{stem}_allocation.yaml"
    config.to_file(config_path)
    title = (f"{stem} ({s['weights']}): MACs {s['macs_before_m']:.2f}M -> {s['macs_after_m']:.2f}M, acc "
             f"{s['acc_before']:.1f} -> {s['acc_after']:.1f}%")
    if settings.target_latency is not None:
        title += (f", latency {s['latency_before_ms']:.1f} -> {s['latency_after_ms']:.1f} ms "
                  f"({s['latency_kept']:.2f} kept)")
    save_figure(plot(result.blocks, title), out / f"{stem}.png")
    print(result.blocks[["block", "stage", "in_dim_before", "in_dim", "qk_ratio", "v_ratio", "ffn_ratio"]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{title} (importance {s['importance']}, normalizer {s['normalizer']}, reduction {s['reduction']})\n-> {blocks_csv}\n"
          f"allocation ({_matched(settings, s)}, {settings.mixer}) -> {config_path}: embed_dims "
          f"{config.embed_dims}, key_dims {config.key_dims}, v_ratio {config.v_ratio}, mlp_ratio {config.mlp_ratio}, "
          f"mixers {config.mixers}")
    return result


def _matched(settings: Settings, summary: dict) -> str:
    """What the allocation was scaled to, for the printed line."""
    if settings.match == "none":
        return "widths unscaled"
    if settings.match == "flops":
        return (f"evit_{settings.preset}'s FLOPs: {summary['allocation_flops_m']:.1f}M vs "
                f"{summary['preset_flops_m']:.1f}M")
    return (f"evit_{settings.preset}'s throughput: {summary['allocation_throughput']:.0f} vs "
            f"{summary['preset_throughput']:.0f} img/s ({summary['allocation_throughput_ratio']:.3f}) on "
            f"{settings.device}, batch {settings.latency_batch}, {summary['allocation_threads']} thread(s)")


def main(argv: Optional[Sequence[str]] = None) -> PruneResult:
    return run_cli(lambda: run(parse_settings(Settings, argv, "python -m analysis.taylor_prune", __doc__)))


if __name__ == "__main__":
    main()
