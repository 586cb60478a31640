"""One place that turns a user's model name into a model: short names, evit presets/configs, any timm name."""
from __future__ import annotations

import difflib
import os
from typing import Any

import timm
import torch.nn as nn

import evit  # noqa: F401  (registers evit_m0..evit_m5 and evit_custom with timm)

# Short names used throughout the paper's analyses.
SHORT_NAMES: dict[str, str] = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
}


class UnknownModelError(ValueError):
    """Raised for a model name that is neither a short name, an evit config file nor a timm model."""


def is_config_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml", ".json")) and os.path.isfile(name)


def resolve_model_name(name: str) -> str:
    """Return the timm name for `name`, or raise UnknownModelError listing close matches."""
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    if timm.is_model(name):
        return name
    candidates = list(SHORT_NAMES) + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise UnknownModelError(
        f"unknown model '{name}'.{hint} Valid: {', '.join(SHORT_NAMES)}, evit_m0..evit_m5, an evit config file "
        f"(.yaml/.json), or any name from timm.list_models()."
    )


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Create a model from a short name, an evit config file, or a timm name (kwargs go to timm.create_model)."""
    if is_config_file(name):
        return timm.create_model("evit_custom", config=evit.EfficientViTConfig.from_file(name), **kwargs)
    return timm.create_model(resolve_model_name(name), **kwargs)
