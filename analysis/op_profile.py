"""Memory-access profile per operator (paper Fig. 2): where the runtime goes, and how much of it is memory-bound.

    python -m analysis.op_profile --model deit_tiny
    python -m analysis.op_profile --models deit_tiny,swin_tiny,evit_m0 --device cuda --batch 64

Time: torch.profiler over warmed-up eval/no_grad iterations; each aten op's self time (CPU, or GPU kernel time
on CUDA) is attributed to the *dispatch-level* op call that ran it (aten::mkldnn_convolution -> aten::convolution,
aten::copy_ inside aten::clone -> aten::clone), so every op below has a FLOP and byte count.
Work: one forward under a TorchDispatchMode records, per dispatch-level op call, the bytes read and written
(input + output tensors; views move nothing) and the FLOPs (torch.utils.flop_counter for matmul/conv/attention,
a per-element cost for the rest, see OP_CLASSES).
Roofline, per call signature: time and work are both keyed by (op, input tensor shapes), so a depthwise conv and
a dense 1x1 conv, both aten::convolution, are judged apart. A signature is memory-bound when its arithmetic
intensity (FLOP/byte) is below the device's ridge point, peak FLOP/s / peak bandwidth, both measured by a short
micro-benchmark (a large matmul and a large copy) unless given with --peak-gflops / --peak-gbs. A profiled
signature the work count did not see falls back to its op's aggregate intensity: `matched_share` says how much of
the counted ops' time did not (the `<model>_<device>_shapes.csv` table has one row per signature). Per op,
`memory_bound_time_ms` is its time in memory-bound signatures and the op is memory-bound when that is most of its
time; the model's memory-bound share is the time in memory-bound signatures over all time.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from evit.builder.io import save_figure, write_csv, write_json
from evit.claims import CONFIRMED, REFUTED, Claim, names
from evit.cli import UserError, option, parse_settings, run_cli
from evit.models import check_model, create_model, is_config_file, model_img_size, skeleton
from evit.timing import describe_load, describe_machine, other_load, synchronizer
from evit.zoo import check_weights, load_for_command

# The one table of operator classes. Each class: (memory-bound in the paper's sense, FLOPs per output element
# for ops torch.utils.flop_counter does not count, aten op names). Unknown ops land in "other" and are listed.
OP_CLASSES: dict[str, tuple[bool, float, tuple[str, ...]]] = {
    "matmul": (False, 0, ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "einsum",
                          "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                          "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                          "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
                          "_efficient_attention_forward", "mkldnn_linear", "_addmm_activation")),
    "conv": (False, 0, ("conv1d", "conv2d", "convolution", "_convolution", "mkldnn_convolution",
                        "cudnn_convolution", "_convolution_mode", "conv_depthwise2d", "_conv_depthwise2d",
                        "_mps_convolution", "slow_conv2d_forward", "_slow_conv2d_forward", "thnn_conv2d")),
    "data movement": (True, 0, (
        "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "contiguous", "clone", "copy_", "_to_copy",
        "to", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten", "cat", "stack", "split",
        "split_with_sizes", "chunk", "unbind", "slice", "select", "narrow", "index", "index_select", "gather",
        "roll", "pad", "constant_pad_nd", "reflection_pad2d", "unfold", "as_strided", "as_strided_", "repeat",
        "repeat_interleave", "reshape_as", "type_as", "upsample_bilinear2d", "upsample_nearest2d", "upsample_bicubic2d",
        "pixel_shuffle", "alias", "detach", "lift_fresh", "_reshape_alias", "view_as", "movedim", "im2col",
        "channel_shuffle", "zeros_like", "empty_like", "resize_", "fill_", "zero_", "zeros", "empty",
        "empty_strided", "new_zeros", "new_empty", "full", "ones", "arange", "masked_select", "item",
        "_local_scalar_dense")),
    "elementwise": (True, 1, ("add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "pow",
                              "sqrt", "rsqrt", "exp", "log", "abs", "sin", "cos", "addcmul", "addcdiv", "where",
                              "masked_fill", "masked_fill_", "lerp", "maximum", "minimum", "reciprocal", "floor_divide",
                              "remainder", "eq", "ne", "lt", "gt", "le", "ge", "bitwise_not", "logical_not",
                              "dropout", "feature_dropout")),
    "normalization": (True, 5, ("layer_norm", "native_layer_norm", "batch_norm", "native_batch_norm",
                                "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                                "_batch_norm_impl_index", "cudnn_batch_norm", "miopen_batch_norm", "group_norm",
                                "native_group_norm", "instance_norm", "rms_norm", "_fused_rms_norm")),
    "softmax": (True, 5, ("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax")),
    "activation": (True, 1, ("relu", "relu_", "gelu", "gelu_", "hardswish", "hardswish_", "silu", "silu_",
                             "sigmoid", "sigmoid_", "tanh", "tanh_", "hardsigmoid", "hardsigmoid_", "hardtanh",
                             "hardtanh_", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max",
                             "leaky_relu", "leaky_relu_", "elu", "mish", "erf", "threshold")),
    "pooling/reduction": (True, 1, ("mean", "sum", "amax", "max", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
                                    "avg_pool2d", "max_pool2d", "max_pool2d_with_indices", "mkldnn_adaptive_avg_pool2d",
                                    "adaptive_max_pool2d", "var_mean", "std", "var", "norm", "linalg_vector_norm",
                                    "argmax", "logsumexp")),
}
OTHER = "other"
CLASS_OF: dict[str, str] = {f"aten::{op}": cls for cls, (_, _, ops) in OP_CLASSES.items() for op in ops}
CLASS_ORDER = list(OP_CLASSES) + [OTHER]
DEVICES = ("cpu", "cuda")


# A call signature, the unit of the roofline verdict: (aten op, number of arguments in its schema, shapes of its
# tensor arguments in argument order). The arity says which of a profiler event's recorded inputs are arguments.
Shapes = tuple[tuple[int, ...], ...]
Call = tuple[str, int, Shapes]


class ProfileError(UserError, ValueError):
    """Bad profiling request (e.g. CUDA without a GPU); the message says what to do instead."""


def op_class(name: str) -> str:
    """Class of an aten op name ('aten::addmm' -> 'matmul'); unknown ops are 'other'."""
    return CLASS_OF.get(name, OTHER)


# --- work per op: FLOPs and bytes, by dispatch-level op ---------------------------------------------------------

def _nbytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


def _numel(tree) -> int:
    return sum(t.numel() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


def tensor_shapes(values: Iterable) -> Shapes:
    """The shapes of the arguments that are tensors of at least one dimension, in argument order: all that
    torch.profiler's input_shapes tells apart, as it records a scalar, None, a 0-dim tensor and a tensor list
    (aten::cat's inputs) alike as []."""
    return tuple(tuple(v.shape) for v in values if isinstance(v, torch.Tensor) and v.dim() > 0)


def recorded_shapes(input_shapes: Sequence) -> Shapes:
    """tensor_shapes of a profiler event's input_shapes; nested lists (tensor lists, where a torch version records
    them) are dropped as tensor_shapes drops them."""
    return tuple(tuple(s) for s in input_shapes if s and all(isinstance(d, int) for d in s))


def event_call(name: str, input_shapes: Sequence, arities: Iterable[int], known: Collection[Call]) -> Call:
    """The call signature of a profiler event, as WorkCounter keys it. TorchScript's interpreter records its whole
    stack as an op's inputs, the arguments last, so the inputs are cut to each arity WorkCounter saw the op with;
    when none gives a known signature, all recorded inputs are kept (and the event matches nothing)."""
    for arity in (n for n in arities if n <= len(input_shapes)):
        call = (name, arity, recorded_shapes(input_shapes[len(input_shapes) - arity:]))
        if call in known:
            return call
    return name, len(input_shapes), recorded_shapes(input_shapes)


def _aliases_input(func, args, out) -> bool:
    """Whether a non-mutating op returned only tensors sharing storage with its inputs."""
    if func._schema.is_mutable:
        return False
    storages = {t.untyped_storage().data_ptr() for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)}
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return bool(outs) and all(t.untyped_storage().data_ptr() in storages for t in outs)


class WorkCounter(TorchDispatchMode):
    """Per dispatch-level aten op call signature: calls, FLOPs and bytes read + written, over the ops run under
    this mode."""

    def __init__(self):
        super().__init__()
        self.work: dict[Call, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # call -> [calls, flops, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if func.overloadpacket in flop_registry:
            flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        elif "scaled_dot_product" in name:
            flops = attention_flops(*args[:3])
        else:
            flops = OP_CLASSES.get(op_class(name), (True, 0, ()))[1] * _numel(out)
        # A view returns an alias (aten::_unsafe_view too, though not marked as a view): no data moves.
        # Everything else reads its inputs and writes its outputs.
        moved = 0 if func.is_view or _aliases_input(func, args, out) else _nbytes((args, kwargs)) + _nbytes(out)
        # kwargs follow the positional args as in the schema, which is the order the profiler records them in
        entry = self.work[name, len(func._schema.arguments), tensor_shapes((*args, *kwargs.values()))]
        entry[0] += 1
        entry[1] += flops
        entry[2] += moved
        return out


def attention_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> int:
    """q @ k^T and attn @ v of scaled_dot_product_attention (2 FLOPs per MAC), for the variants that
    torch.utils.flop_counter does not cover (e.g. the CPU flash kernel); the softmax is not counted."""
    batch_heads, queries = query.shape[:-2].numel(), query.shape[-2]
    return 2 * batch_heads * queries * key.shape[-2] * (query.shape[-1] + value.shape[-1])


def count_work(fn: Callable[[], object]) -> dict[Call, list[float]]:
    """{(aten op, arity, input shapes): [calls, flops, bytes]} for one call of fn."""
    with torch.no_grad(), WorkCounter() as counter:
        fn()
    return dict(counter.work)


# --- time per op: torch.profiler, attributed to dispatch-level ops -------------------------------------------------

def quiet_kineto() -> None:
    """Keep the profiler's C++ backend (kineto) from logging to the terminal: on a machine without a GPU every
    profile printed `ERROR: ... gpuGetDeviceCount failed with code 35` and two `USDT: profiler_start/stop` lines
    between our own, which read as a failure. Profiling only the CPU does not stop them (we already did); kineto's
    own log level does. Level 6 is above all of kineto's levels (VERBOSE 0 .. ERROR 4, USDT 5), so it hides only
    kineto's lines: our errors are Python exceptions and torch's warnings go through another logger. Kineto reads
    the variable once, when the process first profiles, so it is set before each profile; a level the user set
    (e.g. KINETO_LOG_LEVEL=0 to debug the profiler) is kept."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def profile_times(fn: Callable[[], object], iters: int, device: str, known: Collection[Call],
                  trace: Optional[Path] = None) -> tuple[dict[Call, float], dict[Call, float]]:
    """(self time in ms per iteration, calls per iteration) per op call signature; an op's self time is summed
    onto its outermost ancestor among the dispatch-level ops (those of the `known` signatures, whose work
    WorkCounter measured), under that ancestor's signature."""
    arities: dict[str, set[int]] = defaultdict(set)  # dispatch-level op -> the arities of its overloads seen
    for op, arity, _ in known:
        arities[op].add(arity)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    quiet_kineto()
    sync = synchronizer(device)
    with torch.no_grad(), profile(activities=activities, record_shapes=True) as prof:
        for _ in range(iters):
            fn()
        sync()
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        tmp = trace.with_name(trace.name + ".tmp")
        prof.export_chrome_trace(str(tmp))
        tmp.replace(trace)
    times: dict[Call, float] = defaultdict(float)
    calls: dict[Call, float] = defaultdict(float)
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        owner, node = event, event.cpu_parent
        while node is not None:
            if node.name in arities:
                owner = node
            node = node.cpu_parent
        key = event_call(owner.name, owner.input_shapes, arities.get(owner.name, ()), known)
        if owner is event:
            calls[key] += 1 / iters
        self_us = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        times[key] += max(self_us, 0) / 1e3 / iters
    return dict(times), dict(calls)


# --- the device's roofline ---------------------------------------------------------------------------------------

def _best_seconds(fn: Callable[[], object], sync: Callable[[], None], seconds: float) -> float:
    fn()
    sync()
    best, start = math.inf, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_peaks(device: str = "cpu", seconds: float = 0.5) -> tuple[float, float]:
    """(peak GFLOP/s, peak GB/s) with the current thread count: the best of repeated fp32 matmuls and copies."""
    sync = synchronizer(device)
    n = 4096 if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    gflops = 2 * n ** 3 / _best_seconds(lambda: a @ b, sync, seconds) / 1e9
    src = torch.randn(64 * 2 ** 20 // 4, device=device)  # 64 MiB: far beyond any CPU cache
    dst = torch.empty_like(src)
    gbs = 2 * src.nbytes / _best_seconds(lambda: dst.copy_(src), sync, seconds) / 1e9
    return gflops, gbs


@dataclass
class Roofline:
    """The peaks a profile is judged by: the most this machine (CPU or GPU model, threads, torch) was seen to do,
    over this measurement and the earlier ones cached for it. A peak measured while another process shares the
    cores or the memory bus comes out low and would move the ridge; the best seen does not drop with it."""
    gflops: float
    gbs: float
    measured: tuple[float, float]  # this run's own measurement
    runs: int                      # measurements behind the peaks, this one included
    cache: Optional[Path]

    @property
    def ridge(self) -> float:
        return self.gflops / self.gbs

    @property
    def origin(self) -> str:
        return (f"the best of {self.runs} measurements on this machine (this run: {self.measured[0]:.1f} GFLOP/s, "
                f"{self.measured[1]:.1f} GB/s; cached in {self.cache})" if self.runs > 1 else "measured now")


def roofline_peaks(device: str = "cpu", cache: Optional[Path] = None, seconds: float = 0.5) -> Roofline:
    """`measure_peaks` now, combined with the peaks cached for this machine in `cache` (a JSON file of machine ->
    peaks; None: no cache), which it then updates."""
    measured = measure_peaks(device, seconds)
    machine = describe_machine(device, torch.get_num_threads())
    table = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    seen = table.get(machine, dict(gflops=0.0, gbs=0.0, runs=0))
    best = dict(gflops=max(seen["gflops"], measured[0]), gbs=max(seen["gbs"], measured[1]), runs=seen["runs"] + 1)
    if cache is not None:
        write_json(cache, {**table, machine: best})
    return Roofline(best["gflops"], best["gbs"], measured, best["runs"], cache)


def default_roofline_cache() -> Path:
    """Beside the trained proxies and the latency tables: peaks depend on the machine, not on a run."""
    from evit.zoo import cache_dir

    return cache_dir() / "roofline.json"


# --- the tables: per call signature, per op, per class ------------------------------------------------------------

def is_memory_bound(flops: float, moved: float, cls: str, ridge: float) -> bool:
    """Roofline verdict on some work of an op of class `cls`. Without bytes moved (a view, or a composite op's own
    dispatch overhead such as aten::linear's) the class decides."""
    return flops / moved < ridge if moved else OP_CLASSES.get(cls, (True,))[0]


def signature_table(work: dict[Call, list[float]], times: dict[Call, float], calls: dict[Call, float],
                    ridge: float) -> pd.DataFrame:
    """One row per (op, input shapes), profiled or counted. `matched`: WorkCounter counted this signature, so its
    own intensity judges it; a profiled signature it did not see is judged by its op's work over all signatures."""
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # op -> [flops, bytes]
    for (op, _, _), (_, flops, moved) in work.items():
        per_op[op][0] += flops
        per_op[op][1] += moved
    rows = []
    for key in sorted(set(times) | set(work)):
        op, _, shapes = key
        cls, matched = op_class(op), key in work
        flops, moved = work[key][1:] if matched else (0.0, 0.0)
        judged = (flops, moved) if matched else tuple(per_op.get(op, (0.0, 0.0)))
        rows.append(dict(op=op, shapes=str([list(s) for s in shapes]), op_class=cls, calls=calls.get(key, 0.0),
                         self_time_ms=times.get(key, 0.0), flops=flops, bytes=moved,
                         intensity=judged[0] / judged[1] if judged[1] else math.nan, matched=matched,
                         memory_bound=is_memory_bound(*judged, cls, ridge)))
    signatures = pd.DataFrame(rows)
    signatures["calls"] = signatures.calls.round(3)
    signatures["share"] = signatures.self_time_ms / signatures.self_time_ms.sum()
    return signatures.sort_values("self_time_ms", ascending=False, ignore_index=True)


def op_table(signatures: pd.DataFrame, ridge: float) -> pd.DataFrame:
    """One row per op: the sums over its signatures; memory-bound when most of its time is in memory-bound
    signatures (an op without measurable time: by its aggregate intensity)."""
    ops = signatures.assign(memory_bound_time_ms=signatures.self_time_ms.where(signatures.memory_bound, 0.0))
    ops = ops.groupby(["op", "op_class"], as_index=False)[
        ["calls", "self_time_ms", "share", "memory_bound_time_ms", "flops", "bytes"]].sum()
    ops["intensity"] = ops.flops / ops.bytes.where(ops.bytes > 0)
    aggregate = [is_memory_bound(f, b, c, ridge) for f, b, c in zip(ops.flops, ops.bytes, ops.op_class)]
    ops["memory_bound"] = np.where(ops.self_time_ms > 0, ops.memory_bound_time_ms > 0.5 * ops.self_time_ms, aggregate)
    ops = ops.sort_values("self_time_ms", ascending=False, ignore_index=True)
    return ops[["op", "op_class", "calls", "self_time_ms", "share", "memory_bound_time_ms", "flops", "bytes",
                "intensity", "memory_bound"]]


def class_table(ops: pd.DataFrame) -> pd.DataFrame:
    """One row per op class, in CLASS_ORDER; memory-bound when most of its time is in memory-bound signatures."""
    classes = ops.groupby("op_class", as_index=False).agg(
        self_time_ms=("self_time_ms", "sum"), share=("share", "sum"),
        memory_bound_time_ms=("memory_bound_time_ms", "sum"), flops=("flops", "sum"), bytes=("bytes", "sum"),
        ops=("op", "count"))
    classes["intensity"] = classes.flops / classes.bytes.where(classes.bytes > 0)
    classes["memory_bound"] = classes.memory_bound_time_ms > 0.5 * classes.self_time_ms
    classes["order"] = classes.op_class.map(CLASS_ORDER.index)
    return classes.sort_values("order", ignore_index=True).drop(columns="order")


# --- one model ---------------------------------------------------------------------------------------------------

@dataclass
class OpProfile:
    """The profile of one model: per-op, per-class and per-signature tables and the ridge point."""

    model: str
    device: str
    ops: pd.DataFrame
    classes: pd.DataFrame
    peak_gflops: float
    peak_gbs: float
    unknown_ops: list[str]
    signatures: pd.DataFrame

    @property
    def memory_bound_share(self) -> float:
        """Share of the time spent in memory-bound call signatures."""
        return float(self.ops.memory_bound_time_ms.sum() / self.time_ms)

    @property
    def matched_share(self) -> float:
        """Share of the time of the ops WorkCounter counted that is in signatures it counted, i.e. judged by their
        own intensity; the rest fell back to its op's aggregate intensity. Left out: ops it never saw (a composite
        op's own dispatch overhead: aten::linear, aten::conv2d), which have no work to match and go by their class."""
        sig = self.signatures
        counted = sig[sig.op.isin(sig.op[sig.matched])]
        return float(counted.self_time_ms.where(counted.matched, 0.0).sum() / counted.self_time_ms.sum())

    @property
    def time_ms(self) -> float:
        return float(self.ops.self_time_ms.sum())


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise ProfileError(f"unknown device '{device}'; valid: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ProfileError("--device cuda asked but torch sees no GPU (torch.cuda.is_available() is False); "
                           "use --device cpu")


def check_inputs(names: Sequence[str], device: str, fused: bool) -> None:
    """Fail at once on a bad device, an unknown model name, a bad config file or --fused for a model without
    fuse(): before the roofline is measured and the models before it are profiled."""
    check_device(device)
    for name in names:
        check_model(name)
        if fused:
            require_fuse(skeleton(name), name)


def require_fuse(model: nn.Module, label: str) -> None:
    if not hasattr(model, "fuse"):
        raise ProfileError(f"--fused needs a model with fuse() (evit models); {label} has none")


def profile_model(model: nn.Module | str, batch: int = 16, img_size: Optional[int] = None, iters: int = 10,
                  warmup: int = 3, device: str = "cpu", fused: bool = False,
                  peaks: Optional[tuple[float, float]] = None, trace: Optional[Path] = None,
                  example: Optional[torch.Tensor] = None, name: Optional[str] = None,
                  fused_attn: bool = False) -> OpProfile:
    """Profile a model (or a model name, built with random weights) in eval mode on a random batch.

    fused: evit deploy mode (BN folded, channels-last, traced and frozen), for models with `fuse()`.
    peaks: (GFLOP/s, GB/s) of the device; when not given, `roofline_peaks` with the machine's cache. example: the
    input (default: a random `batch` x 3 x img_size x img_size image batch, img_size from the model's default
    config).
    fused_attn: keep timm's fused attention (scaled_dot_product_attention). Off by default: q @ k^T, softmax
    and attn @ v then run as separate ops, as in the implementations the paper profiled.
    """
    check_device(device)
    label = name or (model if isinstance(model, str) else type(model).__name__)
    if isinstance(model, str):
        model = create_model(model, img_size)
    model = model.eval().to(device)
    for module in model.modules():
        if hasattr(module, "fused_attn"):  # timm's Attention, WindowAttention, ...
            module.fused_attn = fused_attn
    if example is None:
        size = img_size or model_img_size(model)
        example = torch.randn(batch, 3, size, size, device=device)
    if fused:
        require_fuse(model, label)
        import evit

        with torch.no_grad():
            model = evit.deploy(model, example, backend="trace")  # aten ops the profiler can attribute
    run = lambda: model(example)  # noqa: E731
    # TorchScript profiles the graph on its first run and optimizes it on the second: counting work in either
    # would count the profiler's and the optimizer's ops (thousands of aten::equal) instead of the model's.
    with torch.no_grad():
        for _ in range(max(warmup, 2) if fused else warmup):
            run()
    work = count_work(run)
    times, calls = profile_times(run, iters, device, work.keys(), trace)
    if peaks is None:
        roofline = roofline_peaks(device, default_roofline_cache())
        peaks = (roofline.gflops, roofline.gbs)
    gflops, gbs = peaks
    ridge = gflops / gbs  # FLOP per byte where the roofline turns from memory- to compute-bound
    signatures = signature_table(work, times, calls, ridge)
    ops = op_table(signatures, ridge)
    classes = class_table(ops)

    classes.insert(0, "model", label)
    classes.insert(1, "device", device)
    classes["fused_attn"] = fused_attn
    ops.insert(0, "model", label)
    signatures.insert(0, "model", label)
    unknown = sorted(ops.loc[ops.op_class == OTHER, "op"])
    return OpProfile(label, device, ops, classes, gflops, gbs, unknown, signatures)


# --- figure ------------------------------------------------------------------------------------------------------

def plot(profiles: Sequence[OpProfile]):
    """Fig. 2: one stacked bar of class shares per model; the time in memory-bound op calls hatched (per class, so
    a memory-bound batched matmul shows too), its total printed above the bar."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 1.3 * len(profiles) + 3), 4.5))
    ax = fig.subplots()
    colors = dict(zip(CLASS_ORDER, ("#4c72b0", "#55a868", "#c44e52", "#dd8452", "#8172b2", "#937860", "#da8bc3",
                                    "#ccb974", "#8c8c8c")))
    for x, prof in enumerate(profiles):
        classes = prof.classes.set_index("op_class")
        total = classes.self_time_ms.sum()
        bottom = 0.0
        for cls in CLASS_ORDER:
            if cls not in classes.index:
                continue
            memory = 100 * classes.at[cls, "memory_bound_time_ms"] / total
            compute = 100 * classes.at[cls, "share"] - memory
            label = cls if cls not in ax.get_legend_handles_labels()[1] else None
            for part, hatch in ((compute, None), (memory, "//")):
                if part > 0:
                    ax.bar(x, part, bottom=bottom, color=colors[cls], hatch=hatch, edgecolor="white", label=label)
                    bottom, label = bottom + part, None
        ax.text(x, 101, f"{100 * prof.memory_bound_share:.0f}%\nmemory-bound", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(profiles)), [p.model for p in profiles], rotation=15)
    ax.set_ylim(0, 118)
    ax.set_ylabel("share of runtime (%)")
    ax.set_title(f"runtime by operator class ({profiles[0].device}); hatched: time in memory-bound op calls",
                 fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


# --- the report: the memory-bound share and the paper's claim ----------------------------------------------------

# The paper's baselines for Fig. 2, and the share of their runtime we call large.
BASELINES = ("deit_tiny", "swin_tiny")
LARGE_SHARE = 0.25


def memory_bound_shares(classes: pd.DataFrame) -> pd.DataFrame:
    """One row per model, device and setting (eager or fused): the share of runtime of each op class and, as
    `memory-bound`, the share spent in memory-bound op calls. `classes`: class tables (`<model>_<device>_classes.csv`)
    stacked, with a `setting` column."""
    keys = ["model", "device", "setting"]
    classes = classes.assign(
        memory_bound=classes.memory_bound_time_ms / classes.groupby(keys).self_time_ms.transform("sum"))
    shares = classes.pivot_table(index=keys, columns="op_class", values="share", fill_value=0.0)
    shares["memory-bound"] = classes.groupby(keys).memory_bound.sum()
    return shares.reset_index().sort_values(["device", "setting", "model"])


def claims(shares: pd.DataFrame) -> list[Claim]:
    """The paper's claim of Fig. 2, judged on the eager baselines of `memory_bound_shares` (none without both)."""
    baselines = shares[(shares.setting == "eager") & shares.model.isin(BASELINES)]
    if baselines.model.nunique() < len(BASELINES):
        return []
    by_model = {f"{r.model} ({r.device})": float(r["memory-bound"]) for _, r in baselines.iterrows()}
    large = min(by_model.values()) >= LARGE_SHARE
    ridges = sorted({f"{r.device}: {r.ridge:.2f} FLOP/byte" for _, r in baselines.iterrows()
                     if "ridge" in r and pd.notna(r.ridge)})
    judged = f", judged with the ridge at {names(ridges)}" if ridges else ""
    return [Claim("memory-bound operators (reshape/copy, element-wise, normalization, softmax) take a large share "
                  "of DeiT-T's and Swin-T's runtime.", CONFIRMED if large else REFUTED,
                  f"the share of runtime in memory-bound op calls is "
                  f"{names(f'{100 * share:.0f}% for {model}' for model, share in by_model.items())} "
                  f"(large: at least {100 * LARGE_SHARE:.0f}%){judged}.",
                  {f"{model} memory-bound share": share for model, share in by_model.items()})]


def read_rooflines(folder: Path) -> pd.DataFrame:
    """The peaks each run in `folder` was judged by (roofline_<device>[_fused].json): device, setting, ridge."""
    rows = [dict(device=p.stem.split("_")[1], setting="fused" if p.stem.endswith("_fused") else "eager",
                 **{k: v for k, v in json.loads(p.read_text()).items() if k in ("gflops", "gbs", "ridge")})
            for p in sorted(Path(folder).glob("roofline_*.json"))]
    return pd.DataFrame(rows, columns=["device", "setting", "gflops", "gbs", "ridge"])


# --- CLI ---------------------------------------------------------------------------------------------------------

@dataclass
class Settings:
    """What `python -m analysis.op_profile` measures: its fields are the command's flags."""
    models: list[str] = option(["deit_tiny"], "model(s), comma-separated: deit_tiny, swin_tiny, evit_m0..evit_m5, "
                               "proxies, evit config files or any timm name (default: deit_tiny)", flags=("--models", "--model"))
    device: str = option("cpu", "where the model runs", choices=DEVICES)
    batch: int = option(16, "images per forward")
    img_size: Optional[int] = option(None, "input size (None: the model's own)")
    iters: int = option(10, "profiled iterations (after --warmup)")
    warmup: int = option(3, "warm-up iterations")
    threads: int = option(1, "CPU threads (the paper's CPU setting is 1)")
    fused: bool = option(False, "evit deploy mode: BN folded, traced and frozen")
    fused_attn: bool = option(False, "keep timm's fused attention (SDPA); off: q@k^T, softmax, @v as separate ops")
    weights: str = option("random", "random (the model as built: the profile depends on its widths, not its weights) "
                          "or a checkpoint PATH of the model, e.g. a pruned model of analysis.taylor_prune "
                          "--save-model, profiled at its pruned widths")
    peak_gflops: Optional[float] = option(None, "device peak GFLOP/s (None: measured)")
    peak_gbs: Optional[float] = option(None, "device bandwidth GB/s (None: measured)")
    trace: bool = option(False, "also write a Chrome trace per model (.json)")
    out: Path = option(Path("runs/op_profile"), "output folder")

    def check(self) -> None:
        if not self.models:
            raise ProfileError("--model needs at least one model name")
        if (self.peak_gflops is None) != (self.peak_gbs is None):
            raise ProfileError("give both --peak-gflops and --peak-gbs, or neither (then both are measured)")
        if self.batch < 1 or self.iters < 1:
            raise ProfileError("--batch and --iters must be at least 1")


def run(settings: Settings) -> list[OpProfile]:
    """Profile every model of `settings`, write its tables (and traces) and the figure into settings.out."""
    settings.check()
    check_inputs(settings.models, settings.device, settings.fused)
    for name in settings.models:
        check_weights(name, settings.weights)
    torch.set_num_threads(settings.threads)
    out = Path(settings.out)
    suffix = settings.device + ("_fused" if settings.fused else "")
    load = other_load()
    if describe_load(load):
        print(f"note: {describe_load(load)}; the peaks used are the best seen on this machine, the op times are "
              f"this run's", file=sys.stderr)
    if settings.peak_gflops:
        peaks, origin = (settings.peak_gflops, settings.peak_gbs), "given"
    else:
        roofline = roofline_peaks(settings.device, default_roofline_cache())
        peaks, origin = (roofline.gflops, roofline.gbs), roofline.origin
    print(f"roofline ({settings.device}, {settings.threads} thread(s)): {peaks[0]:.1f} GFLOP/s, {peaks[1]:.1f} GB/s, "
          f"ridge {peaks[0] / peaks[1]:.2f} FLOP/byte ({origin})")
    write_json(out / f"roofline_{suffix}.json", dict(gflops=peaks[0], gbs=peaks[1], ridge=peaks[0] / peaks[1],
                                                      origin=origin, other_load=load))
    profiles = []
    for name in settings.models:
        stem = Path(name).stem if is_config_file(name) else name
        trace = out / f"{stem}_{suffix}_trace.json" if settings.trace else None
        model = name if settings.weights == "random" else load_for_command(name, settings.weights)[0]
        prof = profile_model(model, settings.batch, settings.img_size, settings.iters, settings.warmup,
                             settings.device, settings.fused, peaks, trace, name=stem, fused_attn=settings.fused_attn)
        ops_csv = write_csv(prof.ops.round(6), out / f"{stem}_{suffix}.csv")
        write_csv(prof.classes.round(6), out / f"{stem}_{suffix}_classes.csv")
        write_csv(prof.signatures.round(6), out / f"{stem}_{suffix}_shapes.csv")
        print(f"{stem}: {prof.time_ms:.2f} ms/iter, memory-bound {100 * prof.memory_bound_share:.1f}%, "
              f"{100 * prof.matched_share:.1f}% of the counted ops' time matched per call signature  -> {ops_csv}")
        print(prof.classes[["op_class", "self_time_ms", "share", "memory_bound"]].to_string(
            index=False, float_format=lambda v: f"{v:.3f}"))
        if prof.unknown_ops:
            print(f"  ops not in OP_CLASSES (counted as other): {', '.join(prof.unknown_ops)}")
        profiles.append(prof)
    stem = "_vs_".join(p.model for p in profiles) if len(profiles) <= 3 else "comparison"
    print(f"figure -> {save_figure(plot(profiles), out / f'{stem}_{suffix}.png')}")
    return profiles


def main(argv: Optional[Sequence[str]] = None) -> list[OpProfile]:
    return run_cli(lambda: run(parse_settings(Settings, argv, "python -m analysis.op_profile", __doc__)))


if __name__ == "__main__":
    main()
