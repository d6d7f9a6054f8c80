"""Every tensor of the real Gemma 3 270M Q4_K_M GGUF (F32, Q5_0, Q4_K, Q8_0, Q6_K) dequantised
by diffcli equals `gguf.quants.dequantize` bit for bit: the torch path on all of them, the Triton
kernels (interpreter on CPU, the device with CUDA) on sampled rows of every tensor type."""
import importlib
import os
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":   # before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "diffcli.kernels.dequant" in sys.modules:   # defined earlier, maybe without the interpreter
        importlib.reload(sys.modules["diffcli.kernels.dequant"])

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from diffcli.gguf import quants  # noqa: E402
from diffcli.gguf.reader import open_gguf  # noqa: E402

pytestmark = pytest.mark.realdata


def oracle(raw: torch.Tensor, qtype: str, rows: int) -> np.ndarray:
    """gguf-py's dequantisation of the same bytes (the parser's bytes are checked against
    GGUFReader's in test_gguffile.py)."""
    data = raw.numpy().reshape(rows, -1)
    out = dequantize(data, GGMLQuantizationType[qtype])
    return np.ascontiguousarray(out, dtype=np.float32).reshape(-1)


def same_bits(got: torch.Tensor, want: np.ndarray) -> bool:
    return np.array_equal(got.cpu().numpy().view(np.uint32), want.view(np.uint32))


@pytest.fixture(scope="module")
def real(real_gguf):
    return open_gguf(real_gguf)


@pytest.mark.slow
def test_every_tensor_torch_path(real):
    seen = {}
    for name in real.tensor_names:
        qt = real.tensor(name)
        rows = qt.numel // qt.shape[-1]
        want = oracle(qt.raw, qt.qtype, rows)
        assert np.isfinite(want).all(), name
        got = qt.dequantize(torch.float32, "cpu")               # the model's entry point
        assert got.shape == qt.shape, name
        assert same_bits(got.reshape(-1), want), name
        seen[qt.qtype] = seen.get(qt.qtype, 0) + 1
    assert seen == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}


def test_sampled_rows_triton_path(real):
    from diffcli.kernels.dequant import dequantize_triton
    rng = np.random.default_rng(0)
    checked = {}
    for name in real.tensor_names:
        qt = real.tensor(name)
        if qt.qtype not in quants.TRITON_TYPES or checked.get(qt.qtype, 0) >= 4:
            continue
        blocks = qt.blocks()                                     # [rows, row_bytes]
        n_rows = blocks.shape[0]
        # first, last, and a few random rows, as one contiguous run of bytes
        pick = sorted({0, n_rows - 1, *rng.integers(0, n_rows, 5).tolist()})
        raw = blocks[pick].contiguous()
        want = oracle(raw, qt.qtype, len(pick))
        got = dequantize_triton(raw.to(DEVICE), qt.qtype, len(pick) * qt.shape[-1])
        assert same_bits(got, want), name
        checked[qt.qtype] = checked.get(qt.qtype, 0) + 1
    assert set(checked) == {"Q5_0", "Q4_K", "Q8_0", "Q6_K"}
