"""evit: a parameterized EfficientViT builder (Liu et al., CVPR 2023), and the library the analyses and studies
stand on: data (`evit.data`), model names and weights (`evit.models`, `evit.zoo`), the training loop with
distillation (`evit.train`, `evit.distillation`), the launcher (`evit.launch`), timing, and the command plumbing
(`evit.cli`). The builder itself is `evit.builder`, and imports nothing of the rest.

`import evit` registers `evit_m0` .. `evit_m5` and `evit_custom` with timm:

    model = timm.create_model('evit_m0', num_classes=10)
    model = timm.create_model('evit_custom', config=evit.get_preset('m4').replace(mixers='mhsa'))
    deployed = evit.fuse(model)                      # BN folded: same outputs, fewer ops
    fastest = evit.deploy(model, example_batch)      # fused, then the fastest path timed on this machine
"""
from .builder import *  # noqa: F401,F403  (the builder's API is the package's: evit.fuse, evit.get_preset, ...)
from .builder import __all__

__version__ = "0.1.0"
