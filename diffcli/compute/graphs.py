"""CUDA graphs for the canvas step (issue 6, item 3).

A denoising step on the full model launches about a thousand kernels (some 270 of them Triton,
whose Python launcher is the slow part) for ~85 ms of GPU work on an H100; the host side was
measured at 25-30 ms per step on top of that (scripts/bench_notes.md). Within a canvas every step
has the same shapes and reads the same cache, so the decoder pass (`DiffusionGemma._decode_body`:
embedding, self-conditioning MLP, every layer, final norm) is captured once and replayed: the
canvas ids and the soft embedding are copied into the graph's static inputs, the graph is
replayed, and the hidden state comes back in the same static output tensor every time (valid
until the next replay; the head consumes it at once).

What stays eager: the first step of each canvas (no self-conditioning: once per canvas), the
vocabulary head and the sampler (the temperature changes every step and is a kernel argument),
prefill and commits.

Rules:
- a graph belongs to the cache it read: its length and the identity of every K/V tensor (a
  KVCache replaces tensors, it never writes them in place). Any change drops the graph and its
  memory pool. A live graph keeps those tensors referenced, so their memory cannot be reused
  under it;
- a graph is captured the second time a step reads the same cache; the first step on a cache runs
  eagerly. So a cache read once (`--diffusion-kv-cache off` re-encodes the prefix every step)
  never pays for a capture, and the first eager run of a variant (shapes and dtypes) happens on
  the capture stream, so Triton compiles its kernels and libraries set up their per-stream state
  outside any capture;
- a capture that fails (an op that waits for the host, a driver without graph support) turns
  graphs off for this model with one line on stderr; steps then run eagerly, with the same
  results.

`DIFFCLI_CUDA_GRAPHS=0` (or `--no-cuda-graphs`) turns them off. The capture mechanics are a
separate object (`CudaCapture`) so tests can drive `StepGraph` on the CPU with a stand-in that
has a graph's semantics (inputs and the cache are read where they were at capture; the output
tensor is overwritten on every replay).
"""
from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InputError

ENV = "DIFFCLI_CUDA_GRAPHS"


_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def enabled_by_env() -> bool:
    """DIFFCLI_CUDA_GRAPHS: 1/on/true/yes (or unset) allows graphs, 0/off/false/no turns them
    off; any other value is an input error (a typo must not silently keep them on)."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in _ON + _OFF:
        raise InputError(f"{ENV}={value!r} is not on or off",
                         fix="set it to 1 or 0 (also on/off, true/false, yes/no), or unset it")
    return value in _ON


class CudaCapture:
    """torch.cuda.CUDAGraph capture and replay on a private stream."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)

    def run(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """fn() eagerly on the capture stream (the warm-up), its result ready on the current one."""
        main = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(main)
        with torch.cuda.device(self.stream.device), torch.cuda.stream(self.stream):
            out = fn()
        main.wait_stream(self.stream)
        out.record_stream(main)     # freed later: not reused before the current stream is done
        return out

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Record fn() into a graph (nothing runs yet). Returns (replay, output tensor)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.stream.device), torch.cuda.graph(graph, stream=self.stream):
            out = fn()
        device = self.stream.device

        def replay():               # on the device's current stream, where the inputs were copied
            with torch.cuda.device(device):
                graph.replay()
        return replay, out          # the closure keeps the graph (and its pool) alive


@dataclass
class _Live:
    sig: tuple
    kv: tuple                       # the cache tensors the graph reads
    ids: torch.Tensor               # static inputs
    soft: torch.Tensor
    replay: Callable[[], None]
    out: torch.Tensor               # static output


class StepGraph:
    """`body(cache, ids, soft) -> x` run through a graph while the cache and shapes stay put.

    `__call__` has body's signature and results; `replays`, `captures` and `eager` count what it
    did (for tests and benchmarks)."""

    def __init__(self, body: Callable, capture, warn: Callable[[str], None] | None = None):
        self.body, self.capture = body, capture
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr))
        self.error: str | None = None
        self.live: _Live | None = None
        self.seen: tuple | None = None      # (sig, weak refs to the K/V) of the last eager call
        self.warm: set = set()
        self.replays = self.captures = self.eager = 0

    def __call__(self, cache, ids: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        if self.error is not None:
            self.eager += 1
            return self.body(cache, ids, soft)
        kv = (*cache.keys, *cache.values)
        sig = (cache.length, tuple(ids.shape), ids.dtype, ids.device,
               tuple(soft.shape), soft.dtype, soft.device)
        live = self.live
        if live is None or live.sig != sig or any(a is not b for a, b in zip(live.kv, kv)):
            self.drop()
            if not self._seen_before(sig, kv):
                return self._eager(cache, ids, soft, sig, kv)
            live = self._build(cache, ids, soft, sig, kv)
            if live is None:
                self.eager += 1
                return self.body(cache, ids, soft)
        live.ids.copy_(ids)
        live.soft.copy_(soft)
        live.replay()
        self.replays += 1
        return live.out

    def drop(self) -> None:
        """Forget the live graph (its memory returns to the allocator)."""
        self.live = None

    def _seen_before(self, sig, kv) -> bool:
        if self.seen is None or self.seen[0] != sig or sig[1:] not in self.warm:
            return False
        return all(ref() is t for ref, t in zip(self.seen[1], kv))

    def _eager(self, cache, ids, soft, sig, kv) -> torch.Tensor:
        # weak references: a cache read once is not kept alive by the runner
        self.seen = (sig, tuple(weakref.ref(t) for t in kv))
        self.eager += 1
        variant = sig[1:]
        if variant in self.warm:
            return self.body(cache, ids, soft)
        out = self.capture.run(lambda: self.body(cache, ids, soft))
        self.warm.add(variant)
        return out

    def _build(self, cache, ids, soft, sig, kv) -> _Live | None:
        self.seen = None
        # The graph reads the cache as it is now: a snapshot of its tensor lists (tensors shared).
        snapshot = cache.copy()
        s_ids, s_soft = ids.clone(), soft.clone()
        try:
            replay, out = self.capture.capture(lambda: self.body(snapshot, s_ids, s_soft))
        except Exception as err:        # capture is best effort: any failure means eager steps
            self.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            self.warn(f"diffcli: CUDA graph capture failed ({self.error}); running steps without "
                      f"graphs (set {ENV}=0 to skip the attempt)")
            return None
        self.captures += 1
        self.live = _Live(sig, kv, s_ids, s_soft, replay, out)
        return self.live
