"""Fused dequant+matmul (kernels/qmatmul.py) against gguf-py's dequantizer followed by a float64 matmul.

Runs under TRITON_INTERPRET=1 on CPU (set before triton is imported); the GPU test runs the same
comparison at a real layer shape when CUDA is present.
"""
import os

import torch

# without a GPU the kernels run in Triton's interpreter on CPU tensors; it must be on before the
# kernels are defined (import time)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diffcli.gguf.qtensor import QTensor  # noqa: E402
from diffcli.kernels.qmatmul import qmatmul  # noqa: E402

from _qblocks import random_blocks, reference  # noqa: E402

# per-dtype tolerance on ||y - ref|| / ||ref||: fp32 is exact products summed in fp32; bf16/fp16
# round the decoded weight and the output
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# K as each type needs: multiples of 256 for K-quants; for 32-value blocks an odd count of blocks
# so the last K-tile is partial (704 = 22 blocks, like the real expert down-projection)
SHAPES = {"Q8_0": (24, 704), "Q5_0": (24, 352), "Q4_K": (40, 512), "Q6_K": (40, 512)}


def _check(qtype, T, dtype, device, N=None, K=None, seed=0):
    rng = np.random.default_rng(seed)
    N0, K0 = SHAPES[qtype]
    N, K = N or N0, K or K0
    raw = random_blocks(qtype, (N, K), rng)
    w = reference(raw, qtype, (N, K)).double()
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(seed)).to(dtype)
    qt = QTensor(torch.from_numpy(raw).to(device), qtype, (N, K), "w")
    y = qmatmul(x.to(device), qt)
    assert y.shape == (T, N) and y.dtype == dtype
    ref = x.double() @ w.t()
    y = y.double().cpu()
    assert torch.isfinite(y).all()
    err = ((y - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"{qtype} T={T} {dtype}: relative error {err:.2e}"


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_qmatmul_fp32_matches_gguf(qtype, T):
    _check(qtype, T, torch.float32, DEVICE, seed=T)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qmatmul_half_matches_gguf(qtype, dtype):
    _check(qtype, 7, dtype, DEVICE, seed=3)


def test_qmatmul_rejects_bad_inputs():
    rng = np.random.default_rng(0)
    raw = torch.from_numpy(random_blocks("Q8_0", (8, 64), rng)).to(DEVICE)
    with pytest.raises(AssertionError, match="does not match"):
        qmatmul(torch.randn(2, 32, device=DEVICE), QTensor(raw, "Q8_0", (8, 64)))
    with pytest.raises(AssertionError, match="bytes"):
        qmatmul(torch.randn(2, 64, device=DEVICE), QTensor(raw[:-34], "Q8_0", (8, 64)))
    with pytest.raises(AssertionError, match="2-D"):
        qmatmul(torch.randn(2, 64, device=DEVICE).int(), QTensor(raw, "Q8_0", (8, 64)))


@pytest.mark.gpu
@pytest.mark.parametrize("qtype,N,K", [("Q4_K", 2048, 2816), ("Q6_K", 2048, 2816),
                                       ("Q5_0", 2816, 2112), ("Q8_0", 2816, 704)])
def test_qmatmul_gpu_real_shapes(qtype, N, K):
    _check(qtype, 256, torch.bfloat16, "cuda", N=N, K=K)


@pytest.mark.parametrize("qtype,dt", [("F16", torch.float16), ("BF16", torch.bfloat16),
                                      ("F32", torch.float32)])
def test_qmatmul_float_weights_unaligned_view(qtype, dt):
    # float weights come as byte views of the mmap, possibly at an offset no dtype view accepts
    w = torch.randn(8, 64).to(dt)
    raw = torch.cat([torch.zeros(2, dtype=torch.uint8), w.view(torch.uint8).reshape(-1)])[2:]
    x = torch.randn(3, 64)
    y = qmatmul(x.to(DEVICE), QTensor(raw.to(DEVICE), qtype, (8, 64))).cpu()
    torch.testing.assert_close(y, x @ w.float().t(), rtol=1e-5, atol=1e-5)
