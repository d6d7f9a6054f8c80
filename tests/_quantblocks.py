"""Random but decodable ggml blocks for the dequantiser tests, and gguf-py as their oracle.

Two flavours, as gguf-py's own tests do it: (a) random f16 values reinterpreted as blocks (every
2-byte field is then a finite half), and (b) uniform random bytes with the block's f16 fields
overwritten by finite halves of widely varying magnitude.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

# Byte offsets of the f16 fields in one block, read off the ggml block structs (block_q4_K etc.).
F16_FIELDS = {
    "F16": (0,), "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
    "IQ4_NL": (0,), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2),
    "Q6_K": (208,), "IQ4_XS": (0,),
}


def oracle(raw: np.ndarray, qtype: str) -> np.ndarray:
    qt = GGMLQuantizationType[qtype]
    if qtype == "F32":   # gguf.quants.dequantize returns a view for F32; make it a plain copy
        return raw.view(np.float32).reshape(-1).copy()
    return np.asarray(dequantize(raw, qt), dtype=np.float32).reshape(-1)


def blocks_from_halves(qtype: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    _, tsize = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    n_bytes = n_blocks * tsize
    halves = (rng.standard_normal((n_bytes + 1) // 2) * 4).astype(np.float16)
    return halves.view(np.uint8)[:n_bytes].reshape(n_blocks, tsize).copy()


def blocks_from_bytes(qtype: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    _, tsize = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    raw = rng.integers(0, 256, size=(n_blocks, tsize), dtype=np.uint8)
    if qtype == "F32":   # keep the floats finite so bitwise equality is meaningful
        raw = rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8).reshape(n_blocks, 4)
    if qtype == "BF16":  # the top halves of finite f32s
        top = rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32) >> 16
        raw = top.astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
    for off in F16_FIELDS.get(qtype, ()):
        d = (rng.standard_normal(n_blocks) * 2.0 ** rng.integers(-14, 8, n_blocks))
        raw[:, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw


def assert_bit_exact(got: torch.Tensor, want: np.ndarray) -> None:
    got = got.cpu().numpy()
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.isfinite(want).all()
    bad = got.view(np.uint32) != want.view(np.uint32)
    assert not bad.any(), f"{bad.sum()} of {bad.size} values differ, first at {np.argmax(bad)}"
