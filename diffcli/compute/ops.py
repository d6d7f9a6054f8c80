"""The quantized ops the model calls. The model never asks which backend ran.

Legend: T tokens (rows of x), K in-features, N out-features, E experts, A active experts per
token, F expert width.

Backends (see backend.py): `triton` (fused dequant+matmul kernels in diffcli.kernels),
`native` (C++ library, CPU), `torch` (dequantize, then matmul; always available).

Every op falls back to dequantize -> matmul for a weight type no fused kernel of the chosen
backend takes, and `dequantize` falls back to the torch reference decoder of quants.FORMATS, so
every type with a decoder runs on every backend: `RUNNABLE_TYPES`, the one list that `load`
(model/weights.py) and `diffcli inspect` check files against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..gguf import quants
from ..gguf.qtensor import QTensor
from .backend import backend_for

RUNNABLE_TYPES: frozenset[str] = quants.SUPPORTED_TYPES


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    device = torch.device(device) if device is not None else qt.raw.device
    raw = qt.raw if qt.raw.device == device else qt.raw.to(device)
    backend = backend_for(device.type)
    if backend == "triton" and qt.qtype in quants.TRITON_TYPES:
        from ..kernels.dequant import dequantize_triton
        out = dequantize_triton(raw, qt.qtype, qt.numel, dtype)
    elif backend == "native" and device.type == "cpu" and _native_supports(qt.qtype):
        from . import native
        out = native.dequantize(QTensor(raw, qt.qtype, qt.shape, qt.name)).to(dtype)
    else:
        out = quants.dequantize_torch(raw, qt.qtype).to(dtype)
    return out.view(qt.shape)


def _native_supports(qtype: str) -> bool:
    from . import native
    return native.supports(qtype)


def qlinear(x: torch.Tensor, w: QTensor | torch.Tensor) -> torch.Tensor:
    """x [T, K] @ w[N, K].T -> [T, N]; w stays quantized where a backend can use it so."""
    if isinstance(w, torch.Tensor):
        return x @ w.t()
    backend = backend_for(x.device.type)
    if backend == "triton":
        from ..kernels import qmatmul as fused
        if w.qtype in fused.SUPPORTED:
            from ..kernels import select          # today's kernel, or the one measured faster
            return select.qmatmul(x, w)
    if backend == "native":
        from . import native
        if native.supports(w.qtype, x.dtype):
            return native.qmatmul(x, w)
    return x @ dequantize(w, x.dtype, x.device).t()


def qlinear_float(x: torch.Tensor, w: QTensor | torch.Tensor) -> torch.Tensor:
    """qlinear(x, w).float(): the product rounded to x's dtype, returned as fp32 (the head's
    logits). On the native backend with bf16 x the kernel's fp32 result is rounded in place
    instead of narrowed to a bf16 tensor and widened back (two [C, V] copies)."""
    if isinstance(w, QTensor) and x.dtype == torch.bfloat16 and backend_for(x.device.type) == "native":
        from . import elementwise, native
        if native.supports(w.qtype, x.dtype):
            return elementwise.round_bf16_(native.qmatmul(x, w, out_dtype=torch.float32))
    return qlinear(x, w).float()


def moe_experts(x: torch.Tensor, gate_up: QTensor | torch.Tensor, down: QTensor | torch.Tensor,
                ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Routed experts: out[t] = sum_a weights[t,a] * down_e(gelu(gate_e(x_t)) * up_e(x_t)).

    x [T, K]; gate_up [E, 2F, K] (rows 0..F-1 gate, F..2F-1 up); down [E, K, F];
    ids, weights [T, A] (weights already renormalised and scaled per expert). Returns [T, K].
    """
    backend = backend_for(x.device.type)
    if backend == "triton" and isinstance(gate_up, QTensor) and isinstance(down, QTensor):
        from ..kernels import qmatmul as fused
        if gate_up.qtype in fused.SUPPORTED and down.qtype in fused.SUPPORTED:
            from ..kernels import select
            return select.moe(x, gate_up, down, ids, weights)
    if backend == "native" and isinstance(gate_up, QTensor) and isinstance(down, QTensor):
        from . import native
        if native.supports(gate_up.qtype, x.dtype) and native.supports(down.qtype, x.dtype):
            return native.moe(x, gate_up, down, ids, weights)
    return moe_torch(x, gate_up, down, ids, weights)


def moe_torch(x, gate_up, down, ids, weights):
    T, A = ids.shape
    flat = ids.reshape(-1)                                   # [T*A]
    order = torch.argsort(flat, stable=True)
    tok = order // A                                         # token of each sorted pair
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    out = torch.zeros_like(x, dtype=torch.float32)           # [T, K]
    w_sorted = weights.reshape(-1)[order].to(torch.float32)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = tok[start:start + n]
        xs = x[sel]                                          # [n, K]
        gu = qlinear(xs, gate_up[e])                         # [n, 2F]
        g, u = gu.chunk(2, dim=-1)
        h = F.gelu(g, approximate="tanh") * u                # [n, F]
        y = qlinear(h, down[e]).to(torch.float32)            # [n, K]
        out.index_add_(0, sel, y * w_sorted[start:start + n, None])
        start += n
    return out.to(x.dtype)
