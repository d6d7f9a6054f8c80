"""Triton dequantisers (kernels/dequant.py) against gguf-py and the torch reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET must be on
before any kernel is defined (import time), so it is set at the top of this module. With CUDA the
same checks run on the device.

fp32 output must be bit-exact. fp16 output must equal the reference rounded to fp16, and so must
bf16 on the GPU; Triton 3.9's interpreter truncates to bf16 instead of rounding, so there bf16 is
allowed one ulp.
"""
import importlib
import os
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":   # before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "diffcli.kernels.dequant" in sys.modules:   # defined earlier, maybe without the interpreter
        importlib.reload(sys.modules["diffcli.kernels.dequant"])

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diffcli.gguf import quants  # noqa: E402
from diffcli.compute.backend import set_backend  # noqa: E402
from diffcli.kernels.dequant import KERNEL_TYPES, LAYOUT, dequantize_triton  # noqa: E402
from diffcli.compute.ops import dequantize  # noqa: E402
from diffcli.gguf.qtensor import QTensor  # noqa: E402

from _quantblocks import assert_bit_exact, blocks_from_bytes, oracle  # noqa: E402

TYPES = sorted(KERNEL_TYPES)
# (rows, blocks per row): one block; many short rows; a non-power-of-two row count whose total
# leaves the last program partly empty (4096 values per program)
SHAPES = [(1, 1), (37, 1), (5, 3), (3, 23)]


def _raw(qtype, rows, blocks_per_row, seed=0):
    rng = np.random.default_rng(seed)
    raw = blocks_from_bytes(qtype, rows * blocks_per_row, rng)
    per = LAYOUT[qtype][0]
    return raw.reshape(-1), rows * blocks_per_row * per


def test_triton_types_are_the_kernels():
    assert quants.TRITON_TYPES == KERNEL_TYPES
    for name, (per, tsize, _) in LAYOUT.items():
        assert (per, tsize) == (quants.block_size(name), quants.type_size(name))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("qtype", TYPES)
def test_fp32_bit_exact(qtype, shape):
    raw, numel = _raw(qtype, *shape)
    got = dequantize_triton(torch.from_numpy(raw).to(DEVICE), qtype, numel)
    assert got.shape == (numel,) and got.dtype == torch.float32
    assert_bit_exact(got, oracle(raw, qtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # large values -> fp16 inf
@pytest.mark.parametrize("qtype", TYPES)
def test_half_outputs_round_the_reference(qtype):
    raw, numel = _raw(qtype, 3, 5, seed=1)
    ref = quants.dequantize_torch(torch.from_numpy(raw), qtype)
    dev = torch.from_numpy(raw).to(DEVICE)
    f16 = dequantize_triton(dev, qtype, numel, torch.float16).cpu()
    assert torch.equal(f16, ref.half())
    bf16 = dequantize_triton(dev, qtype, numel, torch.bfloat16).cpu()
    ulps = (bf16.view(torch.int16).int() - ref.bfloat16().view(torch.int16).int()).abs()
    assert ulps.max() <= (0 if DEVICE == "cuda" else 1)


def test_2d_input_and_float_types():
    raw, numel = _raw("Q6_K", 4, 2)
    rows = torch.from_numpy(raw).view(4, -1).to(DEVICE)
    assert_bit_exact(dequantize_triton(rows, "Q6_K", numel), oracle(raw, "Q6_K"))
    x = torch.randn(3, 64).to(DEVICE)
    for qtype, dt in (("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16)):
        got = dequantize_triton(x.to(dt).view(torch.uint8), qtype, x.numel())
        assert torch.equal(got, x.to(dt).float().reshape(-1))


def test_launcher_checks_its_inputs():
    raw, numel = _raw("Q8_0", 2, 2)
    t = torch.from_numpy(raw).to(DEVICE)
    with pytest.raises(AssertionError, match="uint8"):
        dequantize_triton(t.to(torch.int8), "Q8_0", numel)
    with pytest.raises(AssertionError, match="contiguous"):
        dequantize_triton(t.view(2, -1)[:, :34], "Q8_0", 64)
    with pytest.raises(AssertionError, match="bytes"):
        dequantize_triton(t[:-34], "Q8_0", numel)
    with pytest.raises(AssertionError, match="whole number"):
        dequantize_triton(t, "Q8_0", numel - 1)
    with pytest.raises(AssertionError, match="out_dtype"):
        dequantize_triton(t, "Q8_0", numel, torch.float64)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_K", "Q6_K"])
def test_ops_dequantize_dispatches_to_triton(qtype):
    """ops.dequantize under the forced triton backend: the model's path, shape included."""
    raw, numel = _raw(qtype, 6, 2, seed=2)
    per = LAYOUT[qtype][0]
    qt = QTensor(torch.from_numpy(raw).to(DEVICE), qtype, (2, 3, 2 * per), "w")
    set_backend("triton")
    try:
        got = dequantize(qt, torch.float32)
    finally:
        set_backend(None)
    assert got.shape == (2, 3, 2 * per)
    assert_bit_exact(got.reshape(-1), oracle(raw, qtype))
