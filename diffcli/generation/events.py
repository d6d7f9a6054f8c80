"""What the generation loop yields: a `StepEvent` per denoising step, a `CanvasEvent` per
finished canvas, and a final `Done` with the tokens and the run's `GenerationStats`. The front
ends (CLI, live view, server) only ever see these."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["StepEvent", "CanvasEvent", "Done", "GenerationStats", "GenerationResult"]


@dataclass
class StepEvent:
    """One denoising step. Tensors are on the CPU and belong to the consumer."""
    canvas: int                 # 0-based canvas index
    step: int                   # 0-based step index inside the canvas
    steps: int                  # step budget S
    argmax: torch.Tensor        # [C] argmax of the tempered logits: what the canvas would commit
    accepted: torch.Tensor      # [C] bool, took their sampled token this step
    renoised: torch.Tensor      # [C] bool, replaced by uniform noise for the next step
    entropy: torch.Tensor       # [C] fp32 entropy of the tempered distribution (nats)
    temperature: float
    stable: bool                # argmax unchanged for `stability` steps
    elapsed_ms: float           # wall time of this step (forward + sampling)


@dataclass
class CanvasEvent:
    """A finished canvas. `tokens` is what the canvas contributes to the output."""
    canvas: int
    tokens: list[int]           # kept tokens: cli = cut at EOG/repetition; hf = canvas, pad after EOS
    canvas_ids: list[int]       # the untrimmed argmax canvas of the last step
    steps: int                  # steps this canvas ran
    ended: bool                 # no canvas follows
    reason: str | None          # why it ended: "eog", "repetition", "eos", "length"; None if not
    elapsed_ms: float           # wall time of its steps, consumer time between events included


@dataclass
class GenerationStats:
    """Counts and times of one run. Output counts are trimmed tokens only, never whole canvases."""
    seed: int
    mode: str
    prompt_tokens: int
    prefill_ms: float = 0.0
    canvases: int = 0
    steps_per_canvas: list[int] = field(default_factory=list)
    emitted_tokens: int = 0     # kept tokens (hf mode: non-pad tokens, as transformers counts)
    step_ms: float = 0.0        # wall time inside denoising steps
    commit_ms: float = 0.0      # wall time re-encoding finished canvases
    first_canvas_ms: float | None = None   # from the start of the call to the first finished canvas
    total_ms: float = 0.0       # the whole call: prefill, steps, commits, trimming, and the
                                # consumer's time between events; a front end that times a whole
                                # turn sets it to that, counts first_canvas_ms from the turn's
                                # start too and fills in prepare_ms, so that every figure it shows
                                # (tokens_per_s included) comes from this one object
    prepare_ms: float = 0.0     # before the call: chat template and tokenization (front ends)
    stop_reason: str = "length"

    @property
    def steps(self) -> int:
        """Decoder forward passes (one per step)."""
        return sum(self.steps_per_canvas)

    @property
    def ms_per_step(self) -> float:
        return self.step_ms / self.steps if self.steps else 0.0

    @property
    def mean_steps_per_canvas(self) -> float:
        return self.steps / self.canvases if self.canvases else 0.0

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.emitted_tokens / self.total_ms if self.total_ms > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.emitted_tokens / self.steps if self.steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("steps", "ms_per_step", "mean_steps_per_canvas", "tokens_per_s",
                     "tokens_per_forward"):
            out[name] = getattr(self, name)
        return out


@dataclass
class Done:
    """The last event; also what `generate()` returns."""
    tokens: list[int]           # generated ids after trimming (prompt excluded)
    stats: GenerationStats


GenerationResult = Done
