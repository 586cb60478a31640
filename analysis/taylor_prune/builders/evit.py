"""evit EfficientViT (BatchNorm only): per block Q/K, V (MHSA) and FFN-hidden groups, per stage a width group
through the stem, transitions, heads and the CGA cascade. Where those channels live is evit's to say
(`evit.builder.channels`): this module only turns its couplings into groups."""
from __future__ import annotations

import re

import timm
import torch.nn as nn
from timm.models.efficientvit_msra import EfficientVitMsra

from analysis.taylor_prune.builders import register_attention, register_block, register_converter, register_model
from analysis.taylor_prune.groups import Group, Slice, stage_of
from evit.builder import channels
from evit.builder.channels import ChannelSpan
from evit.builder.convert import from_timm
from evit.builder.efficientvit import EfficientViT, EfficientViTBlock, RelativeBiasAttention
from evit.models import UnsupportedModelError


def _slices(spans: list[ChannelSpan]) -> list[Slice]:
    return [Slice(s.layer, s.axis, s.offset, s.first, s.count) for s in spans]


def _require_batchnorm(name: str, module: nn.Module) -> None:
    """Reject evit modules with LayerNorms: a LayerNorm normalizes over channels, so removing one changes every
    other channel's output."""
    if not channels.uses_batchnorm(module):
        raise UnsupportedModelError(f"{name}: only BatchNorm evit blocks can be pruned (this one has LayerNorm)")


@register_attention(RelativeBiasAttention)
def attention_geometry(attn: nn.Module, args: tuple) -> tuple[float, float, int]:
    """An evit attention's input is (batch or windows, C, ws, ws): every token a query of every key, per head."""
    x = args[0]
    return x.shape[0] * x.shape[2] * x.shape[3], x.shape[2] * x.shape[3], attn.num_heads * (
        attn.key_dim + attn.val_dim)


@register_block(EfficientViTBlock, family="EfficientViT (evit; timm's efficientvit_m* through evit)")
def block_groups(name: str, block: nn.Module) -> list[Group]:
    """evit block: one FFN-hidden group per FFN of the sandwich, and the mixer's Q/K and V groups. Cascaded group
    attention's V is tied to its stage's width (`evit.builder.channels.attention_v`): its V group is reported, not
    prunable, and shrinks with the stage's width group."""
    _require_batchnorm(name, block)
    common = dict(block=name, stage=stage_of(name), width=lambda: channels.block_width(block))
    groups = [Group("ffn", heads=1, count=lambda f=f: f.pw1.conv.out_channels,
                    layout=lambda f=f: _slices(channels.ffn_hidden(f)), **common)
              for f in channels.block_ffns(block)]
    attn = channels.block_attention(block)
    if attn is None:
        return groups
    heads = attn.num_heads

    def shrink(size: str):
        return lambda removed: setattr(attn, size, getattr(attn, size) - removed)

    tied = channels.attention_v(attn) is None
    v = Group("v", heads=heads, attention=attn, count=lambda: heads * attn.val_dim, prunable=not tied,
              layout=lambda: [] if tied else _slices(channels.attention_v(attn)), on_prune=shrink("val_dim"), **common)
    qk = Group("qk", heads=heads, attention=attn, layout=lambda: _slices(channels.attention_qk(attn)),
               count=lambda: heads * attn.key_dim, on_prune=shrink("key_dim"), **common)
    return [qk, v] + groups


def _stage_width(model: EfficientViT, s: int) -> Group:
    """The width of evit stage s (`evit.builder.channels.stage_width`). A CGA stage's width channel is one V dim of
    each of its mixers (same tokens and keys), so its matmul MACs count once per mixer."""
    cgas = channels.stage_attentions(model, s)
    count = lambda: channels.stage_channels(model, s)  # noqa: E731
    return Group("width", block=f"stages.{s}", stage=s, heads=cgas[0].num_heads if cgas else 1, width=count,
                 layout=lambda: _slices(channels.stage_width(model, s)), count=count,
                 on_prune=lambda removed: channels.stage_width_changed(model, s),
                 attention=cgas[0] if cgas else None, matmuls=len(cgas))


@register_model(EfficientViT)
def width_groups(model: nn.Module) -> list[Group]:
    """One width group per stage of an evit EfficientViT (`_stage_width`)."""
    _require_batchnorm(type(model).__name__, model)  # also the stem and transitions, which no block group covers
    return [_stage_width(model, s) for s in range(len(model.stages))]


@register_converter(EfficientVitMsra)
def from_timm_port(model: nn.Module) -> EfficientViT:
    """timm's port of the paper's model (`efficientvit_m0`..`m5`) as the evit preset of the same name: the two share
    their state-dict layout (evit.builder.convert.from_timm), so the weights carry over and the function is the same. A
    skeleton (weights on the meta device, for input checks) converts to a freshly initialized evit model."""
    match = re.fullmatch(r"efficientvit_(m\d)", model.pretrained_cfg.get("architecture", ""))
    if match is None:
        raise UnsupportedModelError(f"{type(model).__name__} ({model.pretrained_cfg.get('architecture')}) is not one "
                                    f"of timm's efficientvit_m0..m5, whose evit presets the pruner converts it to")
    converted = timm.create_model(f"evit_{match[1]}", num_classes=model.num_classes)
    if not any(p.is_meta for p in model.parameters()):
        converted.load_state_dict(from_timm(model.state_dict()))
    return converted.train(model.training)
