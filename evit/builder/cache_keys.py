"""Cache keys: one short hash of what determines a cached result, so that the same inputs find it again and any
other input misses it. One formula for every cache of the project: trained proxies (`zoo`), training runs
(`launch`), prunings (`prune_study`), latency tables (`analysis.taylor_prune.latency`) and deploy choices
(`fast_path`); in the builder because the deploy path, which may import nothing of the rest, keys its cache too."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Union

import torch

LENGTH = 12  # hex digits: enough to tell apart the runs one cache folder holds


def key_of(parts: object) -> str:
    """A short hash of `parts` as JSON (dict keys sorted; what JSON cannot hold, by its str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:LENGTH]


def file_key(path: Union[str, Path]) -> str:
    """A hash of a file's bytes: a file written again with other content is another input."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tensors_key(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short hash of named tensors' values (a model's state dict): retrained weights are another input."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:LENGTH]
