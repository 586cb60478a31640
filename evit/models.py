"""One place that turns a user's model name into a model: short names, proxies, evit presets/configs, timm names."""
from __future__ import annotations

import difflib
import inspect
import os
from typing import Any, Optional

import timm
import torch
import torch.nn as nn
from timm.data import resolve_model_data_config

import evit  # noqa: F401  (registers evit_m0..evit_m5 and evit_custom with timm)
from evit import ConfigError
from evit.cli import UserError

# Short names used throughout the paper's analyses.
SHORT_NAMES: dict[str, str] = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
}

# Fashion-MNIST-scale proxies (the paper's width-downscaled DeiT-T / Swin-T subnetworks, and EfficientViT at a
# small input): timm name + kwargs. 10 classes, 3 input channels (grayscale is repeated). Recipes: evit.zoo.
PROXY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "deit_proxy": ("deit_tiny_patch16_224", dict(img_size=28, patch_size=7, embed_dim=96, depth=4, num_heads=3)),
    # patch 4 + window 4 at 32 px: 8x8, 4x4, 2x2 tokens per stage (patch 2 costs 4x the time per epoch).
    "swin_proxy": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=4, window_size=4, embed_dim=48,
                                                        depths=(2, 2, 2), num_heads=(3, 6, 12))),
    # 64 px: 4x4, 2x2, 1x1 tokens per stage (the paper's 224 px gives 14x14, 7x7, 4x4).
    **{f"evit_m{i}_proxy": (f"evit_m{i}", dict(img_size=64)) for i in range(6)},
}
PROXY_NUM_CLASSES = 10
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")  # a model name with one of these is an evit config file


class UnknownModelError(UserError, ValueError):
    """Raised for a model name that is neither a short name, an evit config file nor a timm model."""


class UnsupportedModelError(UserError, ValueError):
    """A known model that an analysis cannot read or rewrite; the message says which part and what is supported."""


def is_config_file(name: str) -> bool:
    return name.endswith(CONFIG_SUFFIXES) and os.path.isfile(name)


def read_config(path: str) -> evit.EfficientViTConfig:
    """An evit config file, or a one-line ConfigError naming the file: YAML/JSON syntax and wrong value types
    too, whose parser messages span lines."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"evit config file not found: {path}")
    try:
        return evit.EfficientViTConfig.from_file(path)
    except (yaml.YAMLError, ValueError, TypeError) as e:  # ConfigError is a ValueError
        raise ConfigError(f"evit config file {path}: {' '.join(str(e).split())}") from e


def check_model(name: str) -> None:
    """Fail at once, building nothing, on a name create_model would reject; an evit config file is read and
    validated. The CLIs call this before any long work."""
    if name.endswith(CONFIG_SUFFIXES):
        read_config(name)
    elif name not in PROXY_MODELS:
        resolve_model_name(name)


def skeleton(name: str, **kwargs: Any) -> nn.Module:
    """Model `name` with no weights to speak of, for structural checks before any long work: built on the meta
    device (instant even for ViT-L), or on the CPU when its constructor computes with tensors (evit's does).
    kwargs go to create_model."""
    try:
        with torch.device("meta"):
            return create_model(name, **kwargs)
    except NotImplementedError:  # "Cannot copy out of meta tensor"
        return create_model(name, **kwargs)


def resolve_model_name(name: str) -> str:
    """Return the timm name for `name`, or raise UnknownModelError listing close matches."""
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    if timm.is_model(name):
        return name
    candidates = list(SHORT_NAMES) + list(PROXY_MODELS) + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise UnknownModelError(
        f"unknown model '{name}'.{hint} Valid: {', '.join(SHORT_NAMES)}, evit_m0..evit_m5, proxies (deit_proxy, "
        f"swin_proxy, evit_m0_proxy..evit_m5_proxy), an evit config file (.yaml/.json), or any name from "
        f"timm.list_models()."
    )


def create_model(name: str, img_size: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """Create a model from a short name, a proxy, an evit config file, or a timm name (kwargs go to timm);
    `img_size` goes only to models whose constructor takes one (read from it: see takes_img_size)."""
    if img_size is not None and takes_img_size(name, **kwargs):
        kwargs["img_size"] = img_size
    return _create(name, **kwargs)


def takes_img_size(name: str, **kwargs: Any) -> bool:
    """Whether model `name`'s constructor has an img_size parameter (ViTs, Swin, LeViT, evit: their token grids
    depend on it); size-agnostic models (most CNNs) have none. Read from the signatures along the class's
    bases while each passes **kwargs on, on a meta-device skeleton; evit takes it as a config field."""
    model = skeleton(name, **kwargs)
    if isinstance(getattr(model, "config", None), evit.EfficientViTConfig):
        return True
    for cls in type(model).__mro__:
        if cls is nn.Module:
            break
        if "__init__" not in vars(cls):
            continue
        parameters = inspect.signature(cls.__init__).parameters
        if "img_size" in parameters:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            break
    return False


def _create(name: str, **kwargs: Any) -> nn.Module:
    if name in PROXY_MODELS:
        timm_name, proxy_kwargs = PROXY_MODELS[name]
        return timm.create_model(timm_name, **{"num_classes": PROXY_NUM_CLASSES, **proxy_kwargs, **kwargs})
    if is_config_file(name):
        return timm.create_model("evit_custom", config=read_config(name), **kwargs)
    return timm.create_model(resolve_model_name(name), **kwargs)


def model_img_size(model: nn.Module) -> int:
    """The input size a model was built for (evit config, timm patch embed, else its pretrained cfg)."""
    config = getattr(model, "config", None)
    if isinstance(config, evit.EfficientViTConfig):
        return config.img_size
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        return size if isinstance(size, int) else size[-1]
    return resolve_model_data_config(model)["input_size"][-1]
