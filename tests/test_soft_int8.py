"""Self-conditioning with int8 products (compute/vocab.soft_embedding where int8_soft): the
embedding E [V, H] transposed and requantized to Q8_0 [H, V] (native.transpose_q8_0), so that
probs [C, V] @ E runs through the int8 kernels with the scales along V.

Oracles: gguf.quants' own Q8_0 quantizer on gguf.quants' dequantization of E, transposed (the
copy must equal it byte for byte), and float64 products for the whole product.
"""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from diffcli.compute import native
from diffcli.compute import vocab as cpu_vocab
from diffcli.compute.backend import set_backend
from diffcli.gguf.qtensor import QTensor

from _bounds import gamma
from _native_builds import lib  # noqa: F401 (the fixture)
from _qblocks import random_blocks, reference

Q8_0 = GGMLQuantizationType.Q8_0


def float_blocks(qtype: str, w: np.ndarray) -> np.ndarray:
    """The raw bytes of w [N, K] as an F32, F16 or BF16 tensor (gguf.quants writes them)."""
    return np.ascontiguousarray(quantize(w, GGMLQuantizationType[qtype])).view(np.uint8).reshape(-1)


@pytest.mark.parametrize("qtype,K", [("Q6_K", 512), ("Q4_K", 256), ("Q8_0", 96), ("Q5_0", 64),
                                     ("F32", 24), ("F16", 40), ("BF16", 8),
                                     ("F32", 44)])   # 44: the AVX2 loops (8 columns at a time) and their tail
def test_transpose_q8_0_is_gguf_quants(lib, qtype, K):
    rng = np.random.default_rng(K)
    N = 96                                            # three groups of 32 rows
    if qtype.startswith(("F", "B")):
        w = (rng.standard_normal((N, K)) * np.exp(rng.uniform(-4, 4, (N, 1)))).astype(np.float32)
        w[5] = 0.0                                    # a zero row: d = 0, q = 0
        w[:32, 3] = 0.0                               # a whole zero block of the transpose
        w[32:64, 4] = rng.uniform(-1e-3, 1e-3, 32)    # scale ~8e-6: an f16 subnormal
        w[64:96, 6] = rng.uniform(-1e-6, 1e-6, 32)    # scale ~8e-9: under f16's least subnormal
        w[:32, 1] = np.arange(32) - 15.5              # scale 127 / 127 = 1: ties, rounded away from 0
        w[0, 1] = 127.0
        raw = float_blocks(qtype, w)
    else:
        raw = random_blocks(qtype, (N, K), rng)
    deq = reference(raw, qtype, (N, K)).numpy()
    want = np.ascontiguousarray(quantize(np.ascontiguousarray(deq.T), Q8_0)).reshape(-1)
    if qtype.startswith(("F", "B")):                  # the rows above do reach those scales
        d = want.reshape(K, 3, 34)[:, :, :2].copy().view(np.float16)[..., 0]
        assert 0 < abs(d[4, 1]) < np.finfo(np.float16).tiny and d[6, 2] in (0, np.finfo(np.float16).smallest_subnormal)
    got = native.transpose_q8_0(QTensor(torch.from_numpy(raw), qtype, (N, K), "E"))
    assert got.qtype == "Q8_0" and got.shape == (K, N)
    assert np.array_equal(got.raw.numpy(), want)


def test_transpose_q8_0_needs_whole_groups(lib):
    rng = np.random.default_rng(0)
    qt = QTensor(torch.from_numpy(random_blocks("Q8_0", (40, 32), rng)), "Q8_0", (40, 32), "E")
    with pytest.raises(ValueError, match="40 rows, not a multiple of 32"):
        native.transpose_q8_0(qt)


@pytest.fixture
def native_backend(lib):
    set_backend("native")
    yield
    native.set_int8(None)
    set_backend(None)


def test_soft_embedding_int8(native_backend):
    """bf16 probabilities against E^T in Q8_0: what qmatmul gives on the copy, within the two
    roundings to int8 of the exact float64 probs @ E; fp32 probabilities and int8 off keep the
    bf16/fp32 products on E's own blocks."""
    rng = np.random.default_rng(5)
    V, H, C = 4608, 256, 11                           # V: 144 groups, a long K (chunked)
    raw = random_blocks("Q6_K", (V, H), rng, scale=0.05)
    E = QTensor(torch.from_numpy(raw), "Q6_K", (V, H), "token_embd.weight")
    e = reference(raw, "Q6_K", (V, H)).double()
    logits = torch.from_numpy(rng.standard_normal((C, V)) * 4)
    probs = torch.softmax(logits, -1).to(torch.bfloat16)
    native.set_int8(True)
    assert cpu_vocab.int8_soft(E)
    soft = cpu_vocab.soft_embedding(probs, E)
    ET = cpu_vocab.transposed(E)
    assert cpu_vocab.transposed(E) is ET                       # made once per embedding
    assert torch.equal(soft, native.qmatmul(probs, ET, out_dtype=torch.float32))
    # |soft - p @ e| <= sum_v |dp| |e'| + sum_v |p| |de| + fp32 slack, with |dp| <= d_p / 2 per
    # group of 32 probabilities and |de| <= d_e / 2 per group of 32 rows of the copy
    p = probs.double()
    et = reference(ET.raw.numpy(), "Q8_0", (H, V)).double()               # [H, V]
    d_p = p.view(C, V // 32, 32).abs().amax(-1) / 127
    d_e = et.view(H, V // 32, 32).abs().amax(-1) / 127
    half_p = d_p.repeat_interleave(32, dim=1) / 2                        # [C, V]
    half_e = d_e.repeat_interleave(32, dim=1) / 2                        # [H, V]
    slack = 2 * gamma(V // 32 + 4) * ((p.abs() + half_p) @ et.abs().T)
    bound = half_p @ et.abs().T + p.abs() @ half_e.T + slack
    err = (soft.double() - p @ e).abs()
    assert (err <= bound).all(), f"max error {err.max():.3e} (bound {bound.max():.3e})"
    assert err.max() > 0                                        # the int8 path, not an exact one
    assert torch.equal(cpu_vocab.soft_embedding(probs.float(), E), native.qmatmul_t(probs.float(), E))
    native.set_int8(False)
    assert not cpu_vocab.int8_soft(E)
    assert torch.equal(cpu_vocab.soft_embedding(probs, E), native.qmatmul_t(probs, E))
    key = id(E.raw)
    del E
    assert key not in cpu_vocab._transposed                     # the copy goes with the embedding
