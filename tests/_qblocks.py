"""Random but valid ggml blocks for kernel tests: random bytes with small finite f16 scales.

The oracle for their values is `gguf.quants.dequantize` (numpy), never our own decoders.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

# byte offsets of the f16 scale fields inside one block, per type
F16_FIELDS = {"Q8_0": (0,), "Q5_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype: str, shape: tuple[int, ...], rng: np.random.Generator,
                  scale: float = 0.02) -> np.ndarray:
    """uint8 [rows*row_bytes] of `qtype` blocks for a tensor of torch-order `shape`."""
    per, bsize = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    n = int(np.prod(shape))
    assert shape[-1] % per == 0
    nblocks = n // per
    raw = rng.integers(0, 256, size=(nblocks, bsize), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        d = (rng.uniform(0.2, 1.0, nblocks) * scale).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(nblocks, 2)
    return raw.reshape(-1)


def reference(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 torch tensor of `shape`, dequantized by gguf-py."""
    per, bsize = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rows = raw.reshape(-1, shape[-1] // per * bsize)
    out = dequantize(rows, GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


def random_routing(T: int, A: int, E: int, used: int, gen: torch.Generator):
    """(ids [T, A], weights [T, A]) for an MoE kernel test: each token picks A distinct experts out
    of `used` (the other experts stay idle), weights positive and summing to 1.3 per token."""
    experts = torch.randperm(E, generator=gen)[:used]
    ids = torch.stack([experts[torch.randperm(used, generator=gen)[:A]] for _ in range(T)])
    w = torch.rand(T, A, generator=gen) + 0.1
    return ids, w / w.sum(-1, keepdim=True) * 1.3
