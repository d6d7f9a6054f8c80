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
