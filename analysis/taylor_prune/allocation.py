"""Findings -> builder: an EfficientViT config from a pruned model's kept ratios, at a preset's FLOPs or measured
throughput."""
from __future__ import annotations

import itertools
import math
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import pandas as pd
import torch

from evit import EfficientViTConfig, deploy, get_preset
from evit.timing import describe_machine, synchronizer, time_interleaved

MATCHES = ("flops", "throughput", "none")  # what the allocation is scaled to equal in the preset (--match)
THROUGHPUT_TOLERANCE = 0.05  # a throughput match within 5% of the preset's is met
WIDTH_SCALE_RANGE = (0.25, 4.0)  # the width scales searched
# Throughput (img/s) of each named config, timed side by side in one run, per round (in round i each ran once).
Measure = Callable[[dict[str, EfficientViTConfig]], dict[str, list[float]]]


@dataclass
class Allocation:
    """The derived config and what its match measured (the summary CSV's allocation_* columns)."""

    config: EfficientViTConfig
    summary: dict = field(default_factory=dict)


def allocation_config(blocks: pd.DataFrame, preset: str = "m0", match: str = "flops", **kwargs) -> EfficientViTConfig:
    """The config of `allocate` (its arguments), without what was measured."""
    return allocate(blocks, preset, match, **kwargs).config


def allocate(blocks: pd.DataFrame, preset: str = "m0", match: str = "flops", name: str = "taylor_allocation",
             mixer: str = "cga", attention_share: Optional[float] = None,
             measure: Optional[Measure] = None) -> Allocation:
    """An EfficientViT config from a pruned model's block table. The blocks are cut into as many consecutive
    parts as the preset has stages (early, middle, late); each part's means set that stage's
    - width: the preset's width times the kept input width (width_kept; 1 without that column),
    - Q/K dim per head: qk_ratio * width / heads, FFN ratio: ffn_ratio,
    - V: mixer 'cga' keeps V = width / heads (the cascade needs it; the paper's finding that V stays close to the
      input width agrees), mixer 'mhsa' takes v_ratio (MHSA allows any V dim).
    attention_share (the MHSA-proportion study's finding, Fig. 3): attention in that share of the blocks, evenly
    spaced and ending at the last one (analysis.mhsa_ratio.attention_blocks), the others mixer 'none'; None keeps
    attention in every block.
    The widths are then scaled together (`match`) until the config's BN-folded fvcore FLOPs at 224 px are closest
    to the preset's ('flops'), or its measured deploy-mode throughput is ('throughput', `_match_throughput`;
    `measure` times configs, default `DeployThroughput()`), for a comparison at equal cost; 'none' keeps scale 1.
    The summary holds the match, both FLOPs (unless 'none') and, for 'throughput', what was measured."""
    from analysis.mhsa_ratio import attention_blocks, staged_mixers

    if match not in MATCHES:
        raise ValueError(f"match must be one of {', '.join(MATCHES)}, got {match!r}")
    if mixer not in ("cga", "mhsa"):
        raise ValueError(f"mixer must be 'cga' or 'mhsa', got {mixer!r}")
    if attention_share is not None and not 0 <= attention_share <= 1:
        raise ValueError(f"attention_share must lie in [0, 1], got {attention_share}")
    base = get_preset(preset)
    mixers = mixer if attention_share is None else staged_mixers(
        base.depths, attention_blocks(sum(base.depths), attention_share), mixer)
    parts = _split(blocks.sort_values("block"), base.num_stages)

    def means(values: Callable[[pd.DataFrame], pd.Series], defaults: Sequence[float]) -> list[float]:
        out = []
        for part, default in zip(parts, defaults):
            value = values(part).mean() if len(part) else math.nan
            out.append(default if math.isnan(value) else float(value))
        return out

    column = lambda c: (lambda p: p[c] if c in p else pd.Series(dtype=float))  # noqa: E731
    ones = [1.0] * base.num_stages
    width = means(column("width_kept"), ones)
    qk, v, ffn = means(column("qk_ratio"), ones), means(column("v_ratio"), ones), means(column("ffn_ratio"),
                                                                                       base.mlp_ratio)

    def widths_at(scale: float) -> tuple[int, ...]:
        dims = []
        for i, (c, w, h) in enumerate(zip(base.embed_dims, width, base.num_heads)):
            # C / H a multiple of 4; stage 0 also divisible by the patch embedding's halvings
            step = math.lcm(4 * h, 2 ** (base.stem_depth - 1) if i == 0 else 1)
            dims.append(max(step, round(c * w * scale / step) * step))
        return tuple(dims)

    def build(dims: tuple[int, ...]) -> EfficientViTConfig:
        key_dims = tuple(max(4, round(r * c / h / 4) * 4) for r, c, h in zip(qk, dims, base.num_heads))
        v_ratio = tuple(max(0.25, round(r, 2)) for r in v) if mixer == "mhsa" else 1.0
        return base.replace(embed_dims=tuple(dims), key_dims=key_dims, v_ratio=v_ratio, mixers=mixers,
                            mlp_ratio=tuple(max(0.5, round(r * 4) / 4) for r in ffn), name=name)

    scaled = lambda scale: build(widths_at(scale))  # noqa: E731
    if match == "none":
        return Allocation(scaled(1.0), dict(allocation_match=match))
    measured: dict = {}
    if match == "flops":
        goal = _FLOPS(base)
        low, high = _bisect(lambda scale: _FLOPS(scaled(scale)) < goal)
        config = min((scaled(low), scaled(high)), key=lambda c: abs(_FLOPS(c) - goal))
    else:
        config, measured = _match_throughput(widths_at, build, base, measure or DeployThroughput(), preset)
    return Allocation(config, dict(allocation_match=match, allocation_flops_m=_FLOPS(config) / 1e6,
                                   preset_flops_m=_FLOPS(base) / 1e6, **measured))


def _bisect(too_small: Callable[[float], bool], steps: int = 10) -> tuple[float, float]:
    """The two ends, within WIDTH_SCALE_RANGE, of the width-scale interval where `too_small` turns false; it must
    turn false once as the scale grows (widths are rounded, so the last steps often land on the same config)."""
    low, high = WIDTH_SCALE_RANGE
    for _ in range(steps):
        mid = (low * high) ** 0.5
        low, high = (mid, high) if too_small(mid) else (low, mid)
    return low, high


def _match_throughput(widths_at: Callable[[float], tuple[int, ...]],
                      build: Callable[[tuple[int, ...]], EfficientViTConfig], preset: EfficientViTConfig,
                      measure: Measure, preset_name: str, retimes: int = 3) -> tuple[EfficientViTConfig, dict]:
    """The config whose measured throughput is closest to the preset's, and the summary's throughput columns.
    Throughput falls as the widths grow, so the width scale is bisected, each candidate timed beside the preset.
    Widths are multiples of 4 x heads, so the two configs the bisection ends between can both miss the preset by
    more than the tolerance (stage 0 of M0 is 64 or 80 wide); their stage-wise mixes (each stage's width from one
    or the other) lie between them, and then the stages after the first one the ends differ in are bisected alone,
    the earlier ones kept at the faster end's. One timing moves by a few percent on a loaded machine, so the ends
    of both bisections, the mixes and the other candidates timed within twice the tolerance are timed again side
    by side with the preset, `retimes` runs, and the one whose ratio is closest to 1 is taken. A ratio is the median over
    rounds of the candidate's throughput over the preset's in the same round: adjacent calls share the machine's
    load, so it moves less than the ratio of the medians. A note on stderr says why when the ratio misses the
    preset's throughput by more than THROUGHPUT_TOLERANCE."""
    timed: dict[tuple[int, ...], float] = {}  # widths -> throughput / the preset's, as the bisection timed it

    def ratio(rounds: dict[str, list[float]], name: str) -> float:
        return statistics.median(c / p for c, p in zip(rounds[name], rounds["preset"]))

    def faster(widths: tuple[int, ...]) -> bool:
        if widths not in timed:
            timed[widths] = ratio(measure({"candidate": build(widths), "preset": preset}), "candidate")
        return timed[widths] > 1

    low, high = _bisect(lambda scale: faster(widths_at(scale)))
    fast, slow = widths_at(low), widths_at(high)
    ends = [fast, slow]
    differ = [i for i, (a, b) in enumerate(zip(fast, slow)) if a != b]
    missed = all(abs(timed.get(w, math.inf) - 1) > THROUGHPUT_TOLERANCE for w in ends)  # (an end never timed)
    if differ and differ[0] < len(fast) - 1 and missed:
        # One width step in an early stage, at the highest resolution, can move the speed past the tolerance
        # (stage 0 of M0 is 64 or 80 wide): keep the fast end's widths up to that stage and scale the later ones
        # alone, in finer steps of the whole model's time.
        first = differ[0] + 1

        def later(scale: float) -> tuple[int, ...]:
            return fast[:first] + widths_at(scale)[first:]
        ends += [later(scale) for scale in _bisect(lambda scale: faster(later(scale)))]
    near = sorted((w for w in timed if abs(timed[w] - 1) <= 2 * THROUGHPUT_TOLERANCE),
                  key=lambda w: abs(timed[w] - 1))
    finalists = list(dict.fromkeys([*ends, *itertools.product(*zip(fast, slow)), *near]))
    named = {f"candidate{i}": widths for i, widths in enumerate(finalists)}
    runs = [measure({**{k: build(w) for k, w in named.items()}, "preset": preset}) for _ in range(retimes)]
    rounds = {k: [v for run in runs for v in run[k]] for k in [*named, "preset"]}  # the runs' rounds pooled
    ratios = {named[k]: ratio(rounds, k) for k in named}
    best = min(named, key=lambda k: abs(ratios[named[k]] - 1))
    if abs(ratios[named[best]] - 1) > THROUGHPUT_TOLERANCE:
        why = _why_missed(ratios, low, high)
        print(f"note: throughput match to evit_{preset_name} missed by more than {THROUGHPUT_TOLERANCE:.0%} "
              f"({ratios[named[best]]:.3f} of its throughput): {why}", file=sys.stderr)
    return build(named[best]), dict(allocation_throughput=statistics.median(rounds[best]),
                                    preset_throughput=statistics.median(rounds["preset"]),
                                    allocation_throughput_ratio=ratios[named[best]])


def _why_missed(ratios: dict[tuple[int, ...], float], low: float, high: float) -> str:
    """Why no config re-timed at `ratios` (widths -> throughput / the preset's) lies within the tolerance, the
    bisection having ended between width scales `low` and `high`."""
    if low == WIDTH_SCALE_RANGE[0]:  # the bisection never moved that end
        return f"it is slower down to width scale {WIDTH_SCALE_RANGE[0]:g}"
    if high == WIDTH_SCALE_RANGE[1]:
        return f"it is faster up to width scale {WIDTH_SCALE_RANGE[1]:g}"
    faster, slower = [r for r in ratios.values() if r > 1], [r for r in ratios.values() if r < 1]
    if not faster or not slower:
        return "the final timing puts all the bisection's candidates on one side of it (a loaded machine?)"
    return (f"no config between the nearest either side or their stage-wise mixes (widths are multiples of 4 x "
            f"heads) runs closer: the nearest run at {min(faster):.3f} and {max(slower):.3f} of its throughput")


@dataclass
class DeployThroughput:
    """A `Measure`: configs' throughput in deploy mode, as `evit.deploy`'s traced path runs them (BN folded,
    channels-last, torch.jit.trace + freeze; under autocast on CUDA, as the benchmarks' GPU method), random
    weights, `batch` images of `img_size` px a call on `device`, on torch's CPU threads. The configs timed together
    are warmed up `warmup_s` each, then alternate call by call for `calls` calls each (so they share the
    machine's load); a call's throughput = batch / its time. Deployed models are kept, so a config timed again is
    not traced again."""

    device: str = "cpu"
    batch: int = 16
    img_size: int = 224
    warmup_s: float = 0.2
    calls: int = 15
    deployed: dict = field(default_factory=dict, init=False, repr=False)  # config -> its deployed model

    def __call__(self, configs: dict[str, EfficientViTConfig]) -> dict[str, list[float]]:
        x = torch.randn(self.batch, 3, self.img_size, self.img_size, device=self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        runs = {name: self._runner(config, x) for name, config in configs.items()}
        timings = time_interleaved(runs, self.batch, self.warmup_s, 0.0, self.calls, synchronizer(self.device))
        return {name: [1000 * self.batch / ms for ms in timings[name].window_ms] for name in configs}

    def _runner(self, config: EfficientViTConfig, x: torch.Tensor) -> Callable[[], object]:
        from evit.builder.efficientvit import EfficientViT

        if repr(config) not in self.deployed:
            model = EfficientViT(config.replace(img_size=self.img_size)).to(self.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings
                self.deployed[repr(config)] = deploy(model, x, backend="trace", amp=self.device == "cuda")
        model = self.deployed[repr(config)]

        def run() -> object:
            with torch.inference_mode():
                return model(x)
        return run

    def fields(self) -> dict:
        """The summary's columns saying where and how it timed."""
        threads = torch.get_num_threads()
        return dict(allocation_device=self.device, allocation_hardware=describe_machine(self.device, threads),
                    allocation_batch=self.batch, allocation_threads=threads)


def _split(df: pd.DataFrame, parts: int) -> list[pd.DataFrame]:
    """`parts` consecutive chunks of the rows, as equal as possible (a row repeats when there are fewer rows)."""
    bounds = [round(i * len(df) / parts) for i in range(parts + 1)]
    return [df.iloc[min(bounds[i], len(df) - 1):max(bounds[i + 1], bounds[i] + 1)] for i in range(parts)]


def _flops(config: EfficientViTConfig) -> float:
    from evit import fuse
    from evit.builder.efficientvit import EfficientViT
    from evit.builder.summary import count_flops

    return count_flops(fuse(EfficientViT(config.replace(img_size=224)).eval()), 224)


def _memoized(fn: Callable[[EfficientViTConfig], float]) -> Callable[[EfficientViTConfig], float]:
    """`fn` computed once per distinct config (nearby scales round to the same widths)."""
    seen: dict[str, float] = {}

    def call(config: EfficientViTConfig) -> float:
        if repr(config) not in seen:
            seen[repr(config)] = fn(config)
        return seen[repr(config)]
    return call


_FLOPS = _memoized(_flops)  # a config's FLOPs, counted once a process (fvcore takes ~2 s for M0)
