"""The EfficientViT builder (Liu et al., CVPR 2023): configs, the model, BN folding, weight conversion and the deploy
path. It imports nothing of the rest of the project; `evit` re-exports its API.
"""
from .config import PAPER, PRESETS, ConfigError, EfficientViTConfig, get_preset
from .convert import from_official, from_timm, load_checkpoint, to_official, to_timm
from .fast_path import DEPLOY_BACKENDS, DEPLOY_CANDIDATES, DeployChoice, deploy
from .efficientvit import (
    CascadedGroupAttention,
    EfficientViT,
    EfficientViTBlock,
    MultiHeadSelfAttention,
    create_evit,
    fuse,
)

__all__ = [
    "PAPER", "PRESETS", "ConfigError", "EfficientViTConfig", "get_preset",
    "from_official", "from_timm", "load_checkpoint", "to_official", "to_timm",
    "CascadedGroupAttention", "EfficientViT", "EfficientViTBlock", "MultiHeadSelfAttention",
    "DEPLOY_BACKENDS", "DEPLOY_CANDIDATES", "DeployChoice", "create_evit", "deploy", "fuse",
]
