"""The encoder's KV cache: what the decoder's denoising steps read and the encoder appends to.

Legend: Nkv KV heads, L cached positions of a layer, D head dim, P committed positions, W the
sliding window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Per-layer keys and values of every committed token ([Nkv, L, D] each).

    Global layers keep all P tokens. Sliding layers keep only the last W-1: no later query can
    see further back (an encoder query at position p sees p-W+1..p; the decoder sees the last W-1
    cached keys plus the canvas). Tensors are replaced, never written in place, so `copy()` is a
    cheap snapshot (e.g. to keep a chat prompt's cache across turns).
    """
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    sliding: list[bool]
    window: int
    length: int = 0                      # P: positions 0..P-1 are committed

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        keys = torch.cat([self.keys[layer], k], dim=1)
        values = torch.cat([self.values[layer], v], dim=1)
        if self.sliding[layer]:
            keys, values = keys[:, -(self.window - 1):], values[:, -(self.window - 1):]
        self.keys[layer], self.values[layer] = keys, values

    def copy(self) -> "KVCache":
        return KVCache(list(self.keys), list(self.values), list(self.sliding), self.window,
                       self.length)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
