"""The entropy-bound sampler (spec §C), as small pure functions the generation loop composes.

Every function works on one canvas at a time (batch size 1). Legend for shape comments:
`C` canvas length, `V` vocabulary size.

Numerics: everything that decides which tokens survive a step (temperature, entropy, the
acceptance cumsum, the stop test) is evaluated in fp32, the precision transformers 5.23.0 uses,
so that the same logits give the same decisions and the oracle tests can demand identical tokens.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from ..errors import InputError

__all__ = [
    "SamplerConfig", "temperature_at", "token_entropy", "sample", "entropy_bound_accept", "renoise",
    "is_stable", "should_stop", "trim_eos_pad", "trim_cli",
]


@dataclass(frozen=True)
class SamplerConfig:
    """Entropy-bound sampler settings (spec §C.1). Names follow the `diffusion.eb_*` GGUF keys and
    the `--diffusion-eb-*` flags; transformers calls them max_denoising_steps, t_max, t_min,
    sampler_config.entropy_bound, stability_threshold and confidence_threshold."""

    max_steps: int = 48          # S: denoising steps per canvas at most
    t_max: float = 0.8           # temperature of the first step
    t_min: float = 0.4           # end point of the schedule (never reached, §C.2)
    entropy_bound: float = 0.1   # B: acceptance bound on the summed entropy (nats)
    stability: int = 1           # steps the argmax canvas must stay unchanged before a stop
    confidence: float = 0.005    # stop only when mean entropy is below this (strict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(name: str, problem: str, fix: str) -> InputError:
            return InputError(f"sampler setting {name}={getattr(self, name)!r} {problem}", fix=fix)

        for name in ("max_steps", "stability"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise bad(name, "is not an integer", "pass a whole number")
        for name in ("t_max", "t_min", "entropy_bound", "confidence"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(value):
                raise bad(name, "is not a finite number", "pass a number such as 0.5")
        if self.max_steps < 1:
            raise bad("max_steps", "must be at least 1", "use --diffusion-eb-max-steps 1 or more")
        if self.stability < 0:
            raise bad("stability", "must be 0 or more", "use 0 to stop on confidence alone")
        if self.t_min < 0:
            raise bad("t_min", "must be 0 or more", "use a temperature such as 0.4")
        if self.t_max <= 0:
            raise bad("t_max", "must be greater than 0", "use a temperature such as 0.8")
        if self.t_min > self.t_max:
            raise InputError(f"sampler t_min={self.t_min} is above t_max={self.t_max}",
                             fix="the schedule runs from t_max down towards t_min; swap them")
        if self.entropy_bound < 0:
            raise bad("entropy_bound", "must be 0 or more", "use 0.1 (0 accepts one token per step)")
        if self.confidence < 0:
            raise bad("confidence", "must be 0 or more", "use 0.005 (0 never stops early)")

    @classmethod
    def resolve(cls, model_config: Any = None, **explicit: Any) -> "SamplerConfig":
        """Settings for one run: an explicit value (not None) beats the GGUF's `diffusion.eb_*` key
        (`model_config.sampler_defaults`), which beats the built-in default (llama.cpp's order, §C.1)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(explicit) - names)
        if unknown:
            raise InputError(f"unknown sampler setting {unknown[0]!r}",
                             fix=f"use one of {', '.join(sorted(names))}")
        values = {f.name: f.default for f in fields(cls)}
        from_file = getattr(model_config, "sampler_defaults", None) or {}
        values.update({k: v for k, v in from_file.items() if k in names and v is not None})
        values.update({k: v for k, v in explicit.items() if v is not None})
        return cls(**values)


def temperature_at(steps_remaining: int, max_steps: int, t_min: float, t_max: float) -> float:
    """Temperature of the step with `steps_remaining` steps left, counting S, S-1, ..., 1 (§C.2,
    FIELD trap 10): T = t_min + (t_max - t_min) * s / S, so the first step runs at t_max and the
    last at t_min + (t_max - t_min) / S.

    Evaluated in fp32 in the reference's order (the difference t_max - t_min in double, the rest
    in fp32): dividing the logits by a T that is one ulp off changes the sampled tokens."""
    f32 = np.float32
    frac = f32(steps_remaining) / f32(max_steps)
    return float(f32(t_min) + f32(t_max - t_min) * frac)


def token_entropy(logits: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """Natural-log entropy of softmax(logits) per position: [C, V] -> [C] fp32 (§C.3).

    fp32 because the acceptance cumsum compares sums of these against a bound of 0.1 and the stop
    test compares their mean against 0.005; bf16 would round them away. Computed as
    sum(-p log p) from `probs`, the softmax the loop already made for sampling: one extra
    vocab-sized temporary and three passes over it, about 3x cheaper than going through
    log_softmax, and as close to transformers' Categorical entropy (~1e-6 at H = 7.5 nats)."""
    if probs is None:
        probs = torch.softmax(logits.float(), dim=-1)               # [C, V]
    return torch.special.entr(probs.float()).sum(dim=-1)            # [C]


def sample(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One draw per row of probs [C, V] -> [C]: the same tokens, and the same generator state
    after, as `torch.multinomial(probs, 1, generator=gen)` (what transformers calls), faster on
    the CPU.

    torch draws a single sample per row by the exponential race: argmax(p / q) with
    q = exponential_(1) per entry, where the CPU kernel makes q as float(-log1p(-u)) from one
    float64 uniform u per entry, serially from the generator. Its per-entry scalar loop costs
    ~120 ms for a 256 x 32k canvas on one core; drawing the same u with `uniform_` (the same
    generator calls, in the same order) and transforming them with vectorized ops gives bit-equal
    q in ~1/2 to 2/3 of the time; the native library (compute/draws.sample) runs the generator itself
    and the rest in parallel, faster still (tests/test_sampler.py and tests/test_native.py check
    tokens and state against torch.multinomial). Other devices keep torch.multinomial: their
    kernels differ. bf16 probabilities on the CPU (bf16 mode's native head, compute/vocab.py) get
    one inverse-CDF draw per row from a float64 uniform of `gen` instead (compute/draws.draw_bf16)."""
    from ..compute import draws, native
    if probs.device.type == "cpu" and gen.device.type == "cpu" and probs.dtype == torch.bfloat16 \
            and native.available():
        # bf16 mode's fused CPU head (compute/vocab.py): an inverse-CDF draw per row, one float64
        # uniform per row from `gen` (not multinomial's draws; f32 mode never gets here)
        u = torch.rand(probs.shape[0], dtype=torch.float64, generator=gen)
        return draws.draw_bf16(probs, u)
    if probs.device.type != "cpu" or gen.device.type != "cpu" or probs.dtype != torch.float32:
        return torch.multinomial(probs, 1, generator=gen).view(-1)
    drawn = draws.sample(probs, gen)          # the same race in C++, generator included
    if drawn is not None:
        return drawn
    q = torch.empty(probs.shape, dtype=torch.float64).uniform_(generator=gen)   # [C, V]
    q = q.neg_().log1p_().neg_().to(torch.float32)                               # Exp(1) draws
    return torch.div(probs, q, out=q).argmax(dim=-1)                             # [C]


def entropy_bound_accept(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """Which positions take their sampled token this step (§C.3): sort by entropy ascending and
    accept position (k) iff the summed entropy of the positions before it is <= `bound`.
    The lowest-entropy position always passes (its sum is 0), so every step accepts at least one.

    Ties: a stable sort, so equal entropies are taken in canvas order (lowest index first).
    transformers uses the default (unstable) `torch.sort`; the two can only disagree when two
    positions have bit-identical entropies straddling the bound. [C] fp32 -> [C] bool."""
    entropy = entropy.float()
    order = torch.sort(entropy, stable=True)                        # [C] ascending
    before = torch.cumsum(order.values, dim=0) - order.values       # [C] sum of earlier ones
    accept_sorted = before <= bound
    accepted = torch.empty_like(accept_sorted)
    accepted[order.indices] = accept_sorted                         # back to canvas order
    return accepted


def renoise(sampled: torch.Tensor, accepted: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Next step's input canvas (§C.2): accepted positions keep their sample, every other
    position (including ones accepted in earlier steps: nothing is frozen) gets a fresh
    uniform-random token from `noise`. [C] ids, [C] bool, [C] ids -> [C] ids."""
    return torch.where(accepted, sampled, noise)


def is_stable(history: "deque[torch.Tensor] | list[torch.Tensor]", argmax: torch.Tensor,
              threshold: int) -> bool:
    """True when `argmax` equals each of the last `threshold` argmax canvases (§C.4). `history`
    holds the earlier steps' argmax canvases of this canvas, newest last; with fewer than
    `threshold` of them the canvas is not stable yet (transformers' history starts at -1).
    Threshold 0 means always stable."""
    if threshold == 0:
        return True
    recent = list(history)[-threshold:]
    return len(recent) == threshold and all(torch.equal(h, argmax) for h in recent)


def should_stop(stable: bool, entropy: torch.Tensor, confidence: float) -> bool:
    """Stop this canvas after the current step (§C.4, FIELD trap 4): the argmax is stable AND
    the mean per-position entropy of the tempered logits is strictly below `confidence`.
    The mean is taken in fp32, as the reference does."""
    if not stable:
        return False
    return bool(entropy.float().mean() < confidence)


# --- trimming a finished canvas (§C.5) ------------------------------------------------------

def trim_eos_pad(canvas: torch.Tensor, eos_ids, pad_id: int) -> tuple[torch.Tensor, bool]:
    """transformers' finalisation: if the canvas holds an EOS id, every token after the first
    one becomes `pad_id` (the EOS stays) and generation ends. Returns (canvas, ended)."""
    is_eos = torch.isin(canvas, _ids(eos_ids, canvas.device))
    if not bool(is_eos.any()):
        return canvas, False
    first = int(is_eos.int().argmax())
    out = canvas.clone()
    out[first + 1:] = pad_id
    return out, True


REPEAT_RUN = 6          # equal pairs in a row that count as a repetition loop (llama.cpp)


def trim_cli(canvas: torch.Tensor, eog_ids) -> tuple[int, str | None]:
    """llama-diffusion-cli's cut (§C.5): keep tokens before the first end-of-generation token,
    and also cut where a repetition loop starts, i.e. the first index i from which
    canvas[j] == canvas[j + stride] holds for REPEAT_RUN consecutive j, stride 1 or 2.
    The loop must lie wholly in the tokens before the EOG cut. Returns (kept length, reason)
    with reason None (whole canvas kept), "eog" or "repetition"; any cut ends generation."""
    n = canvas.numel()
    is_eog = torch.isin(canvas, _ids(eog_ids, canvas.device))
    cut, reason = n, None
    if bool(is_eog.any()):
        cut, reason = int(is_eog.int().argmax()), "eog"
    kept = canvas[:cut]
    starts = []
    for stride in (1, 2):
        if kept.numel() < REPEAT_RUN + stride:
            continue
        same = kept[stride:] == kept[:-stride]                      # [cut - stride]
        runs = same.unfold(0, REPEAT_RUN, 1).all(dim=1)             # [cut - stride - 5] run starts
        if bool(runs.any()):
            starts.append(int(runs.int().argmax()))
    if starts:
        cut, reason = min(starts), "repetition"
    return cut, reason


def _ids(ids, device) -> torch.Tensor:
    return torch.as_tensor(sorted(set(int(i) for i in ids)), dtype=torch.long, device=device)
