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

from diffcli.gguf import quants
from diffcli.errors import InputError

from _quantblocks import assert_bit_exact, blocks_from_bytes, blocks_from_halves, oracle

ALL_TYPES = sorted(quants.SUPPORTED_TYPES)


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
        with np.errstate(invalid="ignore", over="ignore"):
            want = oracle(raw, qtype)
        got = quants.dequantize_torch(torch.from_numpy(raw), qtype).numpy()
        assert np.array_equal(got, want, equal_nan=True), qtype


@pytest.mark.parametrize("qtype", ["F32", "BF16", "Q8_0", "Q4_K"])
def test_unaligned_input(qtype):
    """A view that starts at an odd byte (e.g. a slice of a bigger buffer) decodes the same."""
    raw = blocks_from_bytes(qtype, 8, np.random.default_rng(4)).reshape(-1)
    buf = torch.zeros(raw.size + 1, dtype=torch.uint8)
    buf[1:] = torch.from_numpy(raw)
    assert_bit_exact(quants.dequantize_torch(buf[1:], qtype), oracle(raw, qtype))


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
