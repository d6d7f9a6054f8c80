"""Grouped MoE kernel (kernels/moe.py) against ops.moe_torch run on gguf-py-dequantized weights.

Random routing over a subset of the experts, so some experts get no tokens and others several
tiles' worth. Interpreter on CPU (TRITON_INTERPRET=1, set before triton is imported); CUDA when present.
"""
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diffcli.compute import ops  # noqa: E402
from diffcli.gguf.qtensor import QTensor  # noqa: E402
from diffcli.kernels.moe import moe_triton, route  # noqa: E402

from _qblocks import random_blocks, reference  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _routing(T, A, E, used, gen):
    experts = torch.randperm(E, generator=gen)[:used]                  # the others get no tokens
    ids = torch.stack([experts[torch.randperm(used, generator=gen)[:A]] for _ in range(T)])
    w = torch.rand(T, A, generator=gen) + 0.1
    return ids, w / w.sum(-1, keepdim=True) * 1.7                     # scaled like per-expert scales


def _check(gu_type, dn_type, T, A, E, K, F, used, dtype, device, seed=0, block_m=None):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    gu_raw = random_blocks(gu_type, (E, 2 * F, K), rng, scale=0.05)
    dn_raw = random_blocks(dn_type, (E, K, F), rng, scale=0.05)
    gu_ref = reference(gu_raw, gu_type, (E, 2 * F, K)).double()
    dn_ref = reference(dn_raw, dn_type, (E, K, F)).double()
    x = torch.randn(T, K, generator=gen).to(dtype)
    ids, w = _routing(T, A, E, used, gen)
    gu = QTensor(torch.from_numpy(gu_raw).to(device), gu_type, (E, 2 * F, K), "gate_up")
    dn = QTensor(torch.from_numpy(dn_raw).to(device), dn_type, (E, K, F), "down")
    y = moe_triton(x.to(device), gu, dn, ids.to(device), w.to(device), block_m=block_m)
    assert y.shape == (T, K) and y.dtype == dtype
    ref = ops.moe_torch(x.double(), gu_ref, dn_ref, ids, w.double())
    y = y.double().cpu()
    assert torch.isfinite(y).all()
    err = ((y - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("gu_type,dn_type", [("Q4_K", "Q5_0"), ("Q4_K", "Q8_0"), ("Q8_0", "Q8_0"),
                                             ("Q6_K", "Q5_0")])
def test_moe_matches_torch(gu_type, dn_type):
    # F = 96: three 32-value blocks, so the down K-tile is partial, like the real 704
    K = 256 if gu_type.endswith("K") else 128
    _check(gu_type, dn_type, T=7, A=3, E=8, K=K, F=96, used=5, dtype=torch.float32, device=DEVICE)


def test_moe_multi_tile_experts_bf16():
    # 33 tokens x 4 over 6 used experts: ~22 pairs per expert -> several BM=16 tiles per expert
    _check("Q4_K", "Q5_0", T=33, A=4, E=8, K=256, F=64, used=6, dtype=torch.bfloat16,
           device=DEVICE, seed=1, block_m=16)


def test_route_tiles_cover_every_pair_once():
    gen = torch.Generator().manual_seed(2)
    ids, _ = _routing(19, 4, 16, 9, gen)
    order, counts, seg_start, tile_start, tile_expert, n_tiles = route(ids, 16, 16)
    assert torch.equal(counts, torch.bincount(ids.reshape(-1), minlength=16))
    assert torch.equal(seg_start, torch.cumsum(counts, 0) - counts)
    seen = []
    for pid in range(n_tiles):
        e = int(tile_expert[pid])
        if e >= 16:
            continue
        first = int(seg_start[e]) + (pid - int(tile_start[e])) * 16
        last = int(seg_start[e] + counts[e])
        for r in range(first, min(first + 16, last)):
            assert int(ids.reshape(-1)[order[r]]) == e
            seen.append(int(order[r]))
    assert sorted(seen) == list(range(19 * 4))


@pytest.mark.gpu
def test_moe_gpu_real_shape():
    # one canvas at the real expert shapes (spec §B.5), top-8 over all 128 experts
    _check("Q4_K", "Q5_0", T=256, A=8, E=128, K=2816, F=704, used=128, dtype=torch.bfloat16,
           device="cuda")
