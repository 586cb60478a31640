"""Every knob of the EfficientViT architecture in one dataclass, the paper's M0-M5 presets, and config files.

Each ablation of the paper is a config, not a code change:

========================================  =============================================================
paper ablation                            config
========================================  =============================================================
sandwich block (N FFNs around the mixer)  ``ffn_pre=N, ffn_post=N`` (default 1, 1)
Swin-style block (mixer, then one FFN)    ``ffn_pre=0, ffn_post=1, token_interaction=False``
cascaded group attention vs MHSA          ``mixers='cga'`` / ``mixers='mhsa'`` (per stage or per block)
FFN-only / DWConv token mixer blocks      ``mixers=(('none', 'cga'), ...)`` per block
QK dimension                              ``key_dims=8`` (one value or one per stage)
V dimension (parameter reallocation)      ``v_ratio=0.5`` (V dim per head = v_ratio * C / H; MHSA only:
                                          the CGA cascade fixes V dim = C / H)
FFN expansion ratio                       ``mlp_ratio=3``
BN vs LN                                  ``norm='ln'``
token-interaction DWConv on / off         ``token_interaction=False``
query DWConv on / off, kernel per head    ``q_conv=False``, ``kernels=(7, 5, 3, 3)``
ReLU vs HardSwish                         ``act='hardswish'``
========================================  =============================================================
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

MIXERS = ("cga", "mhsa", "none")
NORMS = ("bn", "ln")
ACTS = ("relu", "hardswish", "gelu")

StageValue = Union[int, float, Sequence]


class ConfigError(ValueError):
    """A config that cannot build a model; the message names the field and the valid choices."""


def _per_stage(name: str, value: Any, num_stages: int, kind: type) -> tuple:
    """Broadcast a scalar to one value per stage; check a sequence has one value per stage."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return tuple(kind(value) for _ in range(num_stages))
    values = tuple(value)
    if len(values) != num_stages:
        raise ConfigError(
            f"mismatched list lengths: {name} has {len(values)} entries but embed_dims has {num_stages} stages")
    return tuple(kind(v) for v in values)


@dataclass
class EfficientViTConfig:
    """Architecture of an EfficientViT. Scalars given for per-stage fields apply to every stage."""

    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    embed_dims: tuple = (64, 128, 192)
    depths: tuple = (1, 2, 3)
    num_heads: tuple = (4, 4, 4)
    key_dims: StageValue = 16
    v_ratio: StageValue = 1.0
    mlp_ratio: StageValue = 2.0
    # Sandwich layout: DWConv+FFN residual pairs before and after the token mixer.
    ffn_pre: int = 1
    ffn_post: int = 1
    token_interaction: bool = True
    # Token mixer per stage ('cga') or per block ((('cga',), ('none', 'cga'), ...)).
    mixers: Any = "cga"
    window_sizes: StageValue = 7
    kernels: tuple = (5, 5, 5, 5)
    q_conv: bool = True
    norm: str = "bn"
    act: str = "relu"
    # Stride-2 convs in the overlapping patch embedding (4 -> 16x downsampling, as in the paper).
    stem_depth: int = 4
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    distillation: bool = False
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.embed_dims = tuple(int(d) for d in self.embed_dims)
        n = len(self.embed_dims)
        if n == 0:
            raise ConfigError("embed_dims must name at least one stage")
        self.depths = _per_stage("depths", self.depths, n, int)
        self.num_heads = _per_stage("num_heads", self.num_heads, n, int)
        self.key_dims = _per_stage("key_dims", self.key_dims, n, int)
        self.v_ratio = _per_stage("v_ratio", self.v_ratio, n, float)
        self.mlp_ratio = _per_stage("mlp_ratio", self.mlp_ratio, n, float)
        self.window_sizes = _per_stage("window_sizes", self.window_sizes, n, int)
        self.kernels = tuple(int(k) for k in self.kernels)
        self.mixers = self._normalize_mixers(self.mixers)
        self._validate()

    def _normalize_mixers(self, mixers: Any) -> tuple:
        """Return one tuple of mixer names per stage, one name per block."""
        n = len(self.embed_dims)
        if isinstance(mixers, str):
            mixers = (mixers,) * n
        mixers = tuple(mixers)
        if len(mixers) != n:
            raise ConfigError(f"mismatched list lengths: mixers has {len(mixers)} entries but embed_dims has {n} stages")
        per_block = []
        for i, (stage_mixers, depth) in enumerate(zip(mixers, self.depths)):
            if isinstance(stage_mixers, str):
                stage_mixers = (stage_mixers,) * depth
            stage_mixers = tuple(stage_mixers)
            if len(stage_mixers) != depth:
                raise ConfigError(
                    f"mismatched list lengths: mixers[{i}] has {len(stage_mixers)} entries but depths[{i}] is {depth}")
            for j, m in enumerate(stage_mixers):
                if m not in MIXERS:
                    raise ConfigError(f"unknown mixer '{m}' in stage {i} block {j}; valid: {', '.join(MIXERS)}")
            per_block.append(stage_mixers)
        return tuple(per_block)

    def _validate(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm '{self.norm}'; valid: {', '.join(NORMS)}")
        if self.act not in ACTS:
            raise ConfigError(f"unknown act '{self.act}'; valid: {', '.join(ACTS)}")
        if self.stem_depth < 1:
            raise ConfigError(f"stem_depth must be >= 1, got {self.stem_depth}")
        stem_div = 2 ** (self.stem_depth - 1)
        if self.embed_dims[0] % stem_div:
            raise ConfigError(f"embed_dims[0]={self.embed_dims[0]} must be divisible by {stem_div} "
                              f"(the patch embedding halves channels {self.stem_depth - 1} times)")
        if self.ffn_pre < 0 or self.ffn_post < 0:
            raise ConfigError("ffn_pre and ffn_post must be >= 0")
        if self.img_size < 2 ** self.stem_depth:
            raise ConfigError(f"img_size={self.img_size} is smaller than the patch size {2 ** self.stem_depth}")
        for i, (dim, heads, kd, vr, mr, ws) in enumerate(zip(
                self.embed_dims, self.num_heads, self.key_dims, self.v_ratio, self.mlp_ratio, self.window_sizes)):
            if dim <= 0 or heads <= 0 or kd <= 0 or ws <= 0 or mr <= 0 or vr <= 0:
                raise ConfigError(f"stage {i}: embed dim, heads, key dim, window, mlp_ratio, v_ratio must be positive")
            has_attention = any(m != "none" for m in self.mixers[i])
            if has_attention and dim % heads:
                raise ConfigError(f"embed_dims[{i}]={dim} is not divisible by num_heads[{i}]={heads}")
            if "cga" in self.mixers[i] and self.v_dim(i) != dim // heads:
                raise ConfigError(f"stage {i}: cga needs V dim = embed_dim / heads ({dim // heads}), got "
                                  f"{self.v_dim(i)} from v_ratio={vr}: the cascade adds each head's output to the "
                                  f"next head's input split; use v_ratio=1 there or mixers='mhsa'")
            if has_attention and self.q_conv and heads > len(self.kernels):
                raise ConfigError(f"kernels has {len(self.kernels)} entries but stage {i} has {heads} heads: "
                                  f"give one query-conv kernel size per head (or q_conv=False)")
        if any(k % 2 == 0 or k <= 0 for k in self.kernels):
            raise ConfigError(f"kernels must be positive odd sizes, got {self.kernels}")

    # --- derived sizes --------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.embed_dims)

    @property
    def patch_size(self) -> int:
        return 2 ** self.stem_depth

    def v_dim(self, stage: int) -> int:
        """Value dim per head: v_ratio times the channels each head receives."""
        return max(1, int(round(self.v_ratio[stage] * self.embed_dims[stage] / self.num_heads[stage])))

    def mlp_hidden(self, stage: int) -> int:
        return int(self.embed_dims[stage] * self.mlp_ratio[stage])

    # --- (de)serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: _to_lists(v) for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EfficientViTConfig":
        """Build from a dict; `preset: m4` starts from a preset and the other keys override it."""
        data = dict(data)
        base: dict[str, Any] = {}
        if "preset" in data:
            base = get_preset(data.pop("preset")).to_dict()
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid: preset, {', '.join(sorted(valid))}")
        base.update(data)
        return cls(**base)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "EfficientViTConfig":
        """Load a YAML or JSON config file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            text = f.read()
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of config keys, got {type(data).__name__}")
        data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
        return cls.from_dict(data)

    def to_file(self, path: str | os.PathLike) -> None:
        """Write the config as YAML (or JSON for a .json path), atomically."""
        from .io import write_text

        path = os.fspath(path)
        if path.endswith(".json"):
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        else:
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        write_text(path, text)

    def replace(self, **overrides: Any) -> "EfficientViTConfig":
        """A copy with some fields changed (validated like a new config)."""
        data = self.to_dict()
        data.update(overrides)
        return EfficientViTConfig.from_dict(data)


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value


# The paper's Table 1 (docs/paper.md). Q/K dim 16, window 7, V dim = C/H, FFN ratio 2 for every preset.
PRESETS: dict[str, EfficientViTConfig] = {
    "m0": EfficientViTConfig(embed_dims=(64, 128, 192), depths=(1, 2, 3), num_heads=(4, 4, 4),
                             kernels=(5, 5, 5, 5), name="m0"),
    "m1": EfficientViTConfig(embed_dims=(128, 144, 192), depths=(1, 2, 3), num_heads=(2, 3, 3),
                             kernels=(7, 5, 3, 3), name="m1"),
    "m2": EfficientViTConfig(embed_dims=(128, 192, 224), depths=(1, 2, 3), num_heads=(4, 3, 2),
                             kernels=(7, 5, 3, 3), name="m2"),
    "m3": EfficientViTConfig(embed_dims=(128, 240, 320), depths=(1, 2, 3), num_heads=(4, 3, 4),
                             kernels=(5, 5, 5, 5), name="m3"),
    "m4": EfficientViTConfig(embed_dims=(128, 256, 384), depths=(1, 2, 3), num_heads=(4, 4, 4),
                             kernels=(7, 5, 3, 3), name="m4"),
    "m5": EfficientViTConfig(embed_dims=(192, 288, 384), depths=(1, 3, 4), num_heads=(3, 3, 4),
                             kernels=(7, 5, 3, 3), name="m5"),
}

# Paper values (Table 1): params (M), FLOPs (M), ImageNet top-1 (%), V100 throughput (img/s).
PAPER = {
    "m0": dict(params_m=2.3, flops_m=79, top1=63.2, v100_img_s=27644),
    "m1": dict(params_m=3.0, flops_m=167, top1=68.4, v100_img_s=20093),
    "m2": dict(params_m=4.2, flops_m=201, top1=70.8, v100_img_s=18218),
    "m3": dict(params_m=6.9, flops_m=263, top1=73.4, v100_img_s=16644),
    "m4": dict(params_m=8.8, flops_m=299, top1=74.3, v100_img_s=15914),
    "m5": dict(params_m=12.4, flops_m=522, top1=77.1, v100_img_s=10621),
}


def get_preset(name: str) -> EfficientViTConfig:
    """The config of preset `name` ('m0'..'m5', also 'evit_m0' or 'M0')."""
    key = name.lower().removeprefix("evit_")
    if key not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; valid: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[key])
