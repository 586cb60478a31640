"""Which timm model families each analysis can read: a support matrix computed by running the analyses.

    python -m experiments.support_matrix                       # every family, every analysis
    python -m experiments.support_matrix --out results/support --readme README.md   # and the README's table

One model per family (the smallest timm ships), random weights, a couple of Fashion-MNIST validation images at the
model's own resolution. A cell is `yes: <what was read>`, `no: <the analysis's own refusal>` (a clean, one-line
error a user would also get) or `fails: <exception>` (a crash: a bug to fix, not a limit). The figures of the
analyses are not computed here, only whether and how each one reads the model:
- op_profile: one profiled forward of one image (work counted, times attributed; peaks fixed, not measured);
- head_similarity: head similarity over the images (sites and heads read);
- taylor_prune: who found the pruning groups (the hand-written builders, discovery from the model itself, or
  both) and how many of each kind (Q/K, V, FFN hidden, widths), on a model that still computes the same function
  once the pruner has rewritten its attention, and one pruning step after which it still runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import pandas as pd
import torch
import torch.nn as nn

from evit.builder.io import markdown_table, write_csv, write_text
from evit.cli import UserError, option, parse_settings, run_cli
from evit.models import UnsupportedModelError, create_model, model_img_size


class Family(NamedTuple):
    name: str
    model: str  # a timm name (or evit's), the family's smallest
    attention: str  # what its attention is, in a few words
    heads: bool = True  # softmax attention with several heads per block: head similarity must read it
    pruned: bool = True  # Taylor pruning prunes it (by its builders or by discovery); else it refuses, saying why


FAMILIES = (
    Family("ViT", "vit_tiny_patch16_224", "global MHSA"),
    Family("DeiT", "deit_tiny_patch16_224", "global MHSA"),
    Family("DeiT distilled", "deit_tiny_distilled_patch16_224", "global MHSA, class + distillation tokens"),
    Family("DeiT-III", "deit3_small_patch16_224", "global MHSA, layer scale"),
    Family("CaiT", "cait_xxs24_224", "talking heads, class attention"),
    Family("EVA-02", "eva02_tiny_patch14_224", "rotary MHSA, SwiGLU FFN"),
    Family("BEiT", "beit_base_patch16_224", "MHSA with relative position bias"),
    Family("XCiT", "xcit_nano_12_p16_224", "cross-covariance (channel) attention, class attention", pruned=False),
    Family("Swin v1", "swin_tiny_patch4_window7_224", "shifted-window MHSA, relative bias"),
    Family("Swin v2", "swinv2_tiny_window8_256", "shifted-window cosine attention, continuous bias"),
    Family("Swin v2 (cr)", "swinv2_cr_tiny_ns_224", "shifted-window cosine attention (second implementation)"),
    Family("LeViT", "levit_128s", "Linear-BN attention with biases, stride-2 attention"),
    Family("PVT-v2", "pvt_v2_b0", "spatial-reduction attention"),
    Family("Twins-SVT", "twins_svt_small", "locally grouped + sub-sampled global attention"),
    Family("Twins-PCPVT", "twins_pcpvt_small", "spatial-reduction attention"),
    Family("MobileViT", "mobilevit_xxs", "MHSA over unfolded patches"),
    Family("EfficientFormer-v2", "efficientformerv2_s0", "talking-head attention with biases, stride-2 attention",
           pruned=False),
    Family("EfficientViT (MSRA, timm)", "efficientvit_m0", "cascaded group attention (the paper's model)"),
    Family("EfficientViT (evit)", "evit_m0", "cascaded group attention (this project's builder)"),
    Family("CrossViT", "crossvit_tiny_240", "two-branch MHSA, cross-attention of the class tokens"),
    Family("PiT", "pit_ti_224", "MHSA between pooling convs"),
    Family("TNT", "tnt_s_patch16_224", "inner (pixel) and outer (patch) MHSA"),
    Family("NesT", "nest_tiny", "MHSA in nested local blocks"),
    Family("ViT relpos", "vit_relpos_small_patch16_224", "MHSA with a relative-position MLP bias"),
    Family("Visformer", "visformer_tiny", "conv-stage MHSA with 1x1-conv qkv"),
    Family("MaxViT", "maxvit_nano_rw_256", "block and grid attention with relative bias, MBConv"),
    Family("CoAtNet", "coatnet_nano_rw_224", "MBConv stages, then 2-D relative attention"),
    Family("TinyViT", "tiny_vit_5m_224", "window attention with attention biases, MBConv stage"),
    Family("EfficientFormer", "efficientformer_l1", "pooling mixers, MHSA with attention biases at the end"),
    Family("FastViT", "fastvit_sa12", "RepMixer stages, MHSA at the end"),
    Family("Next-ViT", "nextvit_small", "conv blocks and MHSA with spatial reduction"),
    Family("ViTamin", "vitamin_small_224", "MBConv stages, then MHSA"),
    Family("CAFormer", "caformer_s18", "MetaFormer: separable-conv stages, then MHSA"),
    Family("ConViT", "convit_tiny", "gated positional self-attention", pruned=False),
    Family("GC ViT", "gcvit_xxtiny", "window attention with global queries", pruned=False),
    Family("DaViT", "davit_tiny", "window attention and channel attention", pruned=False),
    Family("MViTv2", "mvitv2_tiny", "pooling attention (pooled q, k, v)", pruned=False),
    Family("Hiera", "hiera_tiny_224", "mask-unit attention with pooled queries", pruned=False),
    Family("VOLO", "volo_d1_224", "outlook attention, then MHSA and class attention", pruned=False),
    Family("EdgeNeXt", "edgenext_xx_small", "transposed (channel) attention", pruned=False),
    Family("MobileViT-v2", "mobilevitv2_050", "separable (linear) attention", heads=False, pruned=False),
    Family("EfficientViT (MIT)", "efficientvit_b0", "ReLU linear attention", heads=False, pruned=False),
    Family("ConvNeXt", "convnext_atto", "none (convolutions)", heads=False, pruned=False),
    Family("ResNet", "resnet18", "none (convolutions)", heads=False, pruned=False),
)
ANALYSES = ("op_profile", "head_similarity", "taylor_prune")
NUM_IMAGES = 2
DEFAULT_OUT = "runs/support"
README_BEGIN, README_END = "<!-- support matrix: begin -->", "<!-- support matrix: end -->"


def _op_profile(model: nn.Module, images: torch.Tensor) -> str:
    from analysis.op_profile import profile_model

    # Peaks given: the matrix asks whether a model can be profiled, not where this device's ridge lies.
    profile = profile_model(model, example=images[:1], iters=1, warmup=1, peaks=(100.0, 10.0))
    unclassified = f", unclassified ops: {', '.join(profile.unknown_ops)}" if profile.unknown_ops else ""
    return f"{len(profile.signatures)} op signatures{unclassified}"


def _head_similarity(model: nn.Module, images: torch.Tensor) -> str:
    from analysis.head_similarity import check_readable, head_similarity

    check_readable(model, images.shape[-1])
    df = head_similarity(model, images, batch_size=len(images))
    return f"{df.module.nunique()} sites, {len(df)} heads"


def _taylor_prune(model: nn.Module, images: torch.Tensor) -> str:
    """Who found the groups (the hand-written builders, discovery from the model itself, or both) and how many of
    each kind, once the model the pruner rewrote (attention projections split in place) is shown to compute what
    it computed before (a rewrite that drops a bias or a position term would prune another model), and one pruning
    step to half the MACs after which the model still runs."""
    from analysis.taylor_prune import prepare, prunable, prune_to_target
    from analysis.taylor_prune.builders.traced_attention import TracedAttention

    with torch.no_grad():
        before = model(images)
        model = prunable(model)
        groups = prepare(model)
        diff = float((model(images) - before).abs().max())
    if not diff <= 1e-4 * max(1.0, float(before.abs().max())):
        raise AssertionError(f"the model prepared for pruning computes another function (max diff {diff:.3g})")
    traced = {id(m) for m in model.modules() if isinstance(m, TracedAttention)}
    built = any(g.attention is not None and id(g.attention) not in traced for g in groups)
    found = "builders + discovered" if traced and built else "discovered" if traced else "builders"
    counts = ", ".join(f"{sum(g.kind == kind for g in groups)} {name}"
                       for kind, name in (("qk", "Q/K"), ("v", "V"), ("ffn", "FFN"), ("width", "width")))
    labels = torch.zeros(len(images), dtype=torch.long)  # any labels: the step is a smoke test, not a result
    kept = prune_to_target(model, [(images, labels)], target_macs=0.5, steps=1).summary["macs_kept"]
    with torch.no_grad():
        model(images)
    return f"{found}: {counts}; one step to {kept:.2f} of the MACs"


CHECKS: dict[str, Callable[[nn.Module, torch.Tensor], str]] = {
    "op_profile": _op_profile, "head_similarity": _head_similarity, "taylor_prune": _taylor_prune}


def _refusals() -> tuple[type[Exception], ...]:
    """The clean, one-line errors the analyses give users for a model they cannot read."""
    from analysis.op_profile import ProfileError

    return UnsupportedModelError, ProfileError


def support_cell(analysis: str, model: nn.Module, images: torch.Tensor) -> str:
    """`yes: ...`, `no: <refusal>` or `fails: <exception>` for one analysis of one model."""
    try:
        return f"yes: {CHECKS[analysis](model, images)}"
    except _refusals() as e:
        return f"no: {_one_line(e)}"
    except Exception as e:  # noqa: BLE001 -- a crash is what this cell reports, in one line
        return f"fails: {type(e).__name__}: {_one_line(e)}"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())  # some exceptions (torch's shape errors) span lines


def family_row(family: Family, analyses: Sequence[str] = ANALYSES, data_dir: Optional[str] = None) -> dict:
    """One family's cells, each analysis on its own fresh model (the pruner edits the model it reads)."""
    from analysis.head_similarity import load_images

    def fresh() -> nn.Module:  # the same random weights for every analysis
        torch.manual_seed(0)
        return create_model(family.model).eval()

    model = fresh()
    size = model_img_size(model)
    images = load_images("fashion_mnist", size, NUM_IMAGES, data_dir)
    row = dict(family=family.name, model=family.model, attention=family.attention, img_size=size)
    for i, analysis in enumerate(analyses):
        row[analysis] = support_cell(analysis, model if i == 0 else fresh(), images)
    return row


def support_matrix(families: Sequence[Family] = FAMILIES, analyses: Sequence[str] = ANALYSES,
                   data_dir: Optional[str] = None, progress: Callable[[str], None] = lambda line: None
                   ) -> pd.DataFrame:
    rows = []
    for family in families:
        rows.append(family_row(family, analyses, data_dir))
        progress(f"{family.name} ({family.model}): " + "; ".join(f"{a} {rows[-1][a]}" for a in analyses))
    return pd.DataFrame(rows)


def short_cell(cell: str, limit: int = 130) -> str:
    """A cell for the markdown table: a refusal's module and reason (the detail after them dropped), pipes escaped,
    cut at `limit` characters."""
    verdict, _, message = cell.partition(": ")
    if verdict == "no":
        message = ": ".join(message.split("; ")[0].split(": ")[:2])
    cell = f"{verdict}: {message}".strip()
    cell = cell if len(cell) <= limit else cell[:limit - 1].rstrip() + "…"
    return cell.replace("|", "\\|")


def to_markdown(df: pd.DataFrame) -> str:
    table = df.assign(family=df.family + " (`" + df.model + "`)").drop(columns=["model", "img_size"])
    analyses = [c for c in ANALYSES if c in table]
    table[analyses] = table[analyses].map(short_cell)
    return markdown_table(table)


def replace_readme_table(readme: Path, table: str) -> None:
    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{readme} has no '{README_BEGIN}' ... '{README_END}' block for the table")
    write_text(readme, text[:begin + len(README_BEGIN)] + "\n" + table + text[end:])


def readme_table(readme: Path) -> str:
    """The table between the README's markers (as `to_markdown` wrote it)."""
    text = readme.read_text()
    return text[text.index(README_BEGIN) + len(README_BEGIN):text.index(README_END)].strip("\n") + "\n"


MODEL_NAMES = tuple(f.model for f in FAMILIES)


@dataclass
class Settings:
    models: list[str] = option(list(MODEL_NAMES), "models from the family list, comma-separated (default: all): "
                                                  + ", ".join(MODEL_NAMES))
    analyses: list[str] = option(list(ANALYSES), f"analyses, comma-separated, of: {', '.join(ANALYSES)}")
    data_dir: Optional[str] = option(None, "folder holding Fashion-MNIST (None: Debian's location)")
    threads: int = option(1, "torch CPU threads")
    out: Path = option(Path(DEFAULT_OUT), "folder for support_matrix.csv and support_matrix.md")
    readme: Optional[Path] = option(None, "also replace the table between the README's markers")

    def check(self) -> None:
        unknown = ([m for m in self.models if m not in MODEL_NAMES]
                   + [a for a in self.analyses if a not in ANALYSES])
        if unknown or not self.models or not self.analyses:
            raise UserError(f"unknown or missing models/analyses: {', '.join(unknown) or 'none given'}; valid "
                            f"models: {', '.join(MODEL_NAMES)}; valid analyses: {', '.join(ANALYSES)}")
        if self.readme is not None and (sorted(self.analyses) != sorted(ANALYSES)
                                        or len(set(self.models)) != len(MODEL_NAMES)):
            raise UserError("--readme needs the whole matrix: every model and every analysis")


def run(settings: Settings) -> pd.DataFrame:
    """The matrix of the settings' models and analyses, written as CSV and markdown (and into the README)."""
    settings.check()
    torch.set_num_threads(settings.threads)
    families = [f for f in FAMILIES if f.model in settings.models]
    df = support_matrix(families, settings.analyses, settings.data_dir, progress=print)
    out = Path(settings.out)
    table = to_markdown(df)
    print(f"-> {write_csv(df, out / 'support_matrix.csv')}, {write_text(out / 'support_matrix.md', table)}")
    if settings.readme is not None:
        replace_readme_table(settings.readme, table)
        print(f"-> {settings.readme}")
    return df


def main(argv: Optional[Sequence[str]] = None) -> pd.DataFrame:
    return run_cli(lambda: run(parse_settings(Settings, argv, "python -m experiments.support_matrix",
                                              __doc__.split("\n\n")[0])))


if __name__ == "__main__":
    main()
