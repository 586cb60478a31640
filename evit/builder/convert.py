"""Weight conversion between evit, timm's port (`efficientvit_m*`) and the official Microsoft checkpoints.

* timm: evit keeps timm's state-dict names for the paper's layout, so conversion only unwraps checkpoints and
  drops the derived `attention_bias_idxs` buffers.
* official (microsoft/Cream, EfficientViT/classification/model/efficientvit.py): `patch_embed.{0,2,4,6}.c/bn`,
  stages flattened into `blocks1`, `blocks2`, `blocks3` (a stage's subsample first: `.0` DW+FFN residuals,
  `.1` PatchMerging, `.2` DW+FFN residuals, then its blocks), conv `c`, linear `l`, heads `head`/`head_dist`.
  Released checkpoints hold the weights under the key `model`.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
from timm.layers import resize_rel_pos_bias_table_levit

from .io import read_checkpoint

StateDict = dict[str, torch.Tensor]

_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
_RENAME_TO_EVIT = {"c": "conv", "l": "linear"}
_RENAME_TO_OFFICIAL = {v: k for k, v in _RENAME_TO_EVIT.items()}
_SUBSAMPLE_PARTS = ("res1", "patchmerge", "res2")


def unwrap(checkpoint: Mapping) -> StateDict:
    """The tensors of a checkpoint: unwrap {'model': ...} style dicts and strip DDP's `module.` prefix."""
    for key in _WRAPPER_KEYS:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    return {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def _drop_derived(state_dict: StateDict) -> StateDict:
    return {k: v for k, v in state_dict.items() if not k.endswith("attention_bias_idxs")}


def from_timm(state_dict: Mapping) -> StateDict:
    """timm `efficientvit_m*` state dict -> evit state dict."""
    return _drop_derived(unwrap(state_dict))


def to_timm(state_dict: Mapping) -> StateDict:
    """evit state dict -> timm `efficientvit_m*` state dict (for paper-layout configs)."""
    return _drop_derived(unwrap(state_dict))


def is_official(state_dict: Mapping) -> bool:
    return any(re.match(r"blocks\d+\.", k) for k in state_dict)


def _rename_parts(key: str, table: Mapping[str, str]) -> str:
    return ".".join(table.get(part, part) for part in key.split("."))


def from_official(state_dict: Mapping) -> StateDict:
    """Official Microsoft checkpoint (or its state dict) -> evit state dict."""
    out: StateDict = {}
    for key, value in _drop_derived(unwrap(state_dict)).items():
        key = _rename_parts(key, _RENAME_TO_EVIT)
        if m := re.match(r"patch_embed\.(\d+)\.(.*)", key):
            key = f"patch_embed.conv{int(m[1]) // 2 + 1}.{m[2]}"
        elif m := re.match(r"blocks(\d+)\.(\d+)\.(.*)", key):
            stage, index, rest = int(m[1]) - 1, int(m[2]), m[3]
            if stage > 0 and index < len(_SUBSAMPLE_PARTS):
                key = f"stages.{stage}.downsample.{_SUBSAMPLE_PARTS[index]}.{rest}"
            else:
                key = f"stages.{stage}.blocks.{index - (len(_SUBSAMPLE_PARTS) if stage > 0 else 0)}.{rest}"
        out[key] = value
    return out


def to_official(state_dict: Mapping) -> StateDict:
    """evit state dict -> official Microsoft layout (as the official model's `load_state_dict` expects)."""
    out: StateDict = {}
    for key, value in _drop_derived(unwrap(state_dict)).items():
        if m := re.match(r"patch_embed\.conv(\d+)\.(.*)", key):
            key = f"patch_embed.{(int(m[1]) - 1) * 2}.{m[2]}"
        elif m := re.match(r"stages\.(\d+)\.downsample\.(\w+)\.(.*)", key):
            key = f"blocks{int(m[1]) + 1}.{_SUBSAMPLE_PARTS.index(m[2])}.{m[3]}"
        elif m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", key):
            stage = int(m[1])
            key = f"blocks{stage + 1}.{int(m[2]) + (len(_SUBSAMPLE_PARTS) if stage > 0 else 0)}.{m[3]}"
        out[_rename_parts(key, _RENAME_TO_OFFICIAL)] = value
    return out


def resize_attention_biases(state_dict: StateDict, target: Mapping[str, torch.Tensor]) -> StateDict:
    """Resample each attention-bias table whose window size differs from `target`'s (bicubic, per head)."""
    out = dict(state_dict)
    for key, value in state_dict.items():
        if key.endswith("attention_biases") and key in target and value.shape != target[key].shape:
            heads, size = target[key].shape
            out[key] = resize_rel_pos_bias_table_levit(value.T, (size, heads)).T.contiguous()
    return out


def normalize_state_dict(checkpoint: Mapping, model: Optional[torch.nn.Module] = None) -> StateDict:
    """Any evit/timm/official checkpoint -> evit state dict; with `model`, bias tables are resized to fit it."""
    state_dict = unwrap(checkpoint)
    state_dict = from_official(state_dict) if is_official(state_dict) else from_timm(state_dict)
    if model is not None:
        state_dict = resize_attention_biases(state_dict, model.state_dict())
    return state_dict


def load_checkpoint(model: torch.nn.Module, path: str, strict: bool = True) -> torch.nn.Module:
    """Load an evit, timm or official checkpoint file into `model` (bias tables resized to its windows)."""
    model.load_state_dict(normalize_state_dict(read_checkpoint(path), model), strict=strict)
    return model
