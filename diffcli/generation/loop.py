"""Block-diffusion generation (spec §C.2, §C.5, §C.6) as a generator of small events.

The prompt is encoded once; then canvas after canvas is denoised in up to S steps, trimmed, and
(if another canvas follows) committed to the cache through the encoder. The loop never prints:
`stream()` yields a `StepEvent` after every step, a `CanvasEvent` per finished canvas and a final
`Done` carrying the tokens and honest statistics; `generate()` just drains it.

Legend for shape comments: `C` canvas length, `V` vocabulary size, `P` prefix (prompt plus
committed canvases).

RNG: one `torch.Generator` seeded with `seed`, drawn from in transformers' order (§C.2): per
canvas one uniform `randint` for the starting canvas, then per step one `multinomial` over the
tempered softmax (`sampler.sample`: the draws of `torch.multinomial`, computed faster on CPU)
followed by one `randint` for the renoise candidates. On CPU a generator seeded
with s yields exactly the draws of `torch.manual_seed(s)`, so mode="hf" reproduces
`model.generate` token for token, without touching the caller's global RNG.
"""
from __future__ import annotations

import math
import numbers
import os
import time
from collections import deque
from typing import Iterator, Sequence

import torch

from ..errors import InputError
from .events import CanvasEvent, Done, GenerationResult, GenerationStats, StepEvent
from .sampler import (SamplerConfig, entropy_bound_accept, is_stable, renoise, sample, should_stop,
                      temperature_at, token_entropy, trim_cli, trim_eos_pad)

__all__ = ["stream", "generate", "StepEvent", "CanvasEvent", "Done", "GenerationStats",
           "GenerationResult"]

# Gemma 4 end-of-generation ids (<eos>, <turn|>, <|tool_response>), used only when the caller has
# no tokenizer to look them up by text (FIELD trap 11).
DEFAULT_EOG_IDS = (1, 106, 50)
DEFAULT_EOS_ID = 1
MODES = ("cli", "hf")


def generate(model, prompt_ids, **kwargs) -> Done:
    """Run `stream()` to the end and return its `Done` (tokens and stats)."""
    for event in stream(model, prompt_ids, **kwargs):
        if isinstance(event, Done):
            return event
    raise AssertionError("stream() ended without a Done event")


def stream(model, prompt_ids: Sequence[int] | torch.Tensor, *, max_new_tokens: int | None = 256,
           sampler: SamplerConfig | None = None, seed: int | None = None, mode: str = "cli",
           kv_cache: bool = True, eog_ids: Sequence[int] | None = None, blocks: int | None = None,
           pad_id: int = 0, images: Sequence = ()) -> Iterator[StepEvent | CanvasEvent | Done]:
    """Generate after `prompt_ids`, yielding events.

    Canvases: ceil(max_new_tokens / C) when max_new_tokens > 0, else `blocks` (default 1), as
    llama-diffusion-cli's -n / --diffusion-blocks (§C.6). Output is whole canvases minus trimming;
    it is not truncated to max_new_tokens (neither reference does).
    mode="cli": cut each canvas at the first EOG id (excluded) or a repetition loop; any cut ends
    generation. mode="hf": transformers' EOS rule, the canvas after the first EOS id becomes
    `pad_id` and generation ends. `eog_ids` is the EOG (cli) or EOS (hf) set.
    kv_cache=False re-runs prefix and canvas through `model.denoise_uncached` every step.
    seed=None draws a random seed and reports it in the stats. `images`: image soft tokens at
    spans of the prompt (`model.images.ImageSpan`), encoded with it."""
    t_start = time.perf_counter()
    if mode not in MODES:
        raise InputError(f"unknown generation mode {mode!r}", fix=f"use one of {', '.join(MODES)}")
    cfg = model.config
    sampler = SamplerConfig.resolve(cfg) if sampler is None else sampler
    sampler.validate()
    C, V = int(cfg.canvas_length), int(cfg.vocab_size)
    device = torch.device(getattr(model, "device", "cpu"))
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).to(device)   # [P]
    if prompt.numel() == 0:
        raise InputError("the prompt is empty", fix="give at least one token (e.g. a BOS)")
    n_canvases = _canvas_count(max_new_tokens, blocks, C)
    stop_ids = _stop_ids(cfg, mode, eog_ids)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise InputError(f"seed {seed!r} is not a whole number from 0 to 2^64-1",
                         fix="pass --seed N with N >= 0, or leave it out for a random seed")
    gen = torch.Generator(device=device).manual_seed(int(seed))
    stats = GenerationStats(seed=int(seed), mode=mode, prompt_tokens=int(prompt.numel()))

    t0 = time.perf_counter()
    with_images = {"images": tuple(images)} if images else {}    # models without images work too
    cache = model.encode(prompt, **with_images) if kv_cache else None
    _sync(device)
    stats.prefill_ms = _ms(t0)
    prefix = prompt                                                  # [P] for kv_cache=False

    # The fused vocabulary head (model.denoise_fused) where the model has a Triton head: the
    # step then returns the sampler's statistics and the next step's SC input (a VocabOut).
    fused = bool(getattr(model, "use_fused_head", False))

    def denoise(canvas, sc, temperature):
        if fused:
            if kv_cache:
                return model.denoise_fused(cache, canvas, temperature, sc)
            return model.denoise_fused_uncached(prefix, canvas, temperature, sc, **with_images)
        if kv_cache:
            return model.denoise(cache, canvas, sc)
        return model.denoise_uncached(prefix, canvas, sc, **with_images)

    tokens: list[int] = []
    for index in range(n_canvases):
        t_canvas = time.perf_counter()
        argmax, n_steps = None, 0
        for event in _denoise_canvas(denoise, sampler, C, V, gen, device, index, fused):
            if isinstance(event, StepEvent):
                n_steps += 1
                stats.step_ms += event.elapsed_ms
                yield event
            else:
                argmax = event
        canvas_ms = _ms(t_canvas)
        kept, reason = _trim(argmax, mode, stop_ids, pad_id)
        last = index == n_canvases - 1
        ended = reason is not None or last
        if ended and reason is None:
            reason = "length"
        tokens.extend(kept)
        stats.canvases += 1
        stats.steps_per_canvas.append(n_steps)
        stats.emitted_tokens += (sum(1 for t in kept if t != pad_id) if mode == "hf" else len(kept))
        if stats.first_canvas_ms is None:
            stats.first_canvas_ms = _ms(t_start)
        yield CanvasEvent(canvas=index, tokens=kept, canvas_ids=argmax.tolist(), steps=n_steps,
                          ended=ended, reason=reason if ended else None, elapsed_ms=canvas_ms)
        if ended:
            stats.stop_reason = reason
            break
        # Commit: the whole argmax canvas joins the prefix, through the encoder (§C.6).
        t0 = time.perf_counter()
        if kv_cache:
            committed = model.commit(cache, argmax)
            cache = cache if committed is None else committed
            _sync(device)
        else:
            prefix = torch.cat([prefix, argmax])                     # [P + C]
        stats.commit_ms += _ms(t0)

    stats.total_ms = _ms(t_start)
    yield Done(tokens=tokens, stats=stats)


def _denoise_canvas(denoise, sampler: SamplerConfig, C: int, V: int, gen: torch.Generator,
                    device: torch.device, index: int, fused: bool = False):
    """Denoise one canvas from uniform noise (§C.2); yields a StepEvent per step, then the
    argmax canvas of the last executed step (FIELD trap 3: the argmax, not the sampled canvas).

    `denoise(canvas, sc, temperature)` runs one step. Unfused it returns the softcapped logits
    [C, V] and `sc` is the previous step's tempered logits; fused (`fused=True`) it returns the
    fused head's VocabOut at this step's temperature (tempered logits, argmax, lse, entropy and
    the soft embedding), and `sc` is the previous step's soft embedding. Either way the draws
    are the same: one multinomial over softmax(logits / T), then one randint."""
    S = sampler.max_steps
    canvas = torch.randint(0, V, (C,), generator=gen, device=device)      # [C] uniform start
    sc = None                   # self-conditioning is off on the first step of every canvas
    history: deque[torch.Tensor] = deque(maxlen=max(sampler.stability, 1))
    argmax = canvas
    for k, remaining in enumerate(range(S, 0, -1)):
        t0 = time.perf_counter()
        temperature = temperature_at(remaining, S, sampler.t_min, sampler.t_max)
        if fused:
            out = denoise(canvas, sc, temperature)
            sc = out.soft       # FIELD trap 5: softmax of this step's tempered logits, @ E
            probs = getattr(out, "probs", None)    # the CPU head's bf16 softmax (compute/vocab.py)
            if probs is None:
                # softmax(logits / T) = exp(logits / T - lse), in place on the tempered logits
                # (inference tensors of model.denoise_fused: in place only in inference mode)
                with torch.inference_mode():
                    probs = out.logits.sub_(out.lse[:, None]).exp_()      # [C, V]
            sampled = sample(probs, gen)                                    # [C] as multinomial
            argmax, entropy = out.argmax, out.entropy                     # [C], [C]
            del out, probs
        else:
            raw = denoise(canvas, sc, temperature)                         # [C, V] fp32
            sc = None           # consumed: free it before this step's [C, V] temporaries
            logits = raw.float() / temperature                             # [C, V] tempered
            del raw
            probs = torch.softmax(logits, dim=-1)                          # [C, V]
            sampled = sample(probs, gen)                                    # [C] as multinomial
            argmax = logits.argmax(dim=-1)                                 # [C]
            entropy = token_entropy(logits, probs)                         # [C]
            del probs
            sc = logits         # FIELD trap 5: the next step sees this step's tempered logits
        accepted = entropy_bound_accept(entropy, sampler.entropy_bound)    # [C] bool
        noise = torch.randint(0, V, (C,), generator=gen, device=device)    # [C]
        canvas = renoise(sampled, accepted, noise)                         # [C]
        stable = is_stable(history, argmax, sampler.stability)
        history.append(argmax)
        stop = should_stop(stable, entropy, sampler.confidence)
        accepted_cpu = accepted.cpu()
        yield StepEvent(canvas=index, step=k, steps=S, argmax=argmax.cpu(), accepted=accepted_cpu,
                        renoised=~accepted_cpu, entropy=entropy.cpu(), temperature=temperature,
                        stable=stable, elapsed_ms=_ms(t0))
        if stop:
            break
    yield argmax


def _trim(argmax: torch.Tensor, mode: str, stop_ids, pad_id: int) -> tuple[list[int], str | None]:
    if mode == "hf":
        canvas, ended = trim_eos_pad(argmax, stop_ids, pad_id)
        return canvas.tolist(), ("eos" if ended else None)
    cut, reason = trim_cli(argmax, stop_ids)
    return argmax[:cut].tolist(), reason


def _canvas_count(max_new_tokens: int | None, blocks: int | None, C: int) -> int:
    if max_new_tokens is not None and max_new_tokens > 0:
        return math.ceil(max_new_tokens / C)
    blocks = 1 if blocks is None else int(blocks)
    if blocks < 1:
        raise InputError(f"--diffusion-blocks must be at least 1 (got {blocks})",
                         fix="give -n N or --diffusion-blocks 1 or more")
    return blocks


def _stop_ids(cfg, mode: str, given) -> tuple[int, ...]:
    if given is not None:
        ids = (int(given),) if isinstance(given, int) else tuple(int(i) for i in given)
    elif mode == "hf":
        eos = getattr(cfg, "eos_token_id", None)
        ids = (DEFAULT_EOS_ID,) if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) \
            else (int(eos),)
    else:
        ids = tuple(getattr(cfg, "eog_ids", None) or DEFAULT_EOG_IDS)
    return ids


def _sync(device: torch.device) -> None:
    # Honest timings on an asynchronous device: wait for the queued work before reading the clock.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms(t0: float) -> float:
    return 1000.0 * (time.perf_counter() - t0)
