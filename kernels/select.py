"""Which kernel serves which matmul shape: today's bf16 kernels unless a measurement says otherwise.

Keys name an op, its weight types, its shape and a bucket of rows (the next power of two >= the
row count, at least 16, at most 4096):

    "qmatmul Q4_K 4096x2816 T256"                  dense: x [T, K] @ W[N, K].T, "N x K"
    "moe Q4_K/Q5_0 E128 2816x704 P2048"            routed experts: E experts, K hidden, F width,
                                                   P = tokens x active experts

A choice is {"variant": one of "bf16" (qmatmul.py / moe.py, today's) or mmq.VARIANTS, plus
optional tile sizes: BM, BN, GPI, warps, stages, and for the MoE down_BN, down_warps}. The table
is kernels/choices.json, written by `scripts/gpu_check.py` from its sweep on a GPU (it keeps, per
shape, the fastest variant whose error is within 1.5x of the bf16 kernel's); a shape it does not
name runs today's kernel. Choices apply to bf16/fp16 activations only (the sweep's dtype).

Overrides: DIFFCLI_KERNEL_CHOICES=path.json reads another table; DIFFCLI_KERNELS=VARIANT runs that
variant for every supported shape and any activation dtype (benchmarks and tests).

`qmatmul` and `moe` are the entry points compute/ops.py calls: they look the shape up and run
today's kernel (qmatmul.qmatmul, moe.moe_triton) or the chosen grouped one (mmq.grouped_matmul,
moe_mmq.moe_grouped) with the choice's tiles.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

CHOICES_FILE = Path(__file__).with_name("choices.json")
DEFAULT = "bf16"
KNOWN = ("bf16", "mmq", "mmq1", "repack", "mmq+repack", "exact")   # DEFAULT + mmq.VARIANTS
GROUPED_TYPES = frozenset({"Q4_K", "Q5_0", "Q6_K", "Q8_0"})         # mmq.SUPPORTED


def bucket(rows: int) -> int:
    b = 16
    while b < rows and b < 4096:
        b *= 2
    return b


def qmatmul_key(qtype: str, N: int, K: int, T: int) -> str:
    return f"qmatmul {qtype} {N}x{K} T{bucket(T)}"


def moe_key(gu_qtype: str, dn_qtype: str, E: int, K: int, F: int, P: int) -> str:
    return f"moe {gu_qtype}/{dn_qtype} E{E} {K}x{F} P{bucket(P)}"


@functools.lru_cache(maxsize=8)
def _read(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        return {}
    with open(p) as f:
        table = json.load(f)
    return table.get("choices", {})


def table() -> dict:
    return _read(os.environ.get("DIFFCLI_KERNEL_CHOICES") or str(CHOICES_FILE))


def choose(key: str, dtype: torch.dtype) -> dict:
    """The choice for `key` ({"variant": "bf16"} when none), read on every call so an override
    set at run time takes effect (the file itself is read once per path)."""
    forced = os.environ.get("DIFFCLI_KERNELS")
    if forced:
        if forced not in KNOWN:
            raise ValueError(f"DIFFCLI_KERNELS={forced!r} is not a kernel variant; "
                             f"use one of {', '.join(KNOWN)}, or unset it")
        return {"variant": forced}
    if dtype not in (torch.bfloat16, torch.float16):
        return {"variant": DEFAULT}
    return dict(table().get(key, {"variant": DEFAULT}))


def split(choice: dict) -> tuple[str, dict]:
    """(variant, tile overrides) of a choice."""
    tiles = {k: v for k, v in choice.items() if k != "variant"}
    return choice["variant"], tiles


def qmatmul(x: torch.Tensor, w) -> torch.Tensor:
    """x [T, K] @ W[N, K].T with the kernel chosen for this shape (today's unless measured)."""
    from . import qmatmul as today
    N, K = w.shape
    variant, tiles = split(choose(qmatmul_key(w.qtype, N, K, x.shape[0]), x.dtype))
    if variant == DEFAULT or w.qtype not in GROUPED_TYPES:
        return today.qmatmul(x, w)
    from .mmq import grouped_matmul
    return grouped_matmul(x, w, variant, **tiles)


def moe(x: torch.Tensor, gate_up, down, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The routed experts with the kernels chosen for this shape (today's unless measured)."""
    from .moe import moe_triton
    E, F2, K = gate_up.shape
    key = moe_key(gate_up.qtype, down.qtype, E, K, F2 // 2, ids.numel())
    variant, tiles = split(choose(key, x.dtype))
    if variant == DEFAULT or not {gate_up.qtype, down.qtype} <= GROUPED_TYPES:
        return moe_triton(x, gate_up, down, ids, weights)
    from .moe_mmq import moe_grouped
    return moe_grouped(x, gate_up, down, ids, weights, variant, **tiles)
