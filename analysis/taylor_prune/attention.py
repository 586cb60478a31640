"""The base of the attention modules that builders put in place of a family's own."""
from __future__ import annotations

import torch
import torch.nn as nn


class PrunedAttention(nn.Module):
    """An attention with its Q/K and V channels in layers of their own (so that Q/K and V are separate groups),
    which tells the MAC counter the size of its two matmuls: a subclass sets `num_heads`, implements
    `matmul_channels` and calls `record(q, k)` in its forward with the heads' queries and keys, (..., heads,
    tokens, dim)."""

    num_heads: int
    geometry: tuple[int, int] = (0, 0)

    def matmul_channels(self) -> int:
        """Q/K plus V channels over all heads: each costs one multiply-add per query and key (q @ k^T, attn @ v)."""
        raise NotImplementedError

    def record(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Remember (query rows per head over the whole input: batch, windows and queries; keys per query)."""
        self.geometry = (q.numel() // (q.shape[-1] * self.num_heads), k.shape[-2])
