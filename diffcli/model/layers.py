"""The model's functional building blocks: RMSNorm (with the residual add, layer scale or RoPE
that follows it), attention (scale 1.0, grouped KV heads), the logit softcap and the rotate-half
RoPE helper. Stateless; diffcli.model composes them into the encoder and decoder passes.

Legend: T queries, L keys, Nq query heads, Nkv KV heads, D head dim, G = Nq / Nkv.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..compute import elementwise, native
from ..compute.backend import backend_for, cpu_has_bf16


def _native_rows(x: torch.Tensor) -> bool:
    """Whether the native library's fused norms take x: a CPU fp32/bf16 tensor under the native
    backend. They round where the torch composition below rounds; only the order of the mean's
    sum differs (tests/test_native_norm.py)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) \
        and backend_for("cpu") == "native" and native.available()


def rms(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *,
        plus: torch.Tensor | None = None, residual: torch.Tensor | None = None,
        scale: float = 1.0) -> torch.Tensor:
    """RMSNorm in float32, eps inside the mean (spec §B.1), in x's dtype: rms(x (+ plus)) (* weight),
    then (residual +) and (* scale), each step rounded to x's dtype as these torch ops round.
    F.rms_norm is the same formula and a single fused kernel on GPU; on the CPU the native
    library does the whole chain in one pass over each row (a layer runs a dozen of these)."""
    if _native_rows(x):
        return elementwise.rms_norm(x, weight, eps, x2=plus, add=residual, scale=scale)
    s = x if plus is None else x + plus
    y = F.rms_norm(s.float(), s.shape[-1:], weight, eps).to(x.dtype)
    if residual is not None:
        y = residual + y
    return y if scale == 1.0 else y * scale


def rms_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
             sin: torch.Tensor) -> torch.Tensor:
    """rms(x, weight) over the heads of x [T, heads, D], then RoPE in float32 (cos, sin [T, 1, D]),
    in x's dtype: the q and k of a layer."""
    if _native_rows(x):
        return elementwise.rms_rope(x, weight, eps, cos, sin)
    y = rms(x, weight, eps).float()
    return (y * cos + rotate_half(y) * sin).to(x.dtype)


# Query rows per block of a masked CPU attention: at a prefill chunk's shapes (1,024 queries,
# up to 2,048 keys, real head dims) 128 was 2.1-2.3x the unblocked product on sliding layers and
# 1.6x on full ones (Zen 3, 2 threads), 256 a little less.
QUERY_BLOCK = 128


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
    """Attention with scale 1.0: q [T, Nq, D], k/v [Nkv, L, D] (query head h reads KV head
    h // (Nq/Nkv)), mask [T, L] (True = may attend) or None -> [T, Nq*D].

    SDPA, except on the CPU at head dims >= 256 (the real model's 256 and 512), where torch's CPU
    flash kernel is 1.1-2.8x slower than two batched matmuls around a float32 softmax (measured
    at T=256, L=1279..2304); the group's query heads are stacked so each KV head is read once.
    On CUDA at head dims > 256 (the global layers' 512) the KV heads are expanded to the query
    heads first: SDPA's fused kernels do not take grouped heads above 256, and with
    `enable_gqa` it silently falls back to its math kernel (float32 GEMMs and a materialised
    score matrix), as transformers found for Gemma 4 (huggingface/transformers#46960).

    bf16 on a CPU without bf16 dot products (AVX2-only): those matmuls run in float32 and only
    the result is rounded to bf16. torch's bf16 bmm has no fast kernel there: at the real shapes
    it took 10.6 s of a 20.4 s step on a Zen 3, against 0.25 s in float32.

    With a mask (the encoder's causal and sliding-window ones) the queries go QUERY_BLOCK rows at
    a time, each against only the key columns from the first to the last that one of its rows may
    attend: a prefill chunk's causal half and the keys outside a sliding window are never scored.
    The skipped columns' scores would be -inf, so the result is the same computation up to the
    order of the fp32 sums."""
    T, Nq, D = q.shape
    if q.device.type != "cpu" or D < 256:
        return sdpa(q, k, v, mask, expand_kv=q.device.type == "cuda" and D > 256)
    out = q.dtype
    if out == torch.bfloat16 and not cpu_has_bf16():
        q, k, v = q.float(), k.float(), v.float()
    if mask is None or T <= QUERY_BLOCK:
        return _attend(q, k, v, mask).to(out)
    return torch.cat([_attend_span(q[a:a + QUERY_BLOCK], k, v, mask[a:a + QUERY_BLOCK])
                      for a in range(0, T, QUERY_BLOCK)]).to(out)


def _attend_span(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`_attend` on the key columns between the first and the last that a row of mask allows."""
    cols = mask.any(0).nonzero()
    if cols.numel() == 0:                    # nothing to attend: as the unblocked product does
        return _attend(q, k, v, mask)
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    return _attend(q, k[:, lo:hi], v[:, lo:hi], mask[:, lo:hi])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """attention's two batched matmuls around a float32 softmax, in q's dtype: [T, Nq*D]."""
    T, Nq, D = q.shape
    Nkv, L = k.shape[0], k.shape[1]
    G = Nq // Nkv
    s = torch.bmm(q.transpose(0, 1).reshape(Nkv, G * T, D), k.transpose(1, 2)).float()  # [Nkv, G*T, L]
    if mask is not None:
        s.view(Nkv, G, T, L).masked_fill_(~mask, float("-inf"))
    a = torch.bmm(torch.softmax(s, dim=-1).to(v.dtype), v)            # [Nkv, G*T, D]
    return a.view(Nq, T, D).transpose(0, 1).reshape(T, Nq * D)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         expand_kv: bool = False) -> torch.Tensor:
    """`attention` through F.scaled_dot_product_attention: grouped heads passed as they are
    (`enable_gqa`), or with `expand_kv` each KV head repeated for its G query heads first."""
    T, Nq, D = q.shape
    Nkv, L = k.shape[0], k.shape[1]
    if expand_kv and Nq != Nkv:
        G = Nq // Nkv
        k = k[:, None].expand(Nkv, G, L, D).reshape(Nq, L, D)          # [Nq, L, D]
        v = v[:, None].expand(Nkv, G, L, D).reshape(Nq, L, D)
    a = F.scaled_dot_product_attention(                                # [1, Nq, T, D]
        q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, scale=1.0,
        enable_gqa=Nq != k.shape[0])
    return a[0].transpose(0, 1).reshape(T, Nq * D)


def softcap_(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap), in place on a float32 tensor. On the native backend one pass of
    the library's exp-based tanh (elementwise.softcap_); elsewhere written as 2cap *
    sigmoid(2x/cap) - cap (the same function; within ~4e-6 of torch.tanh at cap 30): torch's CPU
    tanh is ~10x slower than its sigmoid, and this runs on every [C, V] step."""
    if _native_rows(logits) and logits.dtype == torch.float32 and logits.is_contiguous():
        return elementwise.softcap_(logits, cap)
    return logits.mul_(2.0 / cap).sigmoid_().mul_(2.0 * cap).sub_(cap)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
