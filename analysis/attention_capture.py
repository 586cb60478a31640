"""Read every head's softmax attention maps out of timm ViT / Swin and evit models with forward hooks.

    with capture_attention(model) as sites:
        model(images)
        captured = {site.name: site.take() for site in sites}   # maps (B * windows, heads, N, N), visible keys

timm's ``Attention`` (ViT, DeiT) and Swin's ``WindowAttention`` apply ``attn_drop`` to the softmax output on
their explicit path, so a hook on ``attn_drop`` reads the maps; their fused path
(F.scaled_dot_product_attention) never materializes them, so it is switched off while capturing and restored
afterwards. Swin's shifted windows hide some keys from some queries (a mask passed to the module): the keys
each query can see come back with the maps. evit's CGA and MHSA pass their maps through an ``AttentionProbe``
(MHSA once with all heads, CGA once per head in head order with ``head=i``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn as nn
from timm.layers import Attention as TimmAttention  # what timm.models.vision_transformer.Attention refers to
from timm.models.swin_transformer import WindowAttention as SwinWindowAttention

from evit.efficientvit import RelativeBiasAttention

TIMM_ATTENTION = (TimmAttention, SwinWindowAttention)


class UnsupportedModelError(ValueError):
    """A model without any attention module whose maps this module can read."""


class CapturedMaps(NamedTuple):
    maps: torch.Tensor  # (B, heads, N, N) softmax maps, B counting windows
    visible: Optional[torch.Tensor]  # (B, 1, N, N) bool: keys each query can see; None when all can


@dataclass(eq=False)
class AttentionSite:
    """One attention module and the maps its hooks recorded since the last `take()`."""

    name: str
    module: nn.Module
    num_heads: int
    maps: list[torch.Tensor] = field(default_factory=list)
    mask: Optional[torch.Tensor] = None  # Swin's (windows, N, N) additive mask of the last forward

    def record(self, attn: torch.Tensor, head: Optional[int] = None) -> None:
        if head is not None:  # CGA: one (B, N, N) map per head, heads in order
            if head != sum(m.shape[1] for m in self.maps):
                raise RuntimeError(f"{self.name}: head {head} arrived out of order")
            attn = attn.unsqueeze(1)
        self.maps.append(attn.detach())

    def take(self) -> CapturedMaps:
        """The maps of the last forward and the keys each query could see; clears the record."""
        if not self.maps:
            raise RuntimeError(f"{self.name} recorded no attention maps: run a forward inside capture_attention")
        maps, self.maps = torch.cat(self.maps, dim=1), []
        if maps.shape[1] != self.num_heads:
            raise RuntimeError(f"{self.name}: got {maps.shape[1]} head maps for {self.num_heads} heads (one forward "
                               f"per take())")
        visible, self.mask = self.mask, None
        if visible is not None:  # windows are batch-major: map b * windows + w has mask w
            visible = (visible == 0).repeat(maps.shape[0] // visible.shape[0], 1, 1).unsqueeze(1)
        return CapturedMaps(maps, visible)


def find_attention(model: nn.Module) -> list[AttentionSite]:
    """Every supported attention module of `model`, in forward (module registration) order."""
    sites = [AttentionSite(name, m, m.num_heads) for name, m in model.named_modules()
             if isinstance(m, TIMM_ATTENTION + (RelativeBiasAttention,))]
    if not sites:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no attention module whose maps can be read (supported: timm "
            f"vision_transformer.Attention, swin_transformer.WindowAttention, evit CGA / MHSA)")
    return sites


def _attn_drop_hook(site: AttentionSite) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        site.record(args[0])  # the input of attn_drop is the softmax output (dropout is off in eval anyway)
    return hook


def _mask_hook(site: AttentionSite) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        site.mask = kwargs.get("mask", args[1] if len(args) > 1 else None)  # (windows, N, N): 0 or -100
    return hook


def _probe_hook(site: AttentionSite) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> None:
        site.record(args[0], kwargs.get("head"))
    return hook


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[AttentionSite]]:
    """Hook every attention module of `model`; yields the sites. Hooks and fused-attention flags are restored
    on exit, also after an error."""
    sites = find_attention(model)
    handles = []
    fused = [(site.module, site.module.fused_attn) for site in sites if isinstance(site.module, TIMM_ATTENTION)]
    try:
        for site in sites:
            if isinstance(site.module, RelativeBiasAttention):
                handles.append(site.module.attn_probe.register_forward_hook(_probe_hook(site), with_kwargs=True))
            else:
                site.module.fused_attn = False
                handles.append(site.module.attn_drop.register_forward_hook(_attn_drop_hook(site)))
            if isinstance(site.module, SwinWindowAttention):
                handles.append(site.module.register_forward_pre_hook(_mask_hook(site), with_kwargs=True))
        yield sites
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in fused:
            module.fused_attn = flag
