"""The vocabulary side of a denoising step on the CPU in bf16 mode (the native library's dn_vocab).

Legend: C canvas positions, V vocabulary, H hidden.

What the fused Triton head (kernels/vocab.py) is on a GPU, this is on the CPU: from the final
hidden state x [C, H] and the tied embedding E [V, H] it returns the head's statistics at this
step's temperature (argmax, logsumexp, entropy), the probabilities the sampler draws from, and the
next step's self-conditioning input softmax(logits / T).to(bf16) @ E. The per-row work (softcap,
tempering, softmax, entropy, argmax) runs in one native call over the head's bf16 logits; the
probabilities overwrite the logits in place as bf16, so the step holds one [C, V] bf16 buffer
(134 MB at V = 262144) and no [C, V] fp32 one (the unfused path holds two to three of 268 MB).

Numerics follow transformers' bf16 mode: the logits are the bf16 product x @ E.T, widened to
fp32 for everything after; the probabilities feeding the self-conditioning matmul are rounded to
bf16 (as `probs.to(E.dtype)` does). The draw (sampler.sample on these bf16 probabilities) is an
inverse-CDF draw, not torch.multinomial's: bf16 mode does not promise transformers' tokens; f32
mode keeps the unfused path and its exact draws.
"""
from __future__ import annotations

import threading
import weakref
from typing import NamedTuple

import torch

from ..gguf.qtensor import QTensor
from . import native

__all__ = ["CpuVocabOut", "available", "vocab_head"]


class CpuVocabOut(NamedTuple):
    logits: None                  # never materialised in fp32 (kernels.vocab.VocabOut's field)
    argmax: torch.Tensor          # [C] int64, first maximum of the tempered logits
    lse: torch.Tensor             # [C] fp32 logsumexp of the tempered logits
    entropy: torch.Tensor         # [C] fp32 entropy (nats) of their softmax
    soft: torch.Tensor            # [C, H] fp32 softmax(...).to(bf16) @ E
    probs: torch.Tensor           # [C, V] bf16 softmax of the tempered logits (the draw's input)


def available() -> bool:
    """Whether the native library (with dn_vocab) is loaded."""
    return native.available()


def blocks_usable(E, dtype: torch.dtype) -> bool:
    """Whether the native kernels can run the head (qmatmul) and the self-conditioning product
    (qmatmul_t) on the embedding's own CPU blocks for activations of `dtype`, so no dense copy
    of E is needed."""
    from .backend import backend_for
    return isinstance(E, QTensor) and E.raw.device.type == "cpu" and backend_for("cpu") == "native" \
        and native.supports(E.qtype, dtype)


_workspace = threading.local()    # per thread: the fp32 logits buffer the head writes into


def _logits_buffer(numel: int) -> torch.Tensor:
    """A [numel] fp32 buffer kept for this thread's next step: allocating the head's [C, V] logits
    anew each step (268 MB at C = 256) costs ~0.1 s of page faults on 2 cores. Only vocab_head
    uses it, between head_logits and vocab_stats (the probabilities it returns are their own)."""
    buf = getattr(_workspace, "logits", None)
    if buf is None or buf.numel() != numel:
        _workspace.logits = None                    # free the old one before taking the new
        buf = _workspace.logits = torch.empty(numel, dtype=torch.float32)
    return buf


def head_logits(x: torch.Tensor, E: torch.Tensor | QTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [C, H] @ E[V, H].T: bf16 [C, V] from a dense bf16 E; fp32 from the quantized blocks
    (into `out` where given, see native.qmatmul)."""
    if isinstance(E, QTensor):
        return native.qmatmul(x.to(torch.bfloat16), E, out_dtype=torch.float32, out=out)
    return x.to(E.dtype) @ E.t()


def softmax_bf16(logits: torch.Tensor) -> torch.Tensor:
    """softmax(logits) [C, V] as bf16, fused (dn_vocab without softcap, temperature 1): the
    probabilities of torch.softmax(logits.float()).to(bf16) but for the exp's last fp32 bits."""
    return native.vocab(logits, None, 1.0)[0]


def vocab_stats(logits: torch.Tensor, cap: float | None, temperature: float):
    """(probs bf16 [C, V], argmax, lse, entropy) of logits [C, V]; bf16 logits are overwritten."""
    return native.vocab(logits, cap, temperature, in_place=True)


# E^T requantized to Q8_0 per embedding, by id of its bytes: (weakref to them, the copy), the
# entry dropped when they go (a WeakKeyDictionary would compare tensors with ==)
_transposed: dict[int, tuple[weakref.ref, QTensor]] = {}
_transposed_lock = threading.Lock()


def int8_soft(E) -> bool:
    """Whether soft_embedding multiplies by E^T in Q8_0 with int8 products: native.int8(), and E
    on the CPU in blocks the int8 kernels take (native.Q8_TYPES: as for every int8 product, a
    float embedding keeps the bf16 ones), its rows in whole groups of 32."""
    return isinstance(E, QTensor) and E.qtype in native.Q8_TYPES and E.raw.device.type == "cpu" \
        and E.shape[0] % 32 == 0 and native.int8()


def transposed(E: QTensor) -> QTensor:
    """E^T [H, V] in Q8_0 (native.transpose_q8_0), made on first use and kept while E lives:
    V * H * 34 / 32 bytes (784 MB at the real 262144 x 2816). The reduction of probs @ E runs
    over V, across E's rows and their scales, so the int8 kernels need the scales along V."""
    key = id(E.raw)
    with _transposed_lock:
        hit = _transposed.get(key)
        if hit is not None and hit[0]() is E.raw:
            return hit[1]
        t = native.transpose_q8_0(E)
        _transposed[key] = (weakref.ref(E.raw, lambda _, k=key: _transposed.pop(k, None)), t)
        return t


def prepare(E, dtype: torch.dtype) -> None:
    """At load, what the first bf16 step would otherwise do inside its self-conditioning: make
    E^T in Q8_0 where soft_embedding will use it (bf16 activations on E's own blocks, int8_soft)."""
    if dtype == torch.bfloat16 and blocks_usable(E, dtype) and int8_soft(E):
        transposed(E)


def soft_embedding(probs: torch.Tensor, E: torch.Tensor | QTensor) -> torch.Tensor:
    """probs [C, V] @ E [V, H] -> [C, H] fp32: for bf16 probs, int8 products on E^T requantized to
    Q8_0 where int8_soft(E) (probs rounded to int8 per 32 vocabulary entries, E^T per 32 as well; each
    a relative error of at most 1/254 of its group's largest value), else bf16 products on E's
    own blocks (qmatmul_t)."""
    if isinstance(E, QTensor):
        if probs.dtype == torch.bfloat16 and int8_soft(E):       # f32 mode keeps fp32 products
            return native.qmatmul(probs, transposed(E), out_dtype=torch.float32)
        return native.qmatmul_t(probs, E)
    return (probs.to(E.dtype) @ E).float()


def vocab_head(x: torch.Tensor, E: torch.Tensor | QTensor, cap: float | None,
               temperature: float) -> CpuVocabOut:
    """One step's vocabulary side from the final hidden state x [C, H] and the embedding E
    (a dense bf16 copy, or its quantized blocks)."""
    buf = _logits_buffer(x.shape[0] * E.shape[0]) if isinstance(E, QTensor) else None
    logits = head_logits(x, E, out=buf)                              # [C, V]
    probs, argmax, lse, entropy = vocab_stats(logits, cap, temperature)
    del logits
    soft = soft_embedding(probs, E)                                  # [C, H]
    return CpuVocabOut(None, argmax, lse, entropy, soft, probs)


# what scripts/bench_cpu.py --real-shapes times, by stage
BENCH_STAGES = {"head_logits": "head", "vocab_stats": "head", "soft_embedding": "self_cond"}
