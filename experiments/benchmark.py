"""Throughput and latency of evit against its peers, measured the way the paper does.

The official method: random weights, BatchNorm folded, eval mode, `torch.jit.trace`, a warm-up, then a timed
loop; throughput = batch / mean iteration time. GPU: batch 2048 under autocast; CPU: batch 16 on one thread.
Beside it: batch-1 latency, peak memory and ONNX Runtime throughput of the same folded model, each the median
of `--repeats` timed windows (min and max kept).

    python -m experiments.benchmark --models evit_m0,efficientvit_m0,mobilenetv3_large_100 --device cpu --quick
    python -m experiments.benchmark --fast-path --with-compile   # evit.deploy vs timm's port and ONNX Runtime
    python -m experiments.benchmark --levers                     # evit.deploy's levers one at a time (M0)
    python -m experiments.benchmark --models deit_proxy --weights pruned.pth   # a pruned model beside its unpruned form
"""
from __future__ import annotations

import contextlib
import copy
import io
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch
import torch.nn as nn

import evit
from evit.builder.config import PAPER
from evit.builder.fast_path import Compiled, for_inductor, trace
from evit.builder.io import save_figure, write_csv
from evit.builder.summary import count_flops, count_params
from evit.claims import MET, NOT_MET, Claim
from evit.cli import UserError, option, parse_settings, run_cli
from evit.models import check_model, create_model, model_img_size
from evit.zoo import check_weights, load_model, weights_kwargs
from evit.timing import (Timing, describe_machine, peak_memory_mb, synchronizer, time_callable,
                                time_interleaved)

DEFAULT_MODELS = (
    [f"evit_m{i}" for i in range(6)] + [f"efficientvit_m{i}" for i in range(6)]
    + ["mobilenetv3_large_100", "mobilenetv3_small_100", "efficientnet_b0", "deit_tiny_patch16_224",
       "levit_128s", "mobilevit_xxs"]
)
BACKENDS = ("eager", "trace", "compile", "onnxruntime")
ONNX_VARIANT = "onnxruntime (evit folded export)"  # the reference row of the fast-path and lever tables
# The paper's M0 on CPU, PyTorch and ONNX Runtime (docs/paper.md; its V100 throughputs: evit.builder.config.PAPER).
PAPER_CPU_M0 = {"trace": 228.4, "onnxruntime": 340.1}
# The paper's main batch per device (GPU under AMP, CPU on one thread); the fast-path targets are set at it.
MAIN_BATCH = {"cpu": 16, "cuda": 2048}
# The fast path's targets: evit.deploy's throughput over timm eager's at the device's main batch.
FAST_PATH_TARGET = {"cpu": 1.5, "cuda": 1.3}
DEPLOY_VARIANT = "evit.deploy (default)"  # the fast path's row of the fast-path table: backend 'auto'
# The same row in tables made before evit.deploy chose its path by timing (compile was the default then).
EARLIER_DEPLOY_VARIANT = "evit.deploy (compile)"


def deploy_variant(backend: str) -> str:
    """The fast-path table's name for evit.deploy with `backend`."""
    return DEPLOY_VARIANT if backend == "auto" else f"evit.deploy ({backend})"


def device_stem(device: str) -> str:
    """The results file stem: 'cpu', or 'cuda_' + the GPU's model ('NVIDIA H100 80GB HBM3' -> 'cuda_h100')."""
    if device != "cuda":
        return device
    name = torch.cuda.get_device_name()
    return "cuda_" + next((t for t in re.split(r"[\s-]+", name) if re.fullmatch(r"[A-Za-z]*\d+[A-Za-z]*", t)),
                          name.split()[-1]).lower()


def fold_batchnorm(model: nn.Module, example: Optional[torch.Tensor] = None) -> tuple[nn.Module, bool]:
    """The official method folds BN. evit and timm's EfficientViT port carry `fuse()` methods; other models
    go through torch.fx's conv-bn folding when they trace (and, given an `example` input, the folded graph gives
    the model's outputs on it), and run unfolded otherwise (reported)."""
    if any(callable(getattr(m, "fuse", None)) for m in model.modules() if m is not model):
        return evit.fuse(model), True
    try:
        from torch.fx.experimental.optimization import fuse as fx_fuse

        folded = fx_fuse(model)
        if example is not None:
            # FX traces Python branches on an argument once, with the argument a placeholder: `if mask is not None`
            # is taken even when the call passes None (a pruned model's split attention), and the graph is wrong.
            # (A failing FX graph prints its own traceback before raising: kept off the command's output.)
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                if not torch.allclose(folded(example), model(example), rtol=1e-4, atol=1e-5):
                    return model, False
        return folded, True
    except Exception:  # noqa: BLE001 - FX cannot trace some models; they are measured unfolded
        return model, False


def _runner(model: nn.Module, backend: str, x: torch.Tensor, amp: bool) -> Callable[[], object]:
    """A no-argument callable running one forward with `backend`."""
    if backend == "onnxruntime":
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = f"{tmp}/model.onnx"
            # The TorchScript exporter cannot export timm's fused attention (SDPA): export the same math unfused.
            fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
            for m in fused:
                m.fused_attn = False
            try:
                torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"])
            finally:
                for m in fused:
                    m.fused_attn = True
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {"x": x.cpu().numpy()}
        return lambda: session.run(None, feed)
    if backend == "trace":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.jit.freeze(trace(model, x, amp))
    elif backend == "compile":  # the inductor settings of evit.deploy, no module rewrites
        model = Compiled(model, amp=amp)

    def run() -> object:
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=amp):
            return model(x)

    return run


def paper_reference(model_name: str, device: str, backend: str) -> tuple[Optional[float], str]:
    """The paper's throughput for this model where it has one, with the hardware it was measured on."""
    if not model_name.startswith(("evit_m", "efficientvit_m")):
        return None, ""
    preset = model_name.split("_")[-1]
    if device == "cuda":
        return PAPER[preset]["v100_img_s"], "paper: V100, batch 2048 (different hardware)"
    if preset == "m0" and backend in PAPER_CPU_M0:
        return PAPER_CPU_M0[backend], "paper: CPU, batch 16, 1 thread (different hardware)"
    return None, ""


def benchmark_model(name: str, device: str = "cpu", batches: tuple[int, ...] = (16, 1),
                    backends: tuple[str, ...] = ("trace", "onnxruntime"), img_size: int = 224,
                    warmup_s: float = 5.0, seconds: float = 10.0, repeats: int = 3,
                    model: Optional[nn.Module] = None) -> list[dict]:
    """All rows (one per batch size and backend) for one model: `model` under the name `name` when given (no
    paper reference then: it is not the paper's model), else `name` built with random weights."""
    unfolded = (create_model(name, pretrained=False) if model is None else model).eval().to(device)
    params_m = count_params(unfolded) / 1e6
    model, folded = fold_batchnorm(unfolded, torch.randn(1, 3, img_size, img_size, device=device))
    flops_m = count_flops(model.cpu(), img_size) / 1e6
    model = model.to(device)
    amp = device == "cuda"
    sync = synchronizer(device)
    rows = []
    for backend in backends:
        if backend == "onnxruntime" and device == "cuda":
            continue  # the CPU build of onnxruntime is what we pin
        for batch in batches:
            x = torch.randn(batch, 3, img_size, img_size, device=device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                # An fx-folded graph has timm's fused attention baked in, which the ONNX exporter cannot take;
                # ONNX Runtime folds BatchNorm itself, so it gets the module as built.
                exported = unfolded if backend == "onnxruntime" and isinstance(model, torch.fx.GraphModule) else model
                timing = time_callable(_runner(exported, backend, x, amp), batch, warmup_s, seconds, repeats, sync)
            except Exception as e:  # noqa: BLE001 - one backend failing on one model must not stop the table
                print(f"  {name} {backend} batch {batch}: failed ({type(e).__name__}: {str(e)[:120]})")
                continue
            paper, paper_hw = paper_reference(name, device, backend) if model is None else (None, "")
            rows.append(dict(
                model=name, device=device, backend=backend, batch=batch, threads=torch.get_num_threads(),
                amp=amp, bn_folded=folded, throughput=timing.throughput, throughput_min=timing.throughput_min,
                throughput_max=timing.throughput_max, latency_ms=timing.latency_ms,
                peak_mem_mb=peak_memory_mb(device), params_m=params_m, flops_m=flops_m,
                paper_throughput=paper, paper_hardware=paper_hw,
                ratio_to_paper=timing.throughput / paper if paper and batch == batches[0] else None,
            ))
    return rows


def randomize_batchnorm_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters: at timm's init (mean 0, var 1, weight 0 on some
    residual branches) outputs are tiny and a difference check against them says little."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
                bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
    return model


def fast_path_table(presets: tuple[str, ...] = tuple(f"m{i}" for i in range(6)), batch: int = 16,
                    img_size: int = 224, warmup_s: float = 5.0, seconds: float = 10.0, repeats: int = 3,
                    with_compile: bool = False, deploy_backends: tuple[str, ...] = evit.DEPLOY_BACKENDS,
                    device: str = "cpu", amp: Optional[bool] = None, cuda_graphs: bool = False,
                    on_preset: Optional[Callable[[pd.DataFrame], None]] = None) -> pd.DataFrame:
    """evit's deploy path against timm's port given the same weights: throughput ratios to timm eager, and
    the largest output difference to timm's float32 outputs (must stay <= 1e-4 without AMP; BatchNorm randomized
    so that outputs are O(1)). `deploy_backends`: 'auto' (evit.deploy's default, row DEPLOY_VARIANT, with the
    candidate it chose in `deploy_choice`) and the backends forced; `("trace",)` skips compiling (about a minute per
    preset and compiled path on CPU).
    `amp` (default: on CUDA, as the paper measures GPUs) runs every variant under autocast; ONNX Runtime (its
    CPU build, float32) is timed on CPU without AMP only. `cuda_graphs` (CUDA only) adds evit.deploy replayed
    as CUDA graphs. `on_preset` gets the table so far after each preset (to save it: a run stopped midway keeps
    the presets it finished)."""
    import timm

    amp = device == "cuda" if amp is None else amp
    if cuda_graphs and device != "cuda":
        raise ValueError(f"cuda_graphs=True needs device='cuda', not '{device}'")
    sync = synchronizer(device)
    rows = []
    for preset in presets:
        reference = randomize_batchnorm_(timm.create_model(f"efficientvit_{preset}").eval()).to(device)
        ours = timm.create_model(f"evit_{preset}").eval().to(device)
        ours.load_state_dict(evit.from_timm(reference.state_dict()))
        x = torch.randn(batch, 3, img_size, img_size, device=device)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        deployed = {deploy_variant(b): evit.deploy(ours, x, backend=b, amp=amp) for b in deploy_backends}
        choices = {name: fast.deploy_choice.name for name, fast in deployed.items() if hasattr(fast, "deploy_choice")}
        if cuda_graphs:
            deployed["evit.deploy (compile + CUDA graphs)"] = evit.deploy(ours, x, backend="compile", amp=amp,
                                                                           cuda_graphs=True)
        with torch.inference_mode():
            expected = reference(x)
            diffs = {name: float((fast(x_cl).float() - expected).abs().max()) for name, fast in deployed.items()}
        variants = {
            "timm eager": _runner(reference, "eager", x, amp),
            "timm BN-folded + trace (official)": _runner(fold_batchnorm(reference)[0], "trace", x, amp),
            **{name: (lambda fast=fast: fast(x_cl)) for name, fast in deployed.items()},
        }
        if device == "cpu" and not amp:
            variants[ONNX_VARIANT] = _runner(evit.fuse(ours), "onnxruntime", x, False)
        if with_compile:
            variants["timm torch.compile"] = _runner(reference, "compile", x, amp)
        timings = time_interleaved(variants, batch, warmup_s, seconds, repeats, sync)
        base, largest_output = timings["timm eager"].throughput, float(expected.abs().max())
        rows += [dict(row, device=device, amp=amp, ratio_vs_timm_eager=row["throughput"] / base,
                      max_abs_diff_vs_timm=diffs.get(row["variant"]), max_abs_output_timm=largest_output,
                      deploy_choice=choices.get(row["variant"]))
                 for row in _variant_rows(f"evit_{preset}", batch, timings)]
        if on_preset:
            on_preset(pd.DataFrame(rows))
    return pd.DataFrame(rows)


def _variant_rows(model: str, batch: int, timings: dict[str, Timing]) -> list[dict]:
    """One row per timed variant, with its throughput relative to ONNX Runtime timed in the same windows (NaN
    where ONNX Runtime was not timed)."""
    onnx = timings[ONNX_VARIANT].throughput if ONNX_VARIANT in timings else float("nan")
    return [dict(model=model, variant=variant, batch=batch, threads=torch.get_num_threads(),
                 throughput=t.throughput, throughput_min=t.throughput_min, throughput_max=t.throughput_max,
                 ratio_vs_onnxruntime=t.throughput / onnx) for variant, t in timings.items()]


def lever_table(preset: str = "m0", batch: int = 16, img_size: int = 224, warmup_s: float = 5.0,
                seconds: float = 10.0, repeats: int = 3) -> pd.DataFrame:
    """The deploy levers added one at a time to a fused, channels-last evit preset under torch.compile, timed
    interleaved beside timm eager and ONNX Runtime on the same folded model. Each step's `gain` is its
    throughput over the last kept step; `kept` says whether `evit.deploy` uses it. CPU only."""
    import timm

    model = randomize_batchnorm_(timm.create_model(f"evit_{preset}").eval())
    fused_cl = evit.fuse(model).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, img_size, img_size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    frozen_option = torch.compile(copy.deepcopy(fused_cl), dynamic=False, options={"freezing": True})

    def option_only() -> torch.Tensor:
        with torch.inference_mode():
            return frozen_option(x_cl)

    steps = [  # (variant, kept, for_inductor arguments (None: no rewrites), inductor settings)
        ("freezing only as a compile option (weights stay graph inputs)", False, None, None),
        ("+ freezing while dynamo traces (weights prepacked, fused epilogues)", True, None, {"freezing": True}),
        ("+ C++ wrapper", True, None, Compiled.INDUCTOR_SETTINGS),
        ("+ 1x1 convs as channels-last matmuls", True, dict(depthwise_kernels=(), unfold_kernels=()),
         Compiled.INDUCTOR_SETTINGS),
        ("+ 3x3 depthwise convs as shifted sums", True, dict(unfold_kernels=()), Compiled.INDUCTOR_SETTINGS),
        ("+ 5x5/7x7 depthwise convs as reductions over unfolded windows", True, {}, Compiled.INDUCTOR_SETTINGS),
        ("5x5 depthwise convs as shifted sums instead", False, dict(depthwise_kernels=(3, 5), unfold_kernels=()),
         Compiled.INDUCTOR_SETTINGS),
        ("+ max-autotune GEMMs (inductor C++ templates)", False, {},
         {**Compiled.INDUCTOR_SETTINGS, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}),
    ]
    variants: dict[str, Callable[[], object]] = {"timm eager": _runner(timm.create_model(f"efficientvit_{preset}")
                                                                       .eval(), "eager", x, False)}
    compile_s = {}
    for variant, _, rewrites, settings in steps:
        start = time.perf_counter()
        if settings is None:
            option_only()
            variants[variant] = option_only
        else:
            rewritten = copy.deepcopy(fused_cl)
            compiled = Compiled(rewritten if rewrites is None else for_inductor(rewritten, **rewrites), settings)
            compiled(x_cl)
            variants[variant] = lambda compiled=compiled: compiled(x_cl)
        compile_s[variant] = time.perf_counter() - start
    variants[ONNX_VARIANT] = _runner(evit.fuse(model), "onnxruntime", x, False)
    timings = time_interleaved(variants, batch, warmup_s, seconds, repeats, lambda: None)
    kept = {variant: k for variant, k, _, _ in steps}
    rows, previous = [], None
    for row in _variant_rows(f"evit_{preset}", batch, timings):
        step = row["variant"] in kept
        rows.append(dict(row, gain=row["throughput"] / previous if step and previous else None,
                         kept=kept.get(row["variant"]), compile_s=compile_s.get(row["variant"])))
        if kept.get(row["variant"], False) or row["variant"] == steps[0][0]:
            previous = row["throughput"]
    return pd.DataFrame(rows)


def default_variant(table: pd.DataFrame) -> str:
    """The row of evit.deploy's default in a fast-path table (EARLIER_DEPLOY_VARIANT in tables made before)."""
    return DEPLOY_VARIANT if (table.variant == DEPLOY_VARIANT).any() else EARLIER_DEPLOY_VARIANT


def fast_path_claims(table: pd.DataFrame, device: str) -> list[Claim]:
    """The fast-path target, judged on a `fast_path_table` timed on `device` ('cpu', 'cuda_h100'); none unless it
    has evit.deploy's default rows at the device's main batch, where the target is set."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    ratio = table[table.variant == default_variant(table)].ratio_vs_timm_eager
    if ratio.empty or table.batch.iat[0] != MAIN_BATCH[kind]:
        return []
    target = FAST_PATH_TARGET[kind]
    return [Claim(f"evit.deploy reaches {target}x timm eager's throughput on every preset ({device}, batch "
                  f"{MAIN_BATCH[kind]}).", MET if (ratio >= target).all() else NOT_MET,
                  f"evit.deploy's throughput over timm eager's is {ratio.min():.2f}x at the lowest and "
                  f"{ratio.max():.2f}x at the highest, over {len(ratio)} preset(s).",
                  {f"evit.deploy / timm eager throughput ({device}), lowest": float(ratio.min()),
                   f"evit.deploy / timm eager throughput ({device}), highest": float(ratio.max())})]


def plot(df: pd.DataFrame, path: Path, accuracy: Optional[pd.Series] = None) -> Path:
    """Throughput (main batch, first backend) against params and FLOPs, and accuracy where known."""
    import matplotlib.pyplot as plt

    main_rows = df[(df.batch == df.batch.max()) & (df.backend == df.backend.iloc[0])]
    panels = [("params_m", "params (M)"), ("flops_m", "FLOPs (M)")]
    if accuracy is not None:
        main_rows = main_rows.assign(accuracy=main_rows.model.map(accuracy))
        if main_rows.accuracy.notna().any():
            panels.append(("accuracy", "accuracy (%)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (column, label) in zip(axes, panels):
        for family, marker in (("evit_", "o"), ("efficientvit_", "s"), ("", "^")):
            rows = main_rows[main_rows.model.str.startswith(family)] if family else main_rows[
                ~main_rows.model.str.startswith(("evit_", "efficientvit_"))]
            ax.scatter(rows[column], rows.throughput, marker=marker, label=family.rstrip("_") or "peers")
            for r in rows.itertuples():
                ax.annotate(r.model, (getattr(r, column), r.throughput), fontsize=6)
        ax.set_xlabel(label)
        ax.set_ylabel("images / s")
        ax.grid(alpha=0.3)
    axes[0].legend()
    first = main_rows.iloc[0]
    fig.suptitle(f"{first.device}, batch {first.batch}, {first.backend}, {first.threads} thread(s)")
    save_figure(fig, path)
    plt.close(fig)
    return path


@dataclass
class Settings:
    """What `python -m experiments.benchmark` times: its fields are the command's flags."""
    models: list[str] = option(list(DEFAULT_MODELS), "model names, comma-separated (default: evit M0-M5, timm's "
                               "efficientvit_m0-m5 and six peers)")
    device: str = option("cpu", "where the models run", choices=["cpu", "cuda"])
    backends: Optional[list[str]] = option(None, f"comma-separated, from {', '.join(BACKENDS)} (None: "
                                                 f"trace,onnxruntime on CPU, trace on CUDA)")
    batch: Optional[int] = option(None, "main batch (None: 16 on CPU, 2048 on CUDA)")
    threads: int = option(1, "CPU threads (the paper uses 1)")
    img_size: Optional[int] = option(None, "input size (None: 224, or with --weights the model's own)")
    repeats: int = option(3, "timed windows per measurement")
    seconds: float = option(10.0, "length of one timed window")
    warmup: float = option(5.0, "warm-up seconds")
    quick: bool = option(False, "about 3 s of timing per model and setting")
    accuracy_csv: Optional[Path] = option(None, "CSV with columns model and accuracy (or val_acc, as "
                                                "results/family/family.csv) to add an accuracy panel")
    fast_path: bool = option(False, "compare evit.deploy with timm's port (eager, official trace, ONNX Runtime) "
                             "for the evit presets among --models (all six by default) and print the ratios")
    with_compile: bool = option(False, "add torch.compile of timm's port to --fast-path")
    deploy_backends: list[str] = option(list(evit.DEPLOY_BACKENDS), "evit.deploy backends of --fast-path, "
                                        "comma-separated: auto (the default, its choice named), compile, trace")
    cuda_graphs: bool = option(False, "add evit.deploy replayed as CUDA graphs to --fast-path (CUDA only; small "
                               "batches)")
    levers: bool = option(False, "add evit.deploy's levers one at a time on the first evit preset among --models "
                          "(M0 by default), beside timm eager and ONNX Runtime; writes levers_<device>.csv")
    weights: Optional[str] = option(None, "a checkpoint of the one model --models names, e.g. a pruned model of "
                                          "analysis.taylor_prune --save-model: timed beside that model unpruned "
                                          "(random weights, the recorded creation kwargs), every backend of the "
                                          "table (ONNX export included)")
    out: Path = option(Path("runs/benchmark"), "output folder")

    def check(self) -> None:
        if self.levers and self.device != "cpu":
            raise UserError("--levers measures the CPU inference path (ONNX Runtime's CPU build); use --device cpu")
        if self.cuda_graphs and (self.device != "cuda" or not self.fast_path):
            raise UserError("--cuda-graphs adds a --fast-path variant on the GPU; use it with --fast-path --device "
                            "cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda asked but no CUDA GPU is visible to torch; use --device cpu")
        unknown = [b for b in self.backends or () if b not in BACKENDS]
        if unknown:
            raise UserError(f"unknown backend(s) {', '.join(unknown)}; valid: {', '.join(BACKENDS)}")
        unknown = [b for b in self.deploy_backends if b not in evit.DEPLOY_BACKENDS] or not self.deploy_backends
        if unknown:
            raise UserError(f"--deploy-backends must name at least one of {', '.join(evit.DEPLOY_BACKENDS)}; got "
                            f"{','.join(self.deploy_backends)}")
        for model in self.models:
            check_model(model)
        if self.weights is not None:
            if self.fast_path or self.levers or len(self.models) != 1:
                raise UserError(f"--weights times one model beside its unpruned form: pass one --models (got "
                                f"{len(self.models)}) and neither --fast-path nor --levers")
            check_weights(self.models[0], self.weights)


def run(settings: Settings) -> pd.DataFrame:
    """Time what `settings` asks (peers, --fast-path or --levers) and write its table (and figure) into
    settings.out."""
    settings.check()
    backends = tuple(settings.backends or (("trace", "onnxruntime") if settings.device == "cpu" else ("trace",)))
    warmup, seconds, repeats = (1.0, 1.0, 3) if settings.quick else (settings.warmup, settings.seconds,
                                                                      settings.repeats)
    out = Path(settings.out)
    torch.set_num_threads(settings.threads)
    default_batch = MAIN_BATCH[settings.device]
    main_batch = settings.batch or default_batch
    machine = describe_machine(settings.device, settings.threads)
    img_size = settings.img_size or 224
    print(f"machine: {machine}")

    if settings.levers:
        preset = next((m.removeprefix("evit_") for m in settings.models if m.startswith("evit_m")), "m0")
        df = lever_table(preset, main_batch, img_size, warmup, seconds, repeats)
        write_csv(df.assign(machine=machine).round(4), out / f"levers_{settings.device}.csv")
        print(df[["variant", "throughput", "gain", "ratio_vs_onnxruntime", "kept", "compile_s"]].to_string(
            index=False, float_format=lambda v: f"{v:.3g}"))
        return df
    stem = device_stem(settings.device)
    if settings.fast_path:
        presets = tuple(m.removeprefix("evit_") for m in settings.models if m.startswith("evit_m"))
        # the device's main batch (the targets) is fast_path_<device>.csv; others, such as batch 1, beside it
        batch_suffix = "" if main_batch == default_batch else f"_batch{main_batch}"
        timing_columns = ["throughput", "throughput_min", "throughput_max", "ratio_vs_timm_eager",
                          "ratio_vs_onnxruntime"]

        def save(table: pd.DataFrame) -> None:
            write_csv(table.assign(machine=machine).round({c: 4 for c in timing_columns}),
                      out / f"fast_path_{stem}{batch_suffix}.csv")

        df = fast_path_table(presets or tuple(f"m{i}" for i in range(6)), main_batch, img_size,
                             warmup, seconds, repeats, settings.with_compile, tuple(settings.deploy_backends),
                             device=settings.device,
                             cuda_graphs=settings.cuda_graphs, on_preset=save).assign(machine=machine)
        print(df[["model", "variant", "throughput", "ratio_vs_timm_eager", "ratio_vs_onnxruntime",
                  "max_abs_diff_vs_timm", "deploy_choice"]].to_string(
            index=False, float_format=lambda v: f"{v:.3g}"))
        return df

    from tqdm import tqdm

    models: dict[str, Optional[nn.Module]] = dict.fromkeys(settings.models)  # None: built with random weights
    if settings.weights is not None:
        name = settings.models[0]
        weighted = load_model(name, settings.weights)
        models = {name: create_model(name, **weights_kwargs(name, settings.weights)),
                  f"{name} ({settings.weights})": weighted}
        img_size = settings.img_size or model_img_size(weighted)
    rows = []
    for name, model in tqdm(models.items(), desc="benchmark", unit="model"):
        rows += benchmark_model(name, settings.device, (main_batch, 1), backends, img_size, warmup, seconds,
                                repeats, model)
        if rows:  # saved after each model: a run stopped midway keeps the models it finished
            write_csv(pd.DataFrame(rows).assign(machine=machine).round(3), out / f"{stem}.csv")
    df = pd.DataFrame(rows).assign(machine=machine)
    if df.empty:
        raise UserError("no model could be measured")
    accuracy = None
    if settings.accuracy_csv and Path(settings.accuracy_csv).is_file():  # ours (family: val_acc) or the user's
        known = pd.read_csv(settings.accuracy_csv).set_index("model")
        accuracy = known["accuracy" if "accuracy" in known else "val_acc"]
    plot(df, out / f"{stem}.png", accuracy)
    show = df[["model", "backend", "batch", "throughput", "throughput_min", "throughput_max", "latency_ms",
               "ratio_to_paper"]]
    print(show.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    print(f"wrote {out / (stem + '.csv')} and {out / (stem + '.png')}")
    return df


def main(argv: Optional[list[str]] = None) -> pd.DataFrame:
    return run_cli(lambda: run(parse_settings(Settings, argv, "python -m experiments.benchmark", __doc__)))


if __name__ == "__main__":
    main()
