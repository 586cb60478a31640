"""Print the M0-M5 preset table: params and FLOPs (fvcore, BN-folded and unfolded) beside the paper's values.

    python -m evit.builder.summary [--img-size 224] [--out results/presets]
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Optional

import pandas as pd
import torch
import torch.nn as nn

from .config import PAPER, PRESETS
from .efficientvit import EfficientViT, fuse
from .io import markdown_table, write_csv, write_text


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, img_size: int = 224, in_chans: int = 3) -> float:
    """fvcore FLOPs (one fused multiply-add = one FLOP, the paper's convention) for one image."""
    with warnings.catch_warnings():  # fvcore warns about ops it skips, and its import about torch.jit.script
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, in_chans, img_size, img_size))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return float(analysis.total())


def preset_table(img_size: int = 224) -> pd.DataFrame:
    """One row per preset: params and FLOPs of the model as trained and as deployed, with the paper's values."""
    rows = []
    for name, config in PRESETS.items():
        model = EfficientViT(config.replace(img_size=img_size)).eval()
        deployed = fuse(model)
        paper = PAPER[name]
        row = dict(
            model=f"evit_{name}",
            params_m=count_params(model) / 1e6,
            params_fused_m=count_params(deployed) / 1e6,
            paper_params_m=paper["params_m"],
            flops_m=count_flops(model, img_size) / 1e6,
            flops_fused_m=count_flops(deployed, img_size) / 1e6,
            paper_flops_m=paper["flops_m"],
        )
        row["flops_fused_vs_paper_pct"] = 100 * (row["flops_fused_m"] / paper["flops_m"] - 1)
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame) -> str:
    """The presets' table, each column with its own precision."""
    shown = pd.DataFrame({
        "model": df.model, "params (M)": df.params_m.map("{:.3f}".format),
        "params BN-folded (M)": df.params_fused_m.map("{:.3f}".format),
        "paper params (M)": df.paper_params_m.map("{:.1f}".format), "FLOPs (M)": df.flops_m.map("{:.1f}".format),
        "FLOPs BN-folded (M)": df.flops_fused_m.map("{:.1f}".format),
        "paper FLOPs (M)": df.paper_flops_m.map("{:.0f}".format),
        "folded vs paper": df.flops_fused_vs_paper_pct.map("{:+.2f}%".format)})
    return markdown_table(shown)


def save_presets(df: pd.DataFrame, out: Path) -> None:
    """presets.csv and presets.md (the markdown table) in `out`."""
    write_csv(df.round(4), out / "presets.csv")
    write_text(out / "presets.md", to_markdown(df))


def main(argv: Optional[list[str]] = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(prog="python -m evit.builder.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for presets.csv and presets.md (default: print only)")
    args = parser.parse_args(argv)
    df = preset_table(args.img_size)
    print(f"EfficientViT presets at {args.img_size}x{args.img_size} (fvcore FLOPs: one multiply-add = one FLOP)")
    print(to_markdown(df))
    if args.out is not None:
        save_presets(df, args.out)
        print(f"wrote {args.out / 'presets.csv'} and {args.out / 'presets.md'}")
    return df


if __name__ == "__main__":
    main()
