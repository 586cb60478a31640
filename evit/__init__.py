"""evit: a parameterized EfficientViT builder (Liu et al., CVPR 2023).

`import evit` registers `evit_m0` .. `evit_m5` and `evit_custom` with timm:

    model = timm.create_model('evit_m0', num_classes=10)
    model = timm.create_model('evit_custom', config=evit.get_preset('m4').replace(mixers='mhsa'))
    deployed = evit.fuse(model)                      # BN folded: same outputs, fewer ops
    fastest = evit.deploy(model, example_batch)      # fused, channels-last, torch.compile (or trace)
"""
from .config import PAPER, PRESETS, ConfigError, EfficientViTConfig, get_preset
from .convert import from_official, from_timm, load_checkpoint, to_official, to_timm
from .fast_path import DEPLOY_BACKENDS, deploy
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
    "DEPLOY_BACKENDS", "create_evit", "deploy", "fuse",
]
__version__ = "0.1.0"
