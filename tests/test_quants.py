"""The torch reference dequantisers against gguf-py (`gguf.quants.dequantize`), bit for bit.

Blocks are random bytes in two flavours, as gguf-py's own tests do it: (a) random f16 values
reinterpreted as blocks (every 2-byte field is then a finite half), and (b) uniform random bytes
with the block's f16 fields overwritten by finite halves. Either way every bit pattern of the
packed quants, scales and signs is exercised.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from diffcli import quants
from diffcli.errors import InputError

# Byte offsets of the f16 fields in one block, read off the ggml block structs (block_q4_K etc.).
F16_FIELDS = {
    "F16": (0,), "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
    "IQ4_NL": (0,), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2),
    "Q6_K": (208,), "IQ4_XS": (0,),
}
ALL_TYPES = sorted(quants.SUPPORTED_TYPES)


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


def test_table_matches_ggml_sizes():
    for name, fmt in quants.FORMATS.items():
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        assert quants.block_size(name) == fmt.block_size
        assert quants.type_size(name) == fmt.type_size
    assert quants.row_bytes("Q4_K", 512) == 288


@pytest.mark.parametrize("make", [blocks_from_halves, blocks_from_bytes])
@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_bit_exact_with_gguf(qtype, make):
    rng = np.random.default_rng(sum(map(ord, qtype + make.__name__)))
    per, _ = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    n_blocks = 97 if per > 1 else 97 * 64
    raw = make(qtype, n_blocks, rng)
    want = oracle(raw, qtype)
    assert_bit_exact(quants.dequantize_torch(torch.from_numpy(raw.reshape(-1)), qtype), want)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_K", "Q6_K", "Q3_K"])
def test_rows_input_and_chunking(qtype, monkeypatch):
    """[rows, row_bytes] input, and tensors bigger than one chunk of blocks."""
    rng = np.random.default_rng(1)
    per, tsize = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    raw = blocks_from_bytes(qtype, 3 * 7, rng).reshape(3, 7 * tsize)   # 3 rows of 7 blocks
    want = oracle(raw, qtype)
    monkeypatch.setattr(quants, "_CHUNK_BLOCKS", 4)
    got = quants.dequantize_torch(torch.from_numpy(raw), qtype)
    assert got.shape == (3 * 7 * per,)
    assert_bit_exact(got, want)


def test_nan_and_inf_scales_propagate_like_gguf():
    """Blocks whose f16 scale is inf/NaN: the same values are non-finite in both (NaN payloads
    may differ, so compare with NaN equality)."""
    rng = np.random.default_rng(2)
    for qtype in ("Q8_0", "Q4_K", "Q6_K", "Q5_0"):
        raw = rng.integers(0, 256, size=(64, quants.type_size(qtype)), dtype=np.uint8)
        want = oracle(raw, qtype)
        got = quants.dequantize_torch(torch.from_numpy(raw), qtype).numpy()
        assert np.array_equal(got, want, equal_nan=True), qtype


def test_unsupported_type_is_a_user_error():
    with pytest.raises(InputError) as err:
        quants.dequantize_torch(torch.zeros(66, dtype=torch.uint8), "IQ2_XXS")
    assert "IQ2_XXS" in err.value.message and "Q4_K_M" in err.value.message
    with pytest.raises(InputError, match="blk.0.attn_q.weight"):
        quants.require_supported("TQ1_0", tensor="blk.0.attn_q.weight", path="m.gguf")


def test_float_types_return_float32_without_surprises():
    x = torch.randn(64)
    assert torch.equal(quants.dequantize_torch(x.view(torch.uint8), "F32"), x)
    h = x.half()
    assert torch.equal(quants.dequantize_torch(h.view(torch.uint8), "F16"), h.float())
    b = x.bfloat16()
    assert torch.equal(quants.dequantize_torch(b.view(torch.uint8), "BF16"), b.float())


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_K", "Q6_K", "BF16"])
def test_reference_runs_on_cuda(qtype):
    rng = np.random.default_rng(3)
    raw = blocks_from_bytes(qtype, 33 if qtype != "BF16" else 33 * 32, rng)
    got = quants.dequantize_torch(torch.from_numpy(raw).cuda(), qtype)
    assert got.device.type == "cuda"
    assert_bit_exact(got, oracle(raw, qtype))
