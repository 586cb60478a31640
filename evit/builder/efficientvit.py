"""EfficientViT (Liu et al., CVPR 2023), built from an `EfficientViTConfig`.

Sandwich blocks (DWConv+FFN residuals around one token mixer), cascaded group attention (CGA) or plain multi-head
self-attention (MHSA) in local windows, parameter reallocation through per-stage Q/K dim, V ratio and FFN ratio.
State-dict names follow timm's `efficientvit_msra` port for the paper's layout, so its weights load unchanged
(see `evit.builder.convert`). `evit.fuse(model)` gives the deploy model: every BatchNorm folded, attention biases
cached.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, SqueezeExcite, resize_rel_pos_bias_table_levit, trunc_normal_
from timm.models import build_model_with_cfg, register_model
from timm.models._features_fx import register_notrace_module

from .config import EfficientViTConfig, get_preset

__all__ = ["EfficientViT", "fuse", "create_evit"]

ACT_LAYERS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "hardswish": nn.Hardswish, "gelu": nn.GELU}


class ConvNorm(nn.Sequential):
    """Bias-free conv followed by a norm; `fuse()` folds a BatchNorm into the conv."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 norm: str = "bn", norm_init: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs) if norm == "bn" else LayerNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, norm_init)
        nn.init.zeros_(self.bn.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        if not isinstance(self.bn, nn.BatchNorm2d):
            return self  # LayerNorm depends on the input statistics: nothing to fold
        conv, bn = self.conv, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          groups=conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        return fused


class NormLinear(nn.Sequential):
    """BatchNorm1d + dropout + Linear classifier; `fuse()` folds the BatchNorm into the Linear."""

    def __init__(self, in_features: int, out_features: int, drop: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(in_features, out_features)
        trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        bn, linear = self.bn, self.linear
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        fused = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device,
                          dtype=linear.weight.dtype)
        fused.weight.copy_(linear.weight * scale[None, :])
        fused.bias.copy_(linear.weight @ shift + linear.bias)
        return fused


class Residual(nn.Module):
    """x + drop_path(m(x))."""

    def __init__(self, m: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.m = m
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.m(x))


class ConvMlp(nn.Module):
    """The FFN: 1x1 Conv-Norm, activation, 1x1 Conv-Norm (last norm starts at zero: the residual starts as identity)."""

    def __init__(self, dim: int, hidden: int, norm: str = "bn", act_layer: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden, norm=norm)
        self.act = act_layer()
        self.pw2 = ConvNorm(hidden, dim, norm=norm, norm_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))


class RelativeBiasAttention(nn.Module):
    """Shared machinery of CGA and MHSA: sizes, output projection, and a learned bias per head and |dy|,|dx|
    offset (LeViT) in a window."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, v_dim: int, resolution: int, norm: str,
                 act_layer: type[nn.Module]):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = v_dim
        self.scale = key_dim ** -0.5
        self.resolution = resolution
        # heads' outputs concatenated, activated, projected back; last norm at zero so the branch starts as identity
        self.proj = nn.Sequential(act_layer(), ConvNorm(v_dim * num_heads, dim, norm=norm, norm_init=0.0))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", self._bias_index(resolution), persistent=False)
        self.deploy = False

    @staticmethod
    def _bias_index(resolution: int) -> torch.Tensor:
        """Index of the bias table for every (query, key) pair: |dy| * resolution + |dx|."""
        coords = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij"))
        coords = coords.flatten(1)
        delta = (coords[:, :, None] - coords[:, None, :]).abs()
        return delta[0] * resolution + delta[1]

    def attention_bias(self) -> torch.Tensor:
        """(heads, N, N) bias; a cached buffer in deploy mode, gathered from the table otherwise."""
        if self.deploy:
            return self.attention_bias_cache
        return self.attention_biases[:, self.attention_bias_idxs]

    def set_resolution(self, resolution: int) -> None:
        """Change the window size, resampling the bias table (bicubic) so trained biases carry over."""
        if resolution == self.resolution:
            return
        with torch.no_grad():
            table = resize_rel_pos_bias_table_levit(self.attention_biases.T, (resolution ** 2, self.num_heads)).T
        self.attention_biases = nn.Parameter(table.contiguous(), requires_grad=self.attention_biases.requires_grad)
        self.attention_bias_idxs = self._bias_index(resolution).to(self.attention_biases.device)
        self.resolution = resolution
        if self.deploy:
            self.fuse()

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """Deploy mode: gather the bias once into a buffer instead of on every forward."""
        self.register_buffer("attention_bias_cache", self.attention_biases[:, self.attention_bias_idxs].clone(),
                             persistent=False)
        self.deploy = True
        return self


class CascadedGroupAttention(RelativeBiasAttention):
    """Cascaded group attention: head i sees channel split i plus head i-1's output.

    Each head has its own 1x1 Conv-Norm producing Q, K (key_dim) and V (v_dim), a depthwise conv on Q
    (kernel per head), and a relative attention bias. The heads' outputs are concatenated, activated and
    projected back to `dim`.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, v_dim: int, resolution: int,
                 kernels: tuple = (5, 5, 5, 5), q_conv: bool = True, norm: str = "bn",
                 act_layer: type[nn.Module] = nn.ReLU):
        super().__init__(dim, key_dim, num_heads, v_dim, resolution, norm, act_layer)
        self.qkvs = nn.ModuleList(
            ConvNorm(dim // num_heads, 2 * key_dim + v_dim, norm=norm) for _ in range(num_heads))
        self.dws = nn.ModuleList(
            ConvNorm(key_dim, key_dim, kernels[i], groups=key_dim, norm=norm) if q_conv else nn.Identity()
            for i in range(num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        splits = x.chunk(self.num_heads, dim=1)
        bias = self.attention_bias()
        outputs = []
        feat = splits[0]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + splits[i]  # the cascade: previous head's output refines this head's input
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = dw(q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
            attn = (q * self.scale).transpose(-2, -1) @ k + bias[i]
            attn = attn.softmax(dim=-1)
            feat = (v @ attn.transpose(-2, -1)).view(B, self.val_dim, H, W)
            outputs.append(feat)
        return self.proj(torch.cat(outputs, dim=1))


class MultiHeadSelfAttention(RelativeBiasAttention):
    """Plain multi-head self-attention: every head sees all channels (the paper's MHSA baseline).

    Same Q-conv, relative bias, activation and projection as CGA, so the two differ only in how heads get
    their input.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, v_dim: int, resolution: int,
                 kernels: tuple = (5, 5, 5, 5), q_conv: bool = True, norm: str = "bn",
                 act_layer: type[nn.Module] = nn.ReLU):
        super().__init__(dim, key_dim, num_heads, v_dim, resolution, norm, act_layer)
        self.qkv = ConvNorm(dim, num_heads * (2 * key_dim + v_dim), norm=norm)
        self.dws = nn.ModuleList(
            ConvNorm(key_dim, key_dim, kernels[i], groups=key_dim, norm=norm) for i in range(num_heads)
        ) if q_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        nh, kd, vd = self.num_heads, self.key_dim, self.val_dim
        q, k, v = self.qkv(x).split([nh * kd, nh * kd, nh * vd], dim=1)
        if self.dws is not None:
            q = torch.cat([dw(qh) for dw, qh in zip(self.dws, q.chunk(nh, dim=1))], dim=1)
        q = q.reshape(B, nh, kd, H * W)
        k = k.reshape(B, nh, kd, H * W)
        v = v.reshape(B, nh, vd, H * W)
        attn = (q * self.scale).transpose(-2, -1) @ k + self.attention_bias()
        attn = attn.softmax(dim=-1)
        out = v @ attn.transpose(-2, -1)
        return self.proj(out.reshape(B, nh * vd, H, W))


@register_notrace_module  # FX cannot trace the input-size dependent window partition
class WindowAttention(nn.Module):
    """Runs an attention module in non-overlapping windows; pads inputs that are not a multiple of the window."""

    def __init__(self, attn: RelativeBiasAttention):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        ws = self.attn.resolution
        if H == ws and W == ws:
            return self.attn(x)
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        x = F.pad(x, (0, pad_r, 0, pad_b))
        nH, nW = (H + pad_b) // ws, (W + pad_r) // ws
        # B C (nH ws) (nW ws) -> (B nH nW) C ws ws
        x = x.view(B, C, nH, ws, nW, ws).permute(0, 2, 4, 1, 3, 5).reshape(B * nH * nW, C, ws, ws)
        x = self.attn(x)
        x = x.view(B, nH, nW, C, ws, ws).permute(0, 3, 1, 4, 2, 5).reshape(B, C, nH * ws, nW * ws)
        return x[:, :, :H, :W]


def _dw_ffn_pair(dim: int, hidden: int, norm: str, act_layer: type[nn.Module], drop_path: float,
                 token_interaction: bool, dw_norm_init: float) -> list[tuple[str, nn.Module]]:
    """The DWConv (token interaction) and FFN residuals that surround the mixer in the sandwich."""
    pair = []
    if token_interaction:
        pair.append(("dw", Residual(ConvNorm(dim, dim, 3, groups=dim, norm=norm, norm_init=dw_norm_init), drop_path)))
    pair.append(("ffn", Residual(ConvMlp(dim, hidden, norm, act_layer), drop_path)))
    return pair


class EfficientViTBlock(nn.Sequential):
    """Sandwich block: `ffn_pre` (DWConv, FFN) pairs, the token mixer, `ffn_post` pairs.

    Children are named dw0, ffn0, mixer, dw1, ffn1 ... (pairs numbered in order), as in the paper's layout.
    """

    def __init__(self, dim: int, mixer: str, key_dim: int, num_heads: int, v_dim: int, hidden: int,
                 window: int, kernels: tuple, q_conv: bool, ffn_pre: int, ffn_post: int, token_interaction: bool,
                 norm: str, act_layer: type[nn.Module], drop_path: float = 0.0):
        layers: list[tuple[str, nn.Module]] = []

        def add_pairs(indices: range) -> None:
            for i in indices:
                for name, module in _dw_ffn_pair(dim, hidden, norm, act_layer, drop_path, token_interaction, 0.0):
                    layers.append((f"{name}{i}", module))

        add_pairs(range(ffn_pre))
        if mixer != "none":
            attn = ATTENTION[mixer](dim, key_dim, num_heads, v_dim, window, kernels, q_conv, norm, act_layer)
            layers.append(("mixer", Residual(WindowAttention(attn), drop_path)))
        add_pairs(range(ffn_pre, ffn_pre + ffn_post))
        super().__init__(OrderedDict(layers))
        self.mixer_type = mixer


ATTENTION: dict[str, Callable[..., RelativeBiasAttention]] = {
    "cga": CascadedGroupAttention,
    "mhsa": MultiHeadSelfAttention,
}


class PatchMerging(nn.Module):
    """Inverted-residual subsampling: 1x1 to 4C, DW3x3 stride 2, squeeze-excite, 1x1 to the next width."""

    def __init__(self, dim: int, out_dim: int, norm: str = "bn", act_layer: type[nn.Module] = nn.ReLU):
        super().__init__()
        hidden = dim * 4
        self.conv1 = ConvNorm(dim, hidden, norm=norm)
        self.act = act_layer()
        self.conv2 = ConvNorm(hidden, hidden, 3, stride=2, groups=hidden, norm=norm)
        self.se = SqueezeExcite(hidden, 0.25)
        self.conv3 = ConvNorm(hidden, out_dim, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))


class Subsample(nn.Sequential):
    """(DWConv, FFN) residuals, patch merging, (DWConv, FFN) residuals: the paper's stage transition."""

    def __init__(self, dim: int, out_dim: int, in_hidden: int, out_hidden: int, norm: str,
                 act_layer: type[nn.Module], drop_path: float = 0.0):
        def pair(d: int, hidden: int) -> nn.Sequential:
            return nn.Sequential(*(m for _, m in _dw_ffn_pair(d, hidden, norm, act_layer, drop_path, True, 1.0)))

        super().__init__(OrderedDict([
            ("res1", pair(dim, in_hidden)),
            ("patchmerge", PatchMerging(dim, out_dim, norm, act_layer)),
            ("res2", pair(out_dim, out_hidden)),
        ]))


class EfficientViTStage(nn.Module):
    def __init__(self, cfg: EfficientViTConfig, index: int, resolution: int, drop_paths: list[float]):
        super().__init__()
        dim = cfg.embed_dims[index]
        act_layer = ACT_LAYERS[cfg.act]
        if index > 0:
            prev = cfg.embed_dims[index - 1]
            self.downsample = Subsample(prev, dim, cfg.mlp_hidden(index - 1), cfg.mlp_hidden(index), cfg.norm,
                                        act_layer, drop_paths[0])
            resolution = (resolution - 1) // 2 + 1
        else:
            self.downsample = nn.Identity()
        self.resolution = resolution
        self.window = min(cfg.window_sizes[index], resolution)
        self.blocks = nn.Sequential(*(
            EfficientViTBlock(
                dim, mixer, cfg.key_dims[index], cfg.num_heads[index], cfg.v_dim(index), cfg.mlp_hidden(index),
                self.window, cfg.kernels, cfg.q_conv, cfg.ffn_pre, cfg.ffn_post, cfg.token_interaction,
                cfg.norm, act_layer, drop_paths[j])
            for j, mixer in enumerate(cfg.mixers[index])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class PatchEmbed(nn.Sequential):
    """Overlapping patch embedding: `depth` 3x3 stride-2 Conv-Norms, channels doubling up to `dim`."""

    def __init__(self, in_chans: int, dim: int, depth: int, norm: str, act_layer: type[nn.Module]):
        layers: list[tuple[str, nn.Module]] = []
        chans = in_chans
        for i in range(depth):
            out = dim // 2 ** (depth - 1 - i)
            layers.append((f"conv{i + 1}", ConvNorm(chans, out, 3, stride=2, norm=norm)))
            if i < depth - 1:
                layers.append((f"act{i + 1}", act_layer()))
            chans = out
        super().__init__(OrderedDict(layers))


class EfficientViT(nn.Module):
    """EfficientViT classifier (timm-style: forward_features / forward_head, feature_info, fuse())."""

    def __init__(self, config: Union[EfficientViTConfig, dict, str, None] = None, **overrides: Any):
        super().__init__()
        cfg = _as_config(config, overrides)
        self.config = cfg
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.drop_rate = cfg.drop_rate
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dims[0], cfg.stem_depth, cfg.norm, ACT_LAYERS[cfg.act])

        # Drop-path rates grow linearly over blocks (subsample residuals take their stage's first rate).
        total = sum(cfg.depths)
        rates = torch.linspace(0, cfg.drop_path_rate, total).tolist() if total else []
        resolution = cfg.img_size // cfg.patch_size
        stride = cfg.patch_size
        stages, self.feature_info, start = [], [], 0
        for i in range(cfg.num_stages):
            stage = EfficientViTStage(cfg, i, resolution, rates[start:start + cfg.depths[i]] or [0.0])
            start += cfg.depths[i]
            resolution = stage.resolution
            stride *= 2 if i > 0 else 1
            stages.append(stage)
            self.feature_info.append(dict(num_chs=cfg.embed_dims[i], reduction=stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = cfg.embed_dims[-1]
        self.head = self._make_head(cfg.num_classes)
        self.head_dist = self._make_head(cfg.num_classes) if cfg.distillation else None

    def _make_head(self, num_classes: int) -> nn.Module:
        return NormLinear(self.num_features, num_classes, self.drop_rate) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {k for k in self.state_dict() if "attention_biases" in k}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.linear if isinstance(self.head, NormLinear) else self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)
        if self.head_dist is not None:
            self.head_dist = self._make_head(num_classes)

    def set_input_size(self, img_size: int) -> None:
        """Rebuild the attention windows for a new input size, resampling the bias tables (fine-tuning at a
        new resolution). Any input size runs without this (windows are padded); this changes the window."""
        self.config = self.config.replace(img_size=img_size)
        resolution = img_size // self.config.patch_size
        for i, stage in enumerate(self.stages):
            if i > 0:
                resolution = (resolution - 1) // 2 + 1
            stage.resolution = resolution
            stage.window = min(self.config.window_sizes[i], resolution)
            for m in stage.blocks.modules():
                if isinstance(m, RelativeBiasAttention):
                    m.set_resolution(stage.window)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-stage feature maps (NCHW), for detection and segmentation necks."""
        x = self.patch_embed(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models import checkpoint_seq

            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        if pre_logits:
            return x
        if self.head_dist is None:
            return self.head(x)
        out, out_dist = self.head(x), self.head_dist(x)
        if self.training and not torch.jit.is_scripting():
            return out, out_dist  # distillation training needs both
        return (out + out_dist) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def fuse(self) -> "EfficientViT":
        """The deploy model (a copy): see `evit.fuse`."""
        return fuse(self)


def _as_config(config: Union[EfficientViTConfig, dict, str, None], overrides: dict[str, Any]) -> EfficientViTConfig:
    if config is None:
        config = EfficientViTConfig()
    elif isinstance(config, str):
        config = EfficientViTConfig.from_file(config) if config.endswith((".yaml", ".yml", ".json")) \
            else get_preset(config)
    elif isinstance(config, dict):
        config = EfficientViTConfig.from_dict(config)
    return config.replace(**overrides) if overrides else config


def _fuse_children(module: nn.Module) -> nn.Module:
    """Post-order: replace each submodule that has a `fuse()` by what it returns."""
    for name, child in module.named_children():
        _fuse_children(child)
        if hasattr(child, "fuse"):
            module.add_module(name, child.fuse())
    return module


@torch.no_grad()
def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Deploy mode: fold every BatchNorm into the preceding conv/linear (BN1d+Linear head too), cache the
    attention biases, merge a distillation head into the classifier. Returns the model in eval mode."""
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    _fuse_children(model)
    if isinstance(model, EfficientViT) and isinstance(model.head_dist, nn.Linear) and isinstance(model.head, nn.Linear):
        # eval output is the mean of both heads: one Linear with averaged weights gives the same logits
        model.head.weight.add_(model.head_dist.weight).mul_(0.5)
        model.head.bias.add_(model.head_dist.bias).mul_(0.5)
        model.head_dist = None
    return model


# --- timm registration ---------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: EfficientViT) -> dict[str, torch.Tensor]:
    """Accept evit, timm or official Microsoft checkpoints; resample attention-bias tables whose window size
    differs from the model's (weights trained at one resolution used at another)."""
    from .convert import normalize_state_dict

    return normalize_state_dict(state_dict, model)


def _cfg(variant: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (4, 4), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv1.conv", "classifier": "head.linear", "license": "mit",
        # same tensors as timm's port of the official ImageNet-1k weights
        "hf_hub_id": f"timm/efficientvit_{variant}.r224_in1k" if variant else None,
        **kwargs,
    }


def create_evit(variant: str, config: EfficientViTConfig, pretrained: bool = False, **kwargs: Any) -> EfficientViT:
    """Build through timm's builder: pretrained loading (with `checkpoint_filter_fn`) and features_only."""
    preset = variant.removeprefix("evit_") if variant != "evit_custom" else ""
    pretrained_cfg = kwargs.pop("pretrained_cfg", None) or _cfg(preset)
    out_indices = kwargs.pop("out_indices", tuple(range(config.num_stages)))
    # timm fills num_classes/in_chans from the pretrained cfg unless given: the config's values come first
    for key in ("num_classes", "in_chans", "img_size"):
        kwargs.setdefault(key, getattr(config, key))
    return build_model_with_cfg(
        EfficientViT, variant, pretrained,
        pretrained_cfg=pretrained_cfg,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        config=config,
        **kwargs,
    )


def _register_preset(name: str) -> Callable[..., EfficientViT]:
    def factory(pretrained: bool = False, **kwargs: Any) -> EfficientViT:
        return create_evit(f"evit_{name}", get_preset(name), pretrained, **kwargs)

    factory.__name__ = f"evit_{name}"
    factory.__qualname__ = factory.__name__
    factory.__doc__ = f"EfficientViT-{name.upper()} (paper Table 1); kwargs override any EfficientViTConfig field."
    factory.__module__ = __name__
    return register_model(factory)


evit_m0 = _register_preset("m0")
evit_m1 = _register_preset("m1")
evit_m2 = _register_preset("m2")
evit_m3 = _register_preset("m3")
evit_m4 = _register_preset("m4")
evit_m5 = _register_preset("m5")


@register_model
def evit_custom(pretrained: bool = False, config: Union[EfficientViTConfig, dict, str, None] = None,
                **kwargs: Any) -> EfficientViT:
    """EfficientViT from any config: an EfficientViTConfig, a dict, a preset name or a YAML/JSON file."""
    return create_evit("evit_custom", _as_config(config, {}), pretrained, **kwargs)
