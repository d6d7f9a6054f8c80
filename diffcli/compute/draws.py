"""Drawing tokens from probabilities in native code: the bf16-mode inverse-CDF draw
(dn_draw_bf16) and an exact replica of torch.multinomial with torch's own CPU generator
(dn_sample), used when the library loads and a one-time check finds the generator's state
laid out as expected."""
from __future__ import annotations

import torch

from . import native


def draw_bf16(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row of bf16 probs [C, V] by the inverse CDF at uniforms u [C] (float64 in
    [0, 1)): the first v whose running sum exceeds u * the row's sum (dn_draw_bf16)."""
    if probs.dim() != 2 or probs.dtype != torch.bfloat16 or probs.device.type != "cpu":
        raise ValueError("draw_bf16: probs must be a [C, V] bf16 CPU tensor")
    p = probs.contiguous()
    uu = u.detach().to(torch.float64).contiguous()
    if uu.shape != (p.shape[0],):
        raise ValueError(f"draw_bf16: need {p.shape[0]} uniforms, got {list(uu.shape)}")
    out = torch.empty(p.shape[0], dtype=torch.int64)
    native._call("dn_draw_bf16", p.data_ptr(), p.shape[0], p.shape[1], uu.data_ptr(), out.data_ptr())
    return out


def _state_layout_ok() -> bool:
    """dn_sample reads torch's CPU generator state bytes (MT19937 words, left, next) at fixed
    offsets; check once that this torch lays them out so and that the draws agree."""
    global _layout_checked
    if _layout_checked is None:
        probs = torch.rand(3, 37, generator=torch.Generator().manual_seed(1))
        ours, theirs = torch.Generator().manual_seed(99), torch.Generator().manual_seed(99)
        try:
            ok = all(torch.equal(_sample(probs, ours), torch.multinomial(probs, 1, generator=theirs).view(-1))
                     and torch.equal(ours.get_state(), theirs.get_state()) for _ in range(300))
        except (ValueError, RuntimeError):
            ok = False
        _layout_checked = ok
    return _layout_checked


_layout_checked: bool | None = None


def _sample(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    state = gen.get_state().clone()
    if state.numel() < 24 + 624 * 8:
        raise ValueError("unexpected torch generator state size")
    p = probs.detach().to(torch.float32).contiguous()
    out = torch.empty(p.shape[0], dtype=torch.int64)
    native._call("dn_sample", p.data_ptr(), p.shape[0], p.shape[1], state.data_ptr(), out.data_ptr())
    gen.set_state(state)
    return out


def sample(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
    """torch.multinomial(probs [C, V], 1, generator=gen).view(C) with the native generator replica
    (same tokens, same generator state after), or None when the library or the check says no."""
    if not native.available() or probs.dim() != 2 or gen.device.type != "cpu" or not _state_layout_ok():
        return None
    return _sample(probs, gen)
