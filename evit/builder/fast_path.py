"""The fastest inference path for an evit model on the machine it runs on (docs/benchmarks.md, performance).

`deploy(model, example)` = `fuse` (BN folded, attention biases cached), then by default ('auto') the fastest of the
candidates in DEPLOY_CANDIDATES, timed here on `example` (interleaved, a few seconds) and kept per machine, model
and input shape in a JSON cache so that a later deploy builds only the winner:

* 'compile': channels-last; 1x1 convs rewritten as channels-last matmuls, 3x3 depthwise convs as sums of shifted
  slices and 5x5/7x7 ones as reductions over unfolded windows, then torch.compile (inductor) with weight
  freezing and the C++ wrapper ('compile, no rewrites': the same without the rewrites);
* 'trace': channels-last, torch.jit.trace + freeze, ready at once ('trace, NCHW': contiguous memory).

Each lever was kept for a gain measured on one CPU and costs on another (an Intel Xeon against an AMD EPYC):
timing them where they run is what makes the default never slower than the best of them.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache_keys import key_of
from .efficientvit import fuse
from .io import write_json
from .machine import describe_machine, synchronizer, time_interleaved

__all__ = ["DEPLOY_BACKENDS", "DEPLOY_CANDIDATES", "Compiled", "DeployChoice", "DepthwiseTaps", "DepthwiseUnfold",
           "PointwiseLinear", "deploy", "for_inductor", "trace"]

DEPLOY_BACKENDS = ("auto", "compile", "trace")


@dataclass(frozen=True)
class Candidate:
    """One inference path: a backend, the memory format, and whether convs are rewritten for inductor."""
    backend: str          # 'compile' | 'trace'
    channels_last: bool
    rewrites: bool        # for_inductor's conv rewrites (compile only)


# What backend='auto' times, by name. 'compile' candidates need a C++ compiler (on CPU) and about a minute each to
# build; the choice is cached, so that is paid once per machine, model and input shape.
DEPLOY_CANDIDATES: dict[str, Candidate] = {
    "compile": Candidate("compile", True, True),
    "compile, no rewrites": Candidate("compile", True, False),
    "trace": Candidate("trace", True, False),
    "trace, NCHW": Candidate("trace", False, False),
}


@dataclass(frozen=True)
class DeployChoice:
    """What backend='auto' chose: the candidate's name, each candidate's median ms per call as timed here, whether
    the choice was read from the cache (then `ms` is that earlier timing's), and the machine it was timed on."""
    name: str
    ms: dict[str, float]
    cached: bool
    machine: str

    def describe(self) -> str:
        timed = ", ".join(f"{n} {ms:.2f}" for n, ms in sorted(self.ms.items(), key=lambda kv: kv[1]))
        return (f"evit.deploy: {self.name} ({'chosen earlier, cached' if self.cached else 'chosen now'}; ms per "
                f"call: {timed}) on {self.machine}")


class PointwiseLinear(nn.Module):
    """A 1x1, stride-1 conv computed as a matmul over the channel axis of a channels-last tensor.

    Same outputs as the conv. Under inductor with freezing it becomes a prepacked GEMM whose bias and following
    elementwise ops (activation, residual add) fuse into generated code (docs/benchmarks.md, performance: the levers).
    """

    @staticmethod
    def fits(conv: nn.Conv2d) -> bool:
        """Whether `conv` can be computed this way (for_inductor rewrites exactly these)."""
        return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 and conv.padding == (0, 0)

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not self.fits(conv):
            raise ValueError(f"PointwiseLinear needs a 1x1, stride-1, unpadded, ungrouped conv, got {conv}")
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B*H*W, C) is free on a channels-last tensor; so is the way back. Flattened here, not
        # left to F.linear: on a channel slice (a head's split) inductor would otherwise emit a bmm of tiny
        # per-row matmuls instead of one GEMM
        B, C, H, W = x.shape
        out = F.linear(x.permute(0, 2, 3, 1).reshape(B * H * W, C), self.weight, self.bias)
        return out.view(B, H, W, -1).permute(0, 3, 1, 2)


class DepthwiseRewrite(nn.Module):
    """What the depthwise rewrites share: the convs they take, and the conv's geometry and bias."""

    @staticmethod
    def fits(conv: nn.Conv2d) -> bool:
        """Whether `conv` can be computed this way (for_inductor rewrites exactly these)."""
        return conv.groups == conv.in_channels == conv.out_channels and conv.dilation == (1, 1) \
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not self.fits(conv):
            raise ValueError(f"{type(self).__name__} needs a depthwise, undilated, zero-padded conv, got {conv}")
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.bias = nn.Parameter(bias, requires_grad=False)


class DepthwiseTaps(DepthwiseRewrite):
    """A depthwise conv computed as a sum over its k*k taps of shifted input slices times per-channel weights.

    Same outputs as the conv. Inductor fuses the taps, bias and residual into one vectorised loop over
    channels-last memory instead of a oneDNN call per conv (docs/benchmarks.md, performance: the levers).
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv)
        # (taps, channels): each tap's weights contiguous, so they load as one vector
        self.taps = nn.Parameter(conv.weight.detach().flatten(1).T.contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        channels, height, width = x.shape[1:]
        out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
        x = F.pad(x, (pw, pw, ph, ph))
        out = self.bias.view(1, channels, 1, 1)
        for i in range(kh):
            for j in range(kw):
                shifted = x[:, :, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]
                out = out + shifted * self.taps[i * kw + j].view(1, channels, 1, 1)
        return out


class DepthwiseUnfold(DepthwiseRewrite):
    """A depthwise conv computed as a sum over each output position's k*k input window, the windows taken as an
    unfolded view of the channels-last input.

    Same outputs as the conv. Inductor makes it one reduction loop from a few graph nodes: unlike
    `DepthwiseTaps` its compile time does not grow with k*k, and unlike oneDNN it has no per-call overhead (about
    50 us here, which the 24 small 5x5 query convs of M0 pay at every forward; docs/benchmarks.md, performance).
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv)
        self.weight = nn.Parameter(conv.weight.detach()[:, 0].clone(), requires_grad=False)  # (C, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        x = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # (B, H, W, C): free on channels-last
        windows = x.unfold(1, kh, sh).unfold(2, kw, sw)  # (B, H', W', C, kh, kw), a view
        return ((windows * self.weight).sum((-2, -1)) + self.bias).permute(0, 3, 1, 2)


def for_inductor(model: nn.Module, pointwise: bool = True, depthwise_kernels: tuple[int, ...] = (3,),
                 unfold_kernels: tuple[int, ...] = (5, 7)) -> nn.Module:
    """Rewrite (in place) convs as ops that inductor fuses into its own code: every 1x1, stride-1, ungrouped
    conv as a `PointwiseLinear` (if `pointwise`), every depthwise conv with a square kernel in
    `depthwise_kernels` as `DepthwiseTaps` and one in `unfold_kernels` as `DepthwiseUnfold`. The defaults are
    evit.deploy's, each lever measured by `python -m experiments.benchmark --levers`: taps win on 3x3 kernels,
    the unfolded reduction on larger ones (5x5 taps: no faster, 2x longer to compile)."""
    for name, child in model.named_children():
        if not isinstance(child, nn.Conv2d):
            for_inductor(child, pointwise, depthwise_kernels, unfold_kernels)
        elif pointwise and PointwiseLinear.fits(child):
            model.add_module(name, PointwiseLinear(child))
        elif DepthwiseRewrite.fits(child) and child.kernel_size[0] == child.kernel_size[1]:
            if child.kernel_size[0] in depthwise_kernels:
                model.add_module(name, DepthwiseTaps(child))
            elif child.kernel_size[0] in unfold_kernels:
                model.add_module(name, DepthwiseUnfold(child))
    return model


class Compiled(nn.Module):
    """A torch.compile'd model that always runs under inference_mode with the inductor settings of `deploy`, and
    under autocast if `amp`. `cuda_graphs` (CUDA only): replay each forward as one CUDA graph (inductor's
    cudagraph trees), which removes the per-kernel launch cost that dominates small batches on a GPU."""

    # Freezing must be on while dynamo traces, not only as a compile option: only then are the parameters
    # static, folded into constants and the convs/GEMMs prepacked with fused epilogues. The C++ wrapper calls
    # the few hundred kernels of a forward without Python in between.
    INDUCTOR_SETTINGS = {"freezing": True, "cpp_wrapper": True}
    # On a GPU at the paper's batch (2048) launches are amortised, and the C++ wrapper would cost a CUDA C++ build.
    CUDA_INDUCTOR_SETTINGS = {"freezing": True}

    def __init__(self, model: nn.Module, settings: Optional[dict[str, Any]] = None, amp: bool = False,
                 cuda_graphs: bool = False):
        super().__init__()
        on_cuda = any(p.is_cuda for p in model.parameters())
        if cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device (CUDA graphs do not exist on CPU)")
        self.settings = dict(settings if settings is not None else (
            self.CUDA_INDUCTOR_SETTINGS if on_cuda else self.INDUCTOR_SETTINGS))
        if cuda_graphs:
            self.settings["triton.cudagraphs"] = True
        self.amp, self.cuda_graphs = amp, cuda_graphs
        self.compiled = torch.compile(model, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config

        # patched on every call so that a recompile (new batch size or memory format) gets the same settings
        with torch.inference_mode(), config.patch(self.settings), torch.autocast(x.device.type, enabled=self.amp):
            out = self.compiled(x)
        # a graph replay writes its output into the same memory each time: the caller gets its own copy
        return out.clone() if self.cuda_graphs else out


@torch.no_grad()
def deploy(model: nn.Module, example_input: torch.Tensor, channels_last: bool = True,
           backend: str = "auto", amp: bool = False, cuda_graphs: bool = False, verbose: bool = False,
           cache: Optional[Path] = None, candidates: Optional[dict[str, Candidate]] = None,
           timing_s: float = 3.0) -> nn.Module:
    """The fastest inference path: `fuse`, then

    * backend 'auto' (default): the fastest of `candidates` (default DEPLOY_CANDIDATES: compile and trace, with and
      without the conv rewrites or channels-last), each built on `example_input` and timed on it here, calls of
      every candidate interleaved for about `timing_s` seconds in all (`time_interleaved`, windows of one call), the
      median call compared. The choice and the
      timings are kept in `cache` (a JSON file; default $EVIT_CACHE/deploy.json, else ~/.cache/evit/deploy.json)
      under the machine (CPU or GPU model, threads, torch), the fused model's structure, the input's shape and
      `amp`: a later deploy of the same builds the winner only. The result's `deploy_choice` (a DeployChoice)
      says what was chosen and why; `verbose` prints it;
    * backend 'compile': channels-last (if `channels_last`), 1x1 convs as channels-last matmuls, 3x3 depthwise
      convs as shifted sums and 5x5/7x7 ones as reductions over unfolded windows (`for_inductor`), torch.compile
      (inductor) with weight freezing and the C++ wrapper, compiled here on `example_input` (~1 min on CPU; needs a
      C++ compiler, else falls back to 'trace' with a warning);
    * backend 'trace': channels-last (if `channels_last`), torch.jit.trace + freeze, ready at once.

    On a GPU the model runs where `model` and `example_input` are, compiled with freezing only
    (`Compiled.CUDA_INDUCTOR_SETTINGS`). `amp`: run under torch.autocast (float16 on CUDA, bfloat16 on CPU), as the
    paper's GPU measurement does; outputs are then in that precision, no longer within 1e-4 of float32.
    `cuda_graphs` (compile on CUDA; with 'auto', only compile candidates are tried): each forward replays one CUDA
    graph, for small-batch latency.

    `channels_last` applies to a forced backend ('auto' times both memory formats where its candidates say so).
    The result is specialised to `example_input`'s spatial size (the window layout is fixed); other batch
    sizes work (compile recompiles once per new size). Channels-last inputs run fastest on channels-last paths;
    NCHW inputs give the same outputs.
    """
    if backend not in DEPLOY_BACKENDS:
        raise ValueError(f"unknown deploy backend '{backend}'; valid: {', '.join(DEPLOY_BACKENDS)}")
    if cuda_graphs and (backend == "trace" or example_input.device.type != "cuda"):
        raise ValueError(f"cuda_graphs=True needs backend='compile' (or 'auto') and a CUDA example_input, not "
                         f"backend '{backend}' on {example_input.device.type}")
    fused = fuse(model)
    if backend != "auto":
        return _build(fused, example_input, Candidate(backend, channels_last, backend == "compile"), amp,
                      cuda_graphs)
    chosen, built = _choose(fused, example_input, amp, cuda_graphs, cache, candidates or DEPLOY_CANDIDATES,
                            timing_s)
    if verbose:
        print(chosen.describe())
    built.deploy_choice = chosen
    return built


def _build(fused: nn.Module, example_input: torch.Tensor, candidate: Candidate, amp: bool, cuda_graphs: bool
           ) -> nn.Module:
    """`candidate`'s inference path for the fused model (a copy: the candidates of 'auto' share one fused model)."""
    backend = candidate.backend
    if backend == "compile" and not have_cxx_compiler():
        warnings.warn("evit.deploy: no C++ compiler found for torch.compile; using backend='trace'")
        backend = "trace"
    model = copy.deepcopy(fused)
    if candidate.channels_last:
        model = model.to(memory_format=torch.channels_last)
        example_input = example_input.contiguous(memory_format=torch.channels_last)
    if backend == "trace":
        return torch.jit.freeze(trace(model, example_input, amp))
    compiled = Compiled(for_inductor(model) if candidate.rewrites else model, amp=amp, cuda_graphs=cuda_graphs)
    compiled(example_input)  # compile now, not on the user's first call
    return compiled


def default_cache() -> Path:
    """Where deploy choices are kept: per user, not per project (a machine's choice serves every checkout)."""
    return Path(os.environ.get("EVIT_CACHE") or Path.home() / ".cache" / "evit") / "deploy.json"


def _cache_key(fused: nn.Module, example_input: torch.Tensor, amp: bool, cuda_graphs: bool,
               names: list[str]) -> tuple[str, str]:
    """(machine, key): what a timing depends on, the machine apart so that the cache file can say where."""
    machine = describe_machine(example_input.device.type, torch.get_num_threads())
    structure = repr(fused) + repr([(n, tuple(t.shape)) for n, t in fused.state_dict().items()])
    return machine, key_of([machine, structure, tuple(example_input.shape), str(example_input.dtype), amp,
                            cuda_graphs, names])


def _choose(fused: nn.Module, example_input: torch.Tensor, amp: bool, cuda_graphs: bool, cache: Optional[Path],
            candidates: dict[str, Candidate], timing_s: float) -> tuple[DeployChoice, nn.Module]:
    """The fastest candidate, read from the cache or timed now, and its built path."""
    names = [n for n, c in candidates.items()
             if not (cuda_graphs and c.backend != "compile")
             and not (c.backend == "compile" and not have_cxx_compiler())]
    if not names:
        raise ValueError(f"no deploy candidate of {', '.join(candidates)} runs here (compile needs a C++ compiler; "
                         f"cuda_graphs needs a compile candidate)")
    path = Path(cache or default_cache())
    machine, key = _cache_key(fused, example_input, amp, cuda_graphs, names)
    table = json.loads(path.read_text()) if path.is_file() else {}
    if key in table and table[key]["name"] in candidates:
        entry = table[key]
        return (DeployChoice(entry["name"], entry["ms"], True, machine),
                _build(fused, example_input, candidates[entry["name"]], amp, cuda_graphs))
    built = {n: _build(fused, example_input, candidates[n], amp, cuda_graphs) for n in names}
    inputs = {n: example_input.contiguous(memory_format=torch.channels_last) if candidates[n].channels_last
              else example_input.contiguous() for n in names}
    calls = {n: (lambda n=n: built[n](inputs[n])) for n in names}
    sync = synchronizer(example_input.device.type)
    with torch.inference_mode():
        # Windows of one call each, every candidate in turn (so that each sees the same load), rounds enough to
        # fill about `timing_s` after one round to see how long a round takes (its first calls warm up).
        round_ms = sum(t.latency_ms for t in time_interleaved(calls, 1, 0.0, 0.0, 1, sync).values())
        rounds = max(5, round(1000 * timing_s / max(round_ms, 1e-3)))
        ms = {n: t.latency_ms for n, t in time_interleaved(calls, 1, 0.0, 0.0, rounds, sync).items()}
    name = min(ms, key=ms.get)
    write_json(path, {**table, key: dict(name=name, ms=ms, machine=machine)})
    return DeployChoice(name, ms, False, machine), built[name]


def trace(model: nn.Module, example_input: torch.Tensor, amp: bool = False) -> torch.jit.ScriptModule:
    """torch.jit.trace, under autocast if `amp`: the traced graph then holds the casts and runs in reduced
    precision without an autocast context."""
    # no autocast weight cache while tracing: a cached cast would be recorded as a constant (PyTorch's advice)
    with torch.no_grad(), torch.autocast(example_input.device.type, enabled=amp, cache_enabled=False):
        # no check_trace: it traces again and compares graphs, three times the trace's cost; what the deploy path
        # must keep, the outputs, is checked by the tests against the eager model
        return torch.jit.trace(model, example_input, check_trace=False)


def have_cxx_compiler() -> bool:
    """Whether inductor's C++ backend can build kernels here."""
    from torch._inductor import config

    return any(shutil.which(name) for name in (config.cpp.cxx[-1], "g++", "c++") if name)
