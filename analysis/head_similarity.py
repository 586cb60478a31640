"""Attention-head similarity (paper Fig. 4): how alike are the heads of each block?

For every attention site (a module that ran softmax attention: a block's attention, a LeViT downsampling
attention, a CaiT class attention) and head: the maximum cosine similarity of the head's attention map (flattened
Nq x Nk, per image and per window) to the other heads of the site, averaged over images and windows. Reported
raw (the paper's measure) and centred (each query's uniform distribution over the keys it can see, 1/Nk unless a
mask hides some, as Swin's shifted windows do, removed first: near-uniform maps, as at random init, give raw
~0.999 for every pair), next to a random-init baseline of the same architecture over several seeds (mean, std).
A uniform map (a window of identical tokens, e.g. blank background, in a head without position bias; any map of
a site whose queries see a single key) centres to the zero vector, which has no cosine: it is left out, and a head
with no map left gets NaN. Maps are read from any family by analysis.attention_capture.

    python -m analysis.head_similarity --model deit_tiny --weights pretrained
    python -m analysis.head_similarity --model deit_proxy,swin_proxy        # trained proxies, side by side
    python -m analysis.head_similarity --model evit_m0,results/head_similarity/evit_m0_mhsa.yaml  # CGA vs MHSA
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from analysis.attention_capture import CapturedMaps, UnsupportedModelError, capture_attention, find_attention
from evit.builder.io import save_figure, write_csv
from evit.claims import CONFIRMED, INCONCLUSIVE, Claim, names, tally
from evit.data import (ArrayDataset, check_data, image_folder, load_digits_split, load_fashion_mnist,
                              parse_spec, subset)
from evit.cli import UserError, option, parse_settings, run_cli
from evit.models import is_config_file, model_img_size
from evit.zoo import load_for_command

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_OUT = "runs/head_similarity"
METRICS = ("max_cos_raw", "max_cos_centred")


# ------------------------------------------------------------------------------------------------ similarity


def uniform_part(maps: torch.Tensor, visible: Optional[torch.Tensor] = None) -> torch.Tensor | float:
    """What centring removes from (B, H, Nq, Nk) maps: each query's uniform distribution over the keys it can see,
    1/Nk, or over `visible` (bool, broadcastable to the maps) where a mask hides keys (Swin's shifted windows)."""
    return 1.0 / maps.shape[-1] if visible is None else visible / visible.sum(-1, keepdim=True)


def pairwise_cosine(maps: torch.Tensor, centred: bool = False, visible: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """(B, H, N, N) attention maps -> (B, H, H) cosine similarity of the heads' flattened maps, per map.

    `centred` subtracts `uniform_part` first, so that near-uniform maps (random init) and the mask shared by all
    heads do not count as similarity. The cosine is taken in float64: identical heads give 1 to ~1e-15. A uniform
    map centres to the zero vector, whose cosine is undefined; here it comes out 0 (`is_uniform` tells them apart).
    """
    if centred:  # in the maps' dtype, so a softmax of equal logits becomes exactly 0, not rounding noise
        maps = maps - uniform_part(maps, visible)
    x = F.normalize(maps.flatten(2).double(), dim=-1)
    return x @ x.transpose(1, 2)


def is_uniform(maps: torch.Tensor, visible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, H, Nq, Nk) maps -> (B, H) bool: which maps are exactly their uniform part on every key their queries can
    see, so that their centred form is the zero vector and has no cosine with anything. A window of identical
    tokens (blank background) gives one in every head that adds no position bias: identical keys, equal logits.
    What hidden keys keep (~1e-44 under Swin's -100 mask) is not attention and does not count.
    """
    centred = maps - uniform_part(maps, visible)
    if visible is not None:
        centred = centred.masked_fill(~visible, 0)
    return centred.flatten(2).eq(0).all(-1)


def _others(sim: torch.Tensor) -> torch.Tensor:
    """Similarities with each head's similarity to itself masked out (-inf)."""
    eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    return sim.masked_fill(eye, float("-inf"))


def max_other(sim: torch.Tensor) -> torch.Tensor:
    """(..., H, H) similarities (-inf: undefined) -> (..., H) maximum over the other heads, NaN where there is
    none (a block with one head, or every similarity undefined)."""
    values = _others(sim).amax(-1)
    return values.masked_fill(values.isneginf(), float("nan"))


def most_similar(sim: torch.Tensor) -> list[Optional[int]]:
    """(H, H) mean similarities (NaN: never defined) -> for each head the most similar other head (None where
    there is no other head, or no defined similarity to one)."""
    others = _others(sim.nan_to_num(nan=float("-inf")))
    best, index = others.max(-1)
    return [None if value.isneginf() else int(i) for value, i in zip(best, index)]


def _sums(captured: CapturedMaps) -> dict[str, torch.Tensor]:
    """Sums over one batch of maps: each metric per head (H,), the maps each metric's sum holds per head (H,),
    centred similarities (H, H) and how many maps each pair's sum holds (H, H), the number of maps.

    A centred similarity involving a uniform map (`is_uniform`) is undefined and left out of every sum."""
    maps, visible = captured
    raw, centred = pairwise_cosine(maps), pairwise_cosine(maps, True, visible)
    defined = ~is_uniform(maps, visible)
    pair_defined = defined[:, :, None] & defined[:, None, :]
    centred_max = max_other(centred.masked_fill(~pair_defined, float("-inf")))
    return {"max_cos_raw": max_other(raw).sum(0), "max_cos_centred": centred_max.nansum(0),
            "centred_maps": centred_max.isfinite().sum(0), "pairs": centred.masked_fill(~pair_defined, 0).sum(0),
            "pair_maps": pair_defined.sum(0), "count": torch.tensor(len(raw))}


@torch.no_grad()
def head_similarity(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> pd.DataFrame:
    """One row per (attention site, head) of `model`: its maximum raw and centred cosine similarity to another
    head of the site, averaged over `images` and windows, the head it resembles most (by mean centred
    similarity), and the site's layout (heads, query and key tokens, maps per image). Sites attending over a
    single key get NaN (one key: every map is 1).

    The centred maximum of a map is over the other heads whose maps are not uniform (`is_uniform`); a map that is
    uniform, or whose every other head's is, has none and is left out of the head's mean
    (`centred_maps_left_out` counts them; NaN when every map is).
    """
    model.eval()
    sums: dict[str, dict[str, torch.Tensor]] = {}
    layouts: dict[str, torch.Size] = {}
    with capture_attention(model) as capture:
        for batch in images.split(batch_size):  # reduce per batch: all maps of all images would not fit
            model(batch)
            for name, captured in capture.take().items():
                new, old = _sums(captured), sums.get(name)
                sums[name] = new if old is None else {k: old[k] + v for k, v in new.items()}
                layouts[name] = captured.maps.shape[1:]
        module_types = {name: type(site.module).__name__ for name, site in capture.sites.items()}
    rows = []
    for block, (name, acc) in enumerate(sums.items()):
        (heads, queries, keys), count = layouts[name], int(acc["count"])
        raw = acc["max_cos_raw"] / count if keys > 1 else torch.full((heads,), float("nan"))
        centred = acc["max_cos_centred"] / acc["centred_maps"]  # 0 / 0: NaN for a head with no defined map
        # With two or more heads a map lacks a centred maximum only when it, or every other head's, is uniform.
        left_out = count - acc["centred_maps"] if heads > 1 else torch.zeros(heads, dtype=torch.long)
        closest = most_similar(acc["pairs"] / acc["pair_maps"])
        for head in range(heads):
            rows.append(dict(block=block, module=name, module_type=module_types[name], head=head, num_heads=heads,
                             query_tokens=queries, key_tokens=keys, maps_per_image=count // len(images),
                             max_cos_raw=float(raw[head]), max_cos_centred=float(centred[head]),
                             centred_maps_left_out=int(left_out[head]), most_similar_head=closest[head]))
    return pd.DataFrame(rows)


def check_readable(model: nn.Module, img_size: int) -> None:
    """Fail fast (UnsupportedModelError) unless one forward of one image shows a site with two or more heads."""
    sites = find_attention(model, torch.zeros(1, 3, img_size, img_size))
    if all(captured.maps.shape[1] < 2 for captured in sites.values()):
        raise UnsupportedModelError(f"every softmax attention of {type(model).__name__} has a single head "
                                    f"({', '.join(sites)}): head similarity compares the heads of a block")


# ------------------------------------------------------------------------------------------- models and data


def load_images(spec: str, img_size: int, num_images: int, data_dir: Optional[str] = None) -> torch.Tensor:
    """`num_images` validation images of a data spec (a fixed random choice), as (n, 3, img_size, img_size)."""
    kind, root = parse_spec(spec, data_dir)
    if kind == "imagefolder":
        dataset = subset(image_folder(root, img_size, train=False), num_images)
    else:
        images, labels = load_fashion_mnist(root, False) if kind == "fashion_mnist" else load_digits_split(False)
        keep = list(subset(range(len(images)), num_images))  # choose first: resizing all 10k images is slow
        dataset = ArrayDataset(images[keep], labels[keep], img_size)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def random_baseline(model_name: str, images: torch.Tensor, seeds: Sequence[int], batch_size: int,
                    computed: Optional[dict[int, pd.DataFrame]] = None) -> pd.DataFrame:
    """Mean and std over seeds of each head's similarities with random weights (same architecture); `computed`
    holds seeds' similarities already at hand (the model itself, when its weights are random: seed 0)."""
    computed = computed or {}
    frames = [computed[seed] if seed in computed else
              head_similarity(load_for_command(model_name, "random", seed=seed)[0], images, batch_size)
              for seed in seeds]
    stats = pd.concat(frames).groupby(["block", "head"])[list(METRICS)].agg(["mean", "std"])
    stats.columns = [f"baseline_{metric.removeprefix('max_cos_')}_{stat}" for metric, stat in stats.columns]
    return stats.reset_index()


def model_label(model_name: str) -> str:
    """File-name friendly name: a config file's stem, else the name."""
    return Path(model_name).stem if is_config_file(model_name) else model_name


def model_similarity(model_name: str, weights: str = "auto", data: str = "fashion_mnist", num_images: int = 64,
        batch_size: int = 16, seeds: Sequence[int] = (0, 1, 2), img_size: Optional[int] = None,
        data_dir: Optional[str] = None) -> pd.DataFrame:
    """Head similarities of one model on real images, with the random-init baseline over `seeds`."""
    model, used = load_for_command(model_name, weights, random_fallback=True)
    images = load_images(data, img_size or model_img_size(model), num_images, data_dir)
    df = head_similarity(model, images, batch_size)
    computed = {0: df.copy()} if used == "random" else {}  # load_for_command draws random weights with seed 0
    df.insert(0, "model", model_label(model_name))
    df["weights"] = used
    df["data"] = data
    df["num_images"] = len(images)
    if seeds:
        df = df.merge(random_baseline(model_name, images, seeds, batch_size, computed), on=["block", "head"],
                      how="left")
        df["baseline_seeds"] = len(seeds)
    return df


# ------------------------------------------------------------------------------------------------- figure


def plot(frames: Sequence[pd.DataFrame]) -> Figure:
    """Fig. 4 style: heads x blocks heat maps, one column per model, raw (top) and centred (bottom)."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global figure to close

    width = sum(max(4.5, 2 + 0.35 * df.block.nunique()) for df in frames) + 1
    fig = Figure(figsize=(width, 6.5), layout="constrained")
    axes = fig.subplots(2, len(frames), squeeze=False)
    for col, df in enumerate(frames):
        for row, metric in enumerate(METRICS):
            ax = axes[row, col]
            grid = df.pivot(index="head", columns="block", values=metric)
            image = ax.imshow(grid.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
            baseline = f"baseline_{metric.removeprefix('max_cos_')}_mean"
            title = f"{df.model.iat[0]} ({df.weights.iat[0]})\n{metric}: mean {df[metric].mean():.3f}"
            if baseline in df:
                title += f" (random init {df[baseline].mean():.3f})"
            ax.set(xlabel="block", ylabel="head", xticks=range(grid.shape[1]), yticks=range(grid.shape[0]))
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="max cosine similarity to another head (< 0 shown as 0)")
    return fig


# ------------------------------------------------------------------------------------------------- claims


def mean_similarity(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model and weights: the mean over blocks and heads of each similarity and of its random-init
    baseline. `df`: per-head tables of `run`, stacked."""
    return df.groupby(["model", "weights"], as_index=False).agg(
        max_cos_raw=("max_cos_raw", "mean"), max_cos_centred=("max_cos_centred", "mean"),
        random_init_raw=("baseline_raw_mean", "mean"), random_init_centred=("baseline_centred_mean", "mean"))


def is_cga(models: pd.Series) -> pd.Series:
    """Which models have cascaded group attention: evit's, unless a config gave them MHSA."""
    return models.str.startswith("evit") & ~models.str.contains("mhsa")


def claims(df: pd.DataFrame) -> list[Claim]:
    """The paper's two claims of Fig. 4, judged on the trained models among per-head tables of `run`, stacked."""
    trained = df[df.weights != "random"]
    mhsa, cga = trained[~is_cga(trained.model)], trained[is_cga(trained.model)]
    found = [_alike_most_in_last_blocks(mhsa)] if not mhsa.empty else []
    return found + ([_cga_more_diverse(mhsa, cga)] if not (mhsa.empty or cga.empty) else [])


def _alike_most_in_last_blocks(mhsa: pd.DataFrame) -> Claim:
    per_block = mhsa.groupby(["model", "block"]).max_cos_centred.mean().dropna()
    first_last = {model: (s.iat[0], s.iat[-1]) for model, s in per_block.groupby("model")}
    higher = {model: last > first for model, (first, last) in first_last.items()}
    numbers = {f"{model} centred head similarity, {which} attention block": float(value)
               for model, pair in first_last.items() for which, value in zip(("first", "last"), pair)}
    return Claim("heads of trained MHSA models are similar, most in the last blocks.",
                 CONFIRMED if all(higher.values()) else INCONCLUSIVE,
                 f"the last attention block's centred similarity is above the first's {tally(higher)}.", numbers)


def _cga_more_diverse(mhsa: pd.DataFrame, cga: pd.DataFrame) -> Claim:
    # Architectures differ, so each trained model is compared with its own random init.
    means = mean_similarity(pd.concat([mhsa, cga])).set_index("model")
    change = (means.max_cos_centred - means.random_init_centred)[[*mhsa.model.unique(), *cga.model.unique()]]
    alike = all(change[model] > 0 for model in mhsa.model.unique())
    apart = all(change[model] < 0 for model in cga.model.unique())
    numbers = {name: float(value) for model in change.index for name, value in (
        (f"{model} centred head similarity, mean", means.at[model, "max_cos_centred"]),
        (f"{model} centred head similarity, change from random init", change[model]))}
    return Claim("cascaded group attention gives more diverse heads than MHSA.",
                 CONFIRMED if alike and apart else INCONCLUSIVE,
                 f"training changes the centred similarity by {names(f'{v:+.3f} for {m}' for m, v in change.items())} "
                 "relative to each model's random init (one training run each; confirmed means every MHSA model's "
                 "heads grew alike and every CGA model's grew apart).", numbers)


# ---------------------------------------------------------------------------------------------------- CLI


@dataclass
class Settings:
    """What `python -m analysis.head_similarity` measures: its fields are the command's flags."""
    models: list[str] = option([], "model name(s), comma separated: deit_tiny, swin_tiny, proxies (deit_proxy, ...), "
                               "evit_m0.., an evit config file, or any timm ViT / Swin; several give a side-by-side "
                               "figure", flags=("--models", "--model"), metavar="NAME[,NAME...]", required=True)
    weights: str = option("auto", "auto (proxy for proxies, else pretrained if reachable, else random) | random | "
                          "pretrained | proxy | quick-proxy (a proxy on a small training budget) | PATH to a checkpoint")
    data: str = option("fashion_mnist", "fashion_mnist | digits | imagefolder:PATH")
    data_dir: Optional[str] = option(None, "folder holding the data (None: the default location)")
    num_images: int = option(64, "validation images (a fixed random choice)")
    batch: int = option(16, "images per forward (results do not depend on it)")
    img_size: Optional[int] = option(None, "input size (None: the model's own)")
    seeds: list[int] = option([0, 1, 2], "seeds of the random-init baseline, comma separated ('' skips it; "
                              "default: 0,1,2)")
    threads: int = option(1, "torch CPU threads")
    out: Path = option(Path(DEFAULT_OUT), "output folder")

    def check(self) -> None:
        if not self.models:
            raise UserError("--model needs at least one model name")
        if self.num_images < 1 or self.batch < 1:
            raise UserError("--num-images and --batch must be at least 1")


def summarize(df: pd.DataFrame) -> str:
    """One line: a model's mean similarities over all heads, and the baseline's."""
    cols = [c for c in ("max_cos_raw", "max_cos_centred", "baseline_raw_mean", "baseline_centred_mean") if c in df]
    means = ", ".join(f"{c} {df[c].mean():.3f}" for c in cols)
    return f"{df.model.iat[0]} ({df.weights.iat[0]}, {df.num_images.iat[0]} images): mean {means}"


def left_out_summary(df: pd.DataFrame) -> str:
    """One line: how many of a model's maps the centred means left out (uniform maps have no cosine), and the
    sites left with no defined centred map at all (NaN)."""
    maps = df.maps_per_image * df.num_images
    left_out, total = int(df.centred_maps_left_out.sum()), int(maps[df.num_heads > 1].sum())
    empty = df.centred_maps_left_out.eq(maps).groupby(df.module, sort=False).all()
    line = f"{df.model.iat[0]}: {left_out} of {total} centred maps left out (uniform: no cosine)"
    return line + (f"; no map left, NaN: {', '.join(empty.index[empty])}" if empty.any() else "")


def run(settings: Settings) -> list[pd.DataFrame]:
    """Every model's head similarities (one CSV each) and the side-by-side figure, in settings.out."""
    settings.check()
    torch.set_num_threads(settings.threads)
    check_data(settings.data, settings.data_dir)  # data, then every model's maps, before any long work starts
    for name in settings.models:
        model, _ = load_for_command(name, "random")
        check_readable(model, settings.img_size or model_img_size(model))
    out = Path(settings.out)
    frames = []
    for name in settings.models:
        df = model_similarity(name, settings.weights, settings.data, settings.num_images, settings.batch,
                              settings.seeds, settings.img_size, settings.data_dir)
        print(f"{summarize(df)}  -> {write_csv(df, out / f'{df.model.iat[0]}.csv')}")
        print(left_out_summary(df))
        frames.append(df)
    figure = out / f"{'_vs_'.join(df.model.iat[0] for df in frames)}.png"
    print(f"figure -> {save_figure(plot(frames), figure)}")
    return frames


def main(argv: Optional[Sequence[str]] = None) -> list[pd.DataFrame]:
    return run_cli(lambda: run(parse_settings(Settings, argv, "python -m analysis.head_similarity",
                                              __doc__.split("\n\n")[0])))


if __name__ == "__main__":
    main()
