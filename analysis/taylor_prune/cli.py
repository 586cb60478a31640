"""The command line: `python -m analysis.taylor_prune` (see the package docstring)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd
import torch
from torch.utils.data import Dataset

from analysis.taylor_prune.allocation import allocation_config
from analysis.taylor_prune.builders import prepare, prunable

from analysis.taylor_prune.importance import NORMALIZERS, REDUCTIONS, TaylorImportance
from analysis.taylor_prune.plot import plot
from analysis.taylor_prune.prune import PruneResult, taylor_prune
from evit.io import save_figure, write_csv
from experiments.train import USER_ERRORS
from experiments.models import UnsupportedModelError
from experiments.zoo import WeightsUnavailableError, resolve_model

DEFAULT_OUT = "results/taylor_prune"

class ServedBatches(Sequence):
    """Batches of chosen dataset items, served (resized, normalized) each time they are read, so that one batch at
    the model's resolution is in memory at a time: 2000 validation images at 224 px are 1.2 GB of float32."""

    def __init__(self, dataset: Dataset, picks: list[int], batch: int):
        self.dataset, self.picks, self.batch = dataset, picks, batch

    def __len__(self) -> int:
        return math.ceil(len(self.picks) / self.batch)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        items = [self.dataset[j] for j in self.picks[i * self.batch:(i + 1) * self.batch]]
        return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])

def load_batches(spec: str, img_size: int, batches: int, batch: int, val_images: int,
                 data_dir: Optional[str] = None) -> tuple[list, ServedBatches, int]:
    """(`batches` gradient batches from the train split, validation batches holding `val_images` images, number
    of classes); fixed random choices. The gradient batches are read every step, so they are served once and
    kept; the validation batches, read twice, are served when read."""
    from experiments.data import build_datasets

    data = build_datasets(spec, img_size, data_dir)

    def picks(dataset: Dataset, count: int, seed: int) -> list[int]:
        return torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()

    train = list(ServedBatches(data.train, picks(data.train, batches * batch, 0), batch))
    return train, ServedBatches(data.val, picks(data.val, val_images, 1), batch), data.num_classes

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.taylor_prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_proxy", help="a proxy (deit_proxy, swin_proxy, evit_m0_proxy..), an evit "
                                                         "preset or config file, or a timm model of a family the "
                                                         "README's support table marks (ViT/DeiT, CaiT, EVA, BEiT, "
                                                         "Swin v1/v2, LeViT, PVT-v2, MobileViT, efficientvit_m*); "
                                                         "default deit_proxy")
    p.add_argument("--weights", default="auto", help="auto (proxy for proxies, else pretrained, else an error) | "
                                                     "proxy | quick-proxy | pretrained | random | PATH")
    p.add_argument("--data", default="fashion_mnist", help="fashion_mnist | digits | imagefolder:PATH (the data "
                                                           "the weights were trained on)")
    p.add_argument("--data-dir", default=None, help="folder holding the data (overrides the default location)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's own)")
    p.add_argument("--target-macs", type=float, default=0.5, help="fraction of MACs to keep (default 0.5)")
    p.add_argument("--steps", type=int, default=5, help="iterative pruning steps (default 5)")
    p.add_argument("--batches", type=int, default=4, help="data batches for the gradients of each step")
    p.add_argument("--batch", type=int, default=32, help="images per batch")
    p.add_argument("--val-images", type=int, default=256,
                   help="validation images for accuracy before/after (default 256: a quick check; 2000 for a firm one)")
    p.add_argument("--normalizer", default="mean", choices=NORMALIZERS,
                   help="importance normalization within a group, torch-pruning's (default mean)")
    p.add_argument("--reduction", default="sum", choices=REDUCTIONS,
                   help="how a channel's layers combine, torch-pruning's group_reduction (default sum: Molchanov)")
    p.add_argument("--floor", type=float, default=0.1, help="fraction of each group always kept (default 0.1)")
    p.add_argument("--no-width", action="store_true", help="do not prune the residual-stream widths")
    p.add_argument("--finetune-epochs", type=int, default=0, help="short fine-tune after pruning (0: none)")
    p.add_argument("--finetune-images", type=int, default=20000, help="training images of the fine-tune")
    p.add_argument("--preset", default="m0", help="evit preset the allocation is scaled to (equal FLOPs)")
    p.add_argument("--mixer", default="cga", choices=("cga", "mhsa"),
                   help="allocation's attention: cga (V = C/H) or mhsa (V from the measured V ratio)")
    p.add_argument("--attention-share", default=None,
                   help="allocation's share of blocks with attention: a number in [0, 1], or an MHSA-proportion "
                        "summary.csv (analysis.mhsa_ratio) whose best evit share is taken (default: every block)")
    p.add_argument("--config-out", type=Path, default=None,
                   help="where to write the allocation config (default OUT/<model>_allocation.yaml)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    args = p.parse_args(argv)
    if not 0 < args.target_macs < 1:
        p.error(f"--target-macs must lie in (0, 1), got {args.target_macs}")
    if min(args.steps, args.batches, args.batch, args.val_images) < 1 or not 0 < args.floor <= 1:
        p.error("--steps, --batches, --batch and --val-images must be >= 1 and --floor in (0, 1]")
    if args.attention_share is not None:
        args.attention_share = _attention_share(args.attention_share, p)
    return args

def _attention_share(value: str, parser: argparse.ArgumentParser) -> float:
    """--attention-share: a number in [0, 1] or the best evit share of an MHSA-proportion summary CSV."""
    from analysis.mhsa_ratio import best_share

    try:
        share = float(value)
    except ValueError:
        if not Path(value).is_file():
            parser.error(f"--attention-share must be a number in [0, 1] or an existing summary.csv of "
                         f"analysis.mhsa_ratio; got {value!r}")
        try:
            share = best_share(pd.read_csv(value), "evit")
        except (ValueError, KeyError, pd.errors.ParserError) as e:
            parser.error(f"--attention-share {value}: not an MHSA-proportion summary with evit rows ({e})")
    if not 0 <= share <= 1:
        parser.error(f"--attention-share must lie in [0, 1], got {share}")
    return share

def check_inputs(args: argparse.Namespace) -> None:
    """Fail at once, reading no data and loading no weights, on a missing dataset, an unknown data spec or model
    name, a bad config file or a model this analysis cannot prune: before a proxy is trained or weights are
    fetched from the hub."""
    from experiments.data import check_data
    from experiments.models import check_model, skeleton

    check_data(args.data, args.data_dir)
    check_model(args.model)
    prepare(prunable(skeleton(args.model)))

def run(args: argparse.Namespace) -> PruneResult:
    from experiments.models import model_img_size

    check_inputs(args)
    model, weights = resolve_model(args.model, args.weights)
    img_size = args.img_size or model_img_size(model)
    train, val, num_classes = load_batches(args.data, img_size, args.batches, args.batch, args.val_images,
                                           args.data_dir)
    with torch.no_grad():
        outputs = model(train[0][0][:1]).shape[-1]
    if outputs != num_classes:
        print(f"note: the model has {outputs} outputs but {args.data} has {num_classes} classes: gradients and "
              f"accuracy use its own head (pass the data it was trained on)", file=sys.stderr)
    importance = TaylorImportance(args.normalizer, args.reduction)
    result = taylor_prune(model, train, args.target_macs, args.steps, importance, args.floor, val,
                          prune_width=not args.no_width)
    result.summary.update(model=args.model, weights=weights, data=args.data, img_size=img_size)
    if args.finetune_epochs:
        from experiments.data import build_datasets
        from experiments.train import TrainConfig, train as train_model

        cfg = TrainConfig(model=args.model, data=args.data, img_size=img_size, epochs=args.finetune_epochs,
                          warmup_epochs=0, lr=2e-4, limit_train=args.finetune_images, limit_val=args.val_images,
                          threads=args.threads)
        metrics = train_model(result.model, cfg, build_datasets(args.data, img_size, args.data_dir))
        result.summary.update(acc_finetuned=metrics["val_acc"], finetune_epochs=args.finetune_epochs)
        result.model.eval()
    return result

def main(argv: Optional[Sequence[str]] = None) -> PruneResult:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    stem = Path(args.model).stem
    try:
        result = run(args)
    except USER_ERRORS + (WeightsUnavailableError, UnsupportedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    s = result.summary
    blocks_csv = write_csv(result.blocks.round(5), args.out / f"{stem}.csv")
    write_csv(result.stages.round(5), args.out / f"{stem}_stages.csv")
    write_csv(pd.DataFrame([s]).round(5), args.out / f"{stem}_summary.csv")
    config = allocation_config(result.blocks, args.preset, name=f"{stem}_taylor", mixer=args.mixer,
                               attention_share=args.attention_share)
    config_path = args.config_out or args.out / f"{stem}_allocation.yaml"
    config.to_file(config_path)
    title = (f"{stem} ({s['weights']}): MACs {s['macs_before_m']:.2f}M -> {s['macs_after_m']:.2f}M, acc "
             f"{s['acc_before']:.1f} -> {s['acc_after']:.1f}%")
    save_figure(plot(result.blocks, title), args.out / f"{stem}.png")
    print(result.blocks[["block", "stage", "in_dim_before", "in_dim", "qk_ratio", "v_ratio", "ffn_ratio"]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{title} (normalizer {s['normalizer']}, reduction {s['reduction']})\n-> {blocks_csv}\n"
          f"allocation (evit_{args.preset}'s FLOPs, {args.mixer}) -> {config_path}: embed_dims {config.embed_dims}, "
          f"key_dims {config.key_dims}, v_ratio {config.v_ratio}, mlp_ratio {config.mlp_ratio}, mixers "
          f"{config.mixers}")
    return result

if __name__ == "__main__":
    main()
