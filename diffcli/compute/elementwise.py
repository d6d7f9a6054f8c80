"""The native library's element-wise and row-wise passes (kernels/native/norm.cpp and the softcap
of vocab.cpp): RMSNorm fused with the residual add, layer scale or RoPE around it, the unfused
step's softcap, and bf16 rounding in place. diffcli.model.layers calls them on the native CPU
backend in place of the torch compositions they reproduce (tests/test_native_norm.py).
"""
from __future__ import annotations

import torch

from .native import _call, _f32


def _rows(x: torch.Tensor, d: int) -> torch.Tensor:
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu" or x.shape[-1] != d:
        raise ValueError(f"rms: expected a CPU fp32 or bf16 tensor with {d} values per row, "
                         f"got {x.dtype} {list(x.shape)} on {x.device}")
    return x.detach().contiguous()


def _norm_weight(weight: torch.Tensor | None, d: int):
    if weight is None:
        return None, None
    w = _f32(weight)
    if w.numel() != d:
        raise ValueError(f"rms: weight has {w.numel()} values, rows have {d}")
    return w, w.data_ptr()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
             x2: torch.Tensor | None = None, add: torch.Tensor | None = None,
             scale: float = 1.0) -> torch.Tensor:
    """(add +) rms(x (+ x2)) (* weight), then (* scale), over the last axis, in x's dtype (fp32
    or bf16; x2 and add of the same dtype and shape), rounded at each step as torch's composition
    of those ops (dn_rms_norm): one pass over each row instead of about eight."""
    d = x.shape[-1]
    xs = _rows(x, d)
    others = [None if t is None else _rows(t, d) for t in (x2, add)]
    for t in others:
        if t is not None and (t.shape != xs.shape or t.dtype != xs.dtype):
            raise ValueError(f"rms: {list(t.shape)} {t.dtype} does not match x {list(xs.shape)} {xs.dtype}")
    w, wp = _norm_weight(weight, d)
    out = torch.empty_like(xs)
    _call("dn_rms_norm", xs.data_ptr(), others[0].data_ptr() if others[0] is not None else None,
          xs.numel() // d, d, int(xs.dtype == torch.bfloat16), wp, float(eps),
          others[1].data_ptr() if others[1] is not None else None, float(scale), out.data_ptr())
    return out


def rms_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
             sin: torch.Tensor) -> torch.Tensor:
    """rms(x) (* weight) over the heads of x [T, heads, D], then rotary: y * cos + rotate_half(y)
    * sin with cos, sin [T, D] (or [T, 1, D]) fp32, in x's dtype, rounded as torch's composition
    (the norm to x's dtype, the rotary in fp32; dn_rms_rope)."""
    if x.dim() != 3:
        raise ValueError(f"rms_rope: x must be [T, heads, D], got {list(x.shape)}")
    T, heads, d = x.shape
    if d % 2:
        raise ValueError(f"rms_rope: rows of {d} values; rotary needs an even number")
    xs = _rows(x, d)
    c, s = (_f32(t).reshape(-1, d) for t in (cos, sin))
    if c.shape[0] != T or s.shape[0] != T:
        raise ValueError(f"rms_rope: rotary tables {list(cos.shape)} do not fit x {list(x.shape)}")
    w, wp = _norm_weight(weight, d)
    out = torch.empty_like(xs)
    _call("dn_rms_rope", xs.data_ptr(), T, heads, d, int(xs.dtype == torch.bfloat16), wp, float(eps),
          c.data_ptr(), s.data_ptr(), out.data_ptr())
    return out


def softcap_(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap) in place on a contiguous fp32 CPU tensor (dn_softcap: the exp-based
    tanh of dn_vocab, one pass); returns it."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or not logits.is_contiguous():
        raise ValueError(f"softcap_: needs a contiguous fp32 CPU tensor, got {logits.dtype} on {logits.device}")
    _call("dn_softcap", logits.data_ptr(), logits.numel(), float(cap))
    return logits


def round_bf16_(y: torch.Tensor) -> torch.Tensor:
    """A contiguous fp32 CPU tensor rounded to bf16 values in place (dn_round_bf16): the values of
    y.to(torch.bfloat16).float(), in one pass and no copy; returns y."""
    if y.dtype != torch.float32 or y.device.type != "cpu" or not y.is_contiguous():
        raise ValueError(f"round_bf16_: needs a contiguous fp32 CPU tensor, got {y.dtype} on {y.device}")
    _call("dn_round_bf16", y.data_ptr(), y.numel())
    return y
