"""Error bounds derived from the arithmetic, for tests that compare two floating-point evaluations
of the same quantity: unit roundoff x reduction length x magnitude, never a number read off one
machine's run.

The one result used (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., §3.1,
eq. 3.5): a dot product of length n summed in precision u, in ANY order (pairwise, blocked, split
into partial sums, with or without FMA), satisfies

    |fl(x . y) - x . y|  <=  gamma(n) * sum_i |x_i y_i|,      gamma(n) = n u / (1 - n u).

So two implementations that differ only in summation order (a BLAS against a Triton tile loop, an
AVX-512 kernel against an AMX one, split-K against one pass) differ by at most 2 gamma(n) times
the dot product of the absolute values. The bound depends on the data and the length only, holds
on every machine, and is tight enough to catch any real defect: a dropped tile, a wrong scale or
an input read in a lower precision moves the result by O(|x| |y|) or by that precision's u,
which for the lengths tested here (n <= a few thousand) is far above n u(fp32) ~ 1e-4.
"""
from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24,
                 torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u: half the distance from 1 to the next float of `dtype` (round to nearest)."""
    return UNIT_ROUNDOFF[dtype]


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """gamma(n) = n u / (1 - n u): the relative error bound of an n-term sum or dot product."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, f"{n} terms exceed what gamma bounds in {dtype}"
    return nu / (1 - nu)


def matmul_bound(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype = torch.float32,
                 evaluations: int = 2) -> torch.Tensor:
    """Per-element bound [T, N] (float64) on the difference of two evaluations of x @ w.T
    (x [T, K], w [N, K], exact inputs) accumulated in `dtype`: evaluations * gamma(K) *
    (|x| @ |w|.T). `evaluations=1` when the other side is exact (float64 of the same inputs)."""
    mag = x.double().abs() @ w.double().abs().T
    return evaluations * gamma(x.shape[-1], dtype) * mag


def decode_magnitude(raw: torch.Tensor, qtype: str, shape: tuple[int, int],
                     w: torch.Tensor) -> torch.Tensor:
    """M [N, K] (float64): the magnitude of the terms a kernel adds to decode each weight, so that
    a decoder evaluated in another order (or with the product fused into an FMA, as a C++ compiler
    or the GPU may do) is within 2 u M of the exact weight `w`. One-product formats (q * d,
    (d * sc) * q, the float types) decode to |w| exactly up to that one rounding: M = |w|. Q4_K is
    (d * sc) * q - dmin * m: M = |d sc q| + |dmin m| <= |w| + 2 |dmin m|, dmin and the 6-bit mins
    read from the block bytes (ggml's block_q4_K: f16 d, f16 dmin, 12 scale/min bytes, 128 qs)."""
    M = w.double().abs().reshape(shape)
    if qtype != "Q4_K":
        return M
    N, K = shape
    blocks = raw.reshape(-1, 144).to(torch.int64)                 # [N * K / 256, 144]
    dmin = raw.reshape(-1, 144)[:, 2:4].contiguous().view(torch.float16).double()   # [B, 1]
    s = blocks[:, 4:16]
    mins = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    dm = (dmin * mins.double()).abs().repeat_interleave(32, dim=1)  # [B, 256]
    return M + 2 * dm.reshape(N, K)


def _gelu(v):
    return torch.nn.functional.gelu(v, approximate="tanh")


def moe_exact(x, gu, dn, ids, wts):
    """ops.moe_experts' semantics in float64 on the dequantized weights."""
    F = dn.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for e, wt in zip(ids[t].tolist(), wts[t].double()):
            g, u = (gu[e].double() @ x[t].double()).split(F)
            out[t] += wt * (dn[e].double() @ (_gelu(g) * u))
    return out


def moe_bound(x, gu, dn, ids, wts, M_gu=None, M_dn=None):
    """Per-output bound on |fp32 moe_experts - exact|, from tests/_bounds.py's dot-product bound
    (one evaluation in fp32 against the exact one) carried through each stage:
      g, u = gate/up rows . x:        |dg| <= gamma(K) |G| |x|      (same for u)
      h = gelu(g) u:                  |dh| <= |gelu'| |dg| |u| + |gelu(g)| |du| + gelu's own
                                      evaluation, within 16 u |g| |u| (a libm/SIMD exp or tanh is
                                      within 4 ulps, the half-dozen ops around it add one each)
                                      and |gelu'| <= 1.13 (its maximum)
      y = D . h:                      |dy| <= |D| |dh| + gamma(F) |D| (|h| + |dh|)
      out = sum_a w_a y_a:            |dout| <= sum_a |w_a| (|dy_a| + 2 u |y_a|)
    Second-order terms are kept (|dg| |du| and the (|h| + |dh|) above). M_gu, M_dn (default
    |weights|): decode magnitudes (`decode_magnitude`); a kernel's own decoding adds 2 u M."""
    K, F = x.shape[1], dn.shape[-1]
    u32 = unit_roundoff(torch.float32)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xa = x[t].double().abs()
        for e, wt in zip(ids[t].tolist(), wts[t].double().abs()):
            g, u = (gu[e].double() @ x[t].double()).split(F)
            Mg = gu[e].double().abs() if M_gu is None else M_gu[e]
            dg, du = ((gamma(K) + 2 * u32) * (Mg @ xa)).split(F)
            dh = 1.13 * dg * (u.abs() + du) + _gelu(g).abs() * du + 16 * u32 * g.abs() * u.abs()
            h = (_gelu(g) * u).abs()
            D = dn[e].double().abs()
            Md = D if M_dn is None else M_dn[e]
            y = (dn[e].double() @ (_gelu(g) * u)).abs()
            out[t] += wt * (D @ dh + (gamma(F) + 2 * u32) * (Md @ (h + dh)) + 2 * u32 * y)
    return out
