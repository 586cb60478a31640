"""Read every head's softmax attention maps out of any model, whatever its family, by intercepting softmax.

    with capture_attention(model) as capture:
        model(images)
        captured = capture.take()   # {module name: CapturedMaps(maps (M, heads, Nq, Nk), visible keys or None)}

One mechanism serves every family: a torch-function mode sees each ``softmax`` (``torch.softmax``,
``Tensor.softmax``, ``F.softmax``, ``nn.Softmax``) and each ``F.scaled_dot_product_attention`` call, and forward
hooks on every module say which module is running. A softmax over the last dim of a tensor of three or more dims
is an attention map, recorded under the innermost running module (``nn.Softmax`` itself skipped): the *site*.
SDPA never materializes its map, so the map is computed explicitly from its q, k, scale and mask (the call itself
still runs as it was, so the model's output is unchanged); no fused-attention switch is needed.

Layout rules, the only place a family shows through (docs/attention_maps.md lists what each family gives):
- four or more dims: (..., heads, Nq, Nk); leading dims (batch, windows folded into the batch as Swin does, or
  kept apart as Twins does, MobileViT's patch positions) are folded into M maps per forward;
- three dims: (M, Nq, Nk), one head per call, as in cascaded group attention (timm's ``efficientvit_m*``,
  evit's CGA), where each head is its own softmax: the calls of one forward are the heads, in call order.
- talking heads (CaiT, EfficientFormer-v2) mix heads before and after the softmax: the map read is the softmax
  output, i.e. after the pre-softmax mixing and before the post-softmax one.
- keys a query cannot see: -inf logits (or a False/-inf SDPA mask) and window masks passed to the attention
  module as its ``mask`` argument (Swin v1/v2: 0 visible, -100 hidden; windows batch-major) come back as
  ``visible`` so measures can use only the keys a query can actually see.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from evit.models import UnsupportedModelError

SOFTMAX_FUNCTIONS = (torch.softmax, torch.Tensor.softmax, F.softmax)
SDPA_FUNCTIONS = (F.scaled_dot_product_attention,)


class CapturedMaps(NamedTuple):
    maps: torch.Tensor  # (M, heads, Nq, Nk) softmax maps, M counting images x windows (or positions) per image
    visible: Optional[torch.Tensor]  # bool, broadcastable to maps: keys each query can see; None when all can


@dataclass(eq=False)
class AttentionSite:
    """One module that ran softmax attention, and the maps it recorded since the last `take()`."""

    name: str
    module: nn.Module
    maps: list[torch.Tensor] = field(default_factory=list)
    visible: list[Optional[torch.Tensor]] = field(default_factory=list)
    num_heads: int = 0  # known after the first take()

    def record(self, maps: torch.Tensor, visible: Optional[torch.Tensor]) -> None:
        """One softmax call: (..., Nq, Nk) maps and the keys visible to them (broadcastable, or None)."""
        if visible is not None:
            visible = visible.expand(maps.shape)
        if maps.dim() == 3:  # one head per call (cascaded group attention)
            maps, visible = maps.unsqueeze(1), None if visible is None else visible.unsqueeze(1)
        maps, visible = _as_4d(maps), None if visible is None else _as_4d(visible)
        if self.maps and (maps.shape[0], *maps.shape[2:]) != (self.maps[0].shape[0], *self.maps[0].shape[2:]):
            raise UnsupportedModelError(
                f"{self.name} ({type(self.module).__name__}) ran softmax attention twice in one forward with "
                f"different layouts ({tuple(self.maps[0].shape)} then {tuple(maps.shape)}): its heads cannot be read")
        self.maps.append(maps.detach())
        self.visible.append(visible)

    def take(self, window_mask: Optional[torch.Tensor] = None) -> CapturedMaps:
        """The maps of the last forward, heads concatenated in call order, and the keys each query could see."""
        if not self.maps:
            raise RuntimeError(f"{self.name} recorded no attention maps: run a forward inside capture_attention")
        maps, visible = torch.cat(self.maps, dim=1), None
        if any(v is not None for v in self.visible):
            visible = torch.cat([torch.ones_like(m, dtype=torch.bool) if v is None else v
                                 for m, v in zip(self.maps, self.visible)], dim=1)
        if window_mask is not None:  # windows are batch-major: map b * windows + w has mask w
            windows = (window_mask == 0).repeat(maps.shape[0] // window_mask.shape[0], 1, 1).unsqueeze(1)
            visible = windows if visible is None else visible & windows
        self.maps, self.visible = [], []
        if self.num_heads and maps.shape[1] != self.num_heads:
            raise RuntimeError(f"{self.name}: got {maps.shape[1]} head maps, {self.num_heads} before (one forward "
                               f"per take())")
        self.num_heads = maps.shape[1]
        return CapturedMaps(maps, visible)


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, Nq, Nk) -> (M, heads, Nq, Nk), every leading dim folded into M."""
    return x.reshape(-1, *x.shape[-3:]) if x.dim() != 4 else x


SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _explicit_sdpa_map(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor = None,
                       attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                       scale: Optional[float] = None, enable_gqa: bool = False
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The softmax map F.scaled_dot_product_attention computes without showing it, and its visible keys."""
    query, key = query.float(), key.float()
    if query.dim() >= 3 and key.shape[-3] != query.shape[-3]:  # grouped-query attention: K heads are shared
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    logits = query @ key.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
    visible = None
    if is_causal:
        visible = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = attn_mask if visible is None else visible & attn_mask
        else:
            logits = logits + attn_mask.float()
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    return logits.softmax(dim=-1), _visible_keys(logits)


def _visible_keys(logits: torch.Tensor) -> Optional[torch.Tensor]:
    """Keys a query can see: those whose logit is not -inf; None when every key is visible."""
    hidden = torch.isneginf(logits)
    return ~hidden if hidden.any() else None


def attention_logits(func, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The logits of a call that is a softmax over keys (over the last dim of a tensor of three or more dims: an
    attention map's), else None."""
    if func not in SOFTMAX_FUNCTIONS:
        return None
    logits, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else None)
    if isinstance(logits, torch.Tensor) and logits.dim() >= 3 and dim in (-1, logits.dim() - 1):
        return logits
    return None


class _Interceptor(TorchFunctionMode):
    """Records softmax / SDPA attention maps under the innermost running module of the capture."""

    def __init__(self, capture: "AttentionCapture"):
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        logits = attention_logits(func, args, kwargs)
        if logits is not None:
            self.capture.record(out, _visible_keys(logits))
        elif func in SDPA_FUNCTIONS:
            self.capture.record(*_explicit_sdpa_map(**dict(zip(SDPA_ARGS, args)), **kwargs))
        return out


class AttentionCapture:
    """The sites found so far (in the order they first ran) and the window masks their modules were given."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = {m: name for name, m in model.named_modules()}
        self.sites: dict[str, AttentionSite] = {}
        self.window_masks: dict[nn.Module, torch.Tensor] = {}
        self._stack: list[nn.Module] = []

    def running(self) -> Optional[nn.Module]:
        """The innermost running module that can own a map (nn.Softmax runs inside the attention module)."""
        for module in reversed(self._stack):
            if not isinstance(module, nn.Softmax):
                return module
        return None

    def record(self, maps: torch.Tensor, visible: Optional[torch.Tensor]) -> None:
        """A map computed outside any module of the model (e.g. in a test's own softmax) is not the model's."""
        module = self.running()
        if module is None:
            return
        name = self.names[module]
        if name not in self.sites:
            self.sites[name] = AttentionSite(name, module)
        self.sites[name].record(maps, visible)

    def take(self) -> dict[str, CapturedMaps]:
        """Every site's maps of the last forward, in the order the sites first ran; clears the record.
        Raises UnsupportedModelError when the model ran no softmax attention."""
        if not self.sites:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} has no softmax attention whose maps can be read: no module ran a "
                f"softmax over keys or scaled_dot_product_attention (convolutional models and linear or ReLU "
                f"attention, e.g. MIT's efficientvit_b*, have no attention maps)")
        masks, self.window_masks = self.window_masks, {}
        return {name: site.take(masks.get(site.module)) for name, site in self.sites.items() if site.maps}

    @contextlib.contextmanager
    def hooked(self) -> Iterator["AttentionCapture"]:
        handles = []

        def push(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._stack.append(module)
            mask = _window_mask(module, args, kwargs)
            if mask is not None:
                self.window_masks[module] = mask

        def pop(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._stack and self._stack[-1] is module:
                self._stack.pop()

        try:
            for module in self.names:
                handles.append(module.register_forward_pre_hook(push, with_kwargs=True))
                handles.append(module.register_forward_hook(pop, with_kwargs=True, always_call=True))
            with _Interceptor(self):
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self._stack.clear()


def _window_mask(module: nn.Module, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The (windows, N, N) additive mask a window-attention module is called with (Swin's shifted windows)."""
    if "mask" in kwargs:
        mask = kwargs["mask"]
    else:
        params = _forward_params(type(module))
        mask = args[params.index("mask")] if "mask" in params and params.index("mask") < len(args) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 3 and mask.is_floating_point() else None


@functools.lru_cache(maxsize=None)
def _forward_params(cls: type) -> list[str]:
    """The names of `cls.forward`'s parameters after self (looked up once per module class)."""
    try:
        return [p for p in inspect.signature(cls.forward).parameters if p != "self"]
    except (TypeError, ValueError):  # a forward without an inspectable signature (builtins)
        return []


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[AttentionCapture]:
    """Record the attention maps of every forward of `model` run inside the block; hooks removed on exit,
    also after an error. `take()` after each forward returns its maps."""
    with AttentionCapture(model).hooked() as capture:
        yield capture


@torch.no_grad()
def find_attention(model: nn.Module, example: torch.Tensor) -> dict[str, CapturedMaps]:
    """The attention sites of `model` and their map layouts, from one forward of `example` (e.g. one image):
    a cheap check, before any long work, that the model has maps to read (UnsupportedModelError otherwise)."""
    was_training = model.training
    model.eval()
    try:
        with capture_attention(model) as capture:
            model(example)
            return capture.take()
    finally:
        model.train(was_training)
