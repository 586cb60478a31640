"""What several families' builders share: a fused projection cut into separate Linears, heads split off the channel
dim, the Q/K and V groups of an attention with q, k, v and proj Linears, the FFN-hidden group of a plain two-Linear
FFN, and LayerScale factors held as bare parameters."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from analysis.taylor_prune.attention import PrunedAttention
from analysis.taylor_prune.groups import Group, Slice, set_sizes, stage_of, whole
from evit.models import UnsupportedModelError


def split_rows(layer: nn.Linear, biases: Sequence[Optional[torch.Tensor]]) -> list[nn.Linear]:
    """`layer`'s output rows as len(biases) equal Linears (same device and dtype), the i-th with bias `biases[i]`
    (None: no bias): a fused qkv as q, k and v, so that each is a pruning group's own layer."""
    width = layer.out_features // len(biases)
    parts = []
    for i, bias in enumerate(biases):
        part = nn.Linear(layer.in_features, width, bias=bias is not None, device=layer.weight.device,
                         dtype=layer.weight.dtype)
        with torch.no_grad():
            part.weight.copy_(layer.weight[i * width:(i + 1) * width])
            if bias is not None:
                part.bias.copy_(bias)
        parts.append(part)
    return parts


def fused_biases(layer: nn.Linear, parts: int) -> Sequence[Optional[torch.Tensor]]:
    """The bias of each of `parts` equal row blocks of a fused Linear (None each when it has none)."""
    return layer.bias.chunk(parts) if layer.bias is not None else (None,) * parts


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, heads * dim) -> (batch, heads, tokens, dim): channel h * dim + j is dim j of head h."""
    batch, tokens, _ = x.shape
    return x.view(batch, tokens, heads, -1).transpose(1, 2)


def attention_groups(name: str, attn: PrunedAttention) -> list[Group]:
    """The Q/K group (q and k rows, per head) and the V group (v rows, proj columns) of a split attention with
    Linears q, k, v and proj."""
    common = dict(block=name, stage=stage_of(name), width=lambda: attn.q.in_features, heads=attn.num_heads,
                  attention=attn)
    return [Group("qk", count=lambda: attn.q.out_features,
                  layout=lambda: whole(attn.q.out_features, [(attn.q, "out"), (attn.k, "out")]), **common),
            Group("v", count=lambda: attn.v.out_features,
                  layout=lambda: whole(attn.v.out_features, [(attn.v, "out"), (attn.proj, "in")]), **common)]


def ffn_group(name: str, mlp: nn.Module, width: Callable[[], int], between: Sequence[str] = ()) -> Group:
    """The hidden channels of an FFN whose fc1 and fc2 are Linears with one hidden channel each (timm's Mlp without
    a hidden norm; not a gated one): fc1 rows, the rows of the per-channel layers `between` them (PVT-v2's depthwise
    conv), fc2 columns."""
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    plain = isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and fc1.out_features == fc2.in_features
    if not plain or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise UnsupportedModelError(f"{name}.mlp ({type(mlp).__name__}) is not a plain timm Mlp")
    return Group("ffn", block=name, stage=stage_of(name), heads=1, width=width, count=lambda: mlp.fc1.out_features,
                 layout=lambda: whole(mlp.fc1.out_features, [(mlp.fc1, "out"), *((getattr(mlp, n), "out")
                                                                                  for n in between), (mlp.fc2, "in")]))


def layer_scales(block: nn.Module, width: int) -> list[Slice]:
    """The block's LayerScale factors held as bare parameters gamma_1 and gamma_2 (CaiT, BEiT, EVA; absent: none)."""
    return [Slice(block, "last", 0, 0, width, param=p) for p in ("gamma_1", "gamma_2")
            if getattr(block, p, None) is not None]


def block_stream(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """The layers of a (split) pre-norm timm block that read or write the residual stream: norms, q/k/v columns,
    proj rows, LayerScale modules, fc1 columns, fc2 rows."""
    attn, mlp = block.attn, block.mlp
    return [(block.norm1, "out"), (attn.q, "in"), (attn.k, "in"), (attn.v, "in"), (attn.proj, "out"),
            (getattr(block, "ls1", None), "last"), (block.norm2, "out"), (mlp.fc1, "in"), (mlp.fc2, "out"),
            (getattr(block, "ls2", None), "last")]


STREAM_TOKENS = ("cls_token", "dist_token", "reg_token", "pos_embed")      # bare parameters, channels last
STREAM_READERS = (("norm_pre", "out"), ("norm", "out"), ("fc_norm", "out"), ("head", "in"), ("head_dist", "in"))


def stream_width(model: nn.Module, blocks: Callable[[], list[nn.Module]],
                 stream_of: Callable[[nn.Module], list[tuple[nn.Module, str]]] = block_stream) -> list[Group]:
    """The residual-stream width group of a single-width timm ViT (one PatchEmbed, one width from the embedding to
    the classifier): the patch embedding's outputs, the class, distillation and register tokens and the position
    embedding, every one of `blocks()` (`stream_of(block)`: the layers that read or write the stream; LayerScale
    gammas), the norms around the blocks and the classifier(s). None when the patch embedding is not a Conv2d
    (a hybrid stem): the blocks are still pruned, the width is not."""
    if not isinstance(getattr(model.patch_embed, "proj", None), nn.Conv2d):
        return []
    count = lambda: model.patch_embed.proj.out_channels  # noqa: E731

    def layout() -> list[Slice]:
        width = count()
        entries = [(model.patch_embed.proj, "out"), (model.patch_embed.norm, "out")]
        entries += [e for block in blocks() for e in stream_of(block)]
        entries += [(getattr(model, name, None), axis) for name, axis in STREAM_READERS]
        tokens = [Slice(model, "last", 0, 0, width, param=p) for p in STREAM_TOKENS
                  if getattr(model, p, None) is not None]
        return tokens + whole(width, entries) + [s for block in blocks() for s in layer_scales(block, width)]

    def resize(removed: int) -> None:
        set_sizes(model, embed_dim=count(), num_features=count(), head_hidden_size=count())
        for info in getattr(model, "feature_info", None) or []:
            info["num_chs"] = count()

    return [Group("width", block="embed", stage=0, heads=1, width=count, layout=layout, count=count,
                  on_prune=resize)]
