"""The C++ CPU kernels (kernels/native, loaded by diffcli.native) against the oracles.

- dequantization: bit-exact against gguf.quants.dequantize (and so against quants.dequantize_torch)
  on random valid blocks;
- qmatmul: against x @ W.T in float64 with W dequantized by gguf-py, for odd T and N (tail tiles)
  and K spanning several 256-wide slices or ending in a partial one;
- moe: against ops.moe_torch on gguf-py-dequantized float64 weights, with idle experts;
- the bf16 entry points (bf16 activations): against float64 products of the bf16-rounded operands.

The library is built once per session into a temporary folder (cmake + a C++17 compiler), for
this CPU (-march=native) and, on x86, also as the portable build (scalar fallback) and the AVX2
build, so every SIMD path that can run here is checked (tests/_native_builds.py). On a CPU with
AMX the native build runs twice: with the AMX tile kernels (its default) and with them switched
off (the AVX512-BF16 ones). The int8 kernels are checked in tests/test_native_q8.py.
"""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from diffcli.compute import draws, native, ops
from diffcli.gguf import quants
from diffcli.compute.backend import set_backend
from diffcli.gguf.qtensor import QTensor

from _bounds import decode_magnitude, matmul_bound, unit_roundoff
from _native_builds import NO_AMX, lib  # noqa: F401 (the fixture)
from _native_builds import cpu_flags as _cpu_flags
from _qblocks import random_blocks, reference
from _qblocks import random_routing as _routing

QUANT_TYPES = ["Q8_0", "Q5_0", "Q4_K", "Q6_K"]
FLOAT_TYPES = ["F32", "F16", "BF16"]


def test_amx_follows_the_cpu(lib):
    """AMX is used exactly where the CPU has AMX-BF16 (and -march=native saw it), unless switched
    off; the portable and AVX2 builds never use it. (The kernel must also grant the tile state:
    Linux >= 5.16 does for any process that asks.)"""
    has = {"amx_bf16", "amx_tile"} <= _cpu_flags() and native.simd() == "avx512"
    assert native.amx_available() == has
    before = native.amx()
    try:
        native.set_amx(False)
        assert not native.amx()
        native.set_amx(True)
        assert native.amx() == has
    finally:
        native.set_amx(before)                  # the no-amx build keeps it off for the tests after


@pytest.fixture(autouse=True)
def float_products():
    """This module checks the fp32 and bf16 products; the int8 ones, the default in bf16 mode on
    a CPU with VNNI and no AMX, are tests/test_native_q8.py's."""
    native.set_int8(False)
    yield
    native.set_int8(None)


@pytest.fixture
def native_backend(lib):
    set_backend("native")
    yield
    set_backend(None)


def _float_raw(qtype, shape, rng):
    vals = (rng.standard_normal(int(np.prod(shape))) * 0.1).astype(np.float32)
    if qtype == "F32":
        return vals.view(np.uint8)
    if qtype == "F16":
        return vals.astype(np.float16).view(np.uint8)
    return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)   # BF16: upper half


def _weights(qtype, shape, rng, scale=0.05):
    """(QTensor, fp64 reference from gguf-py) for a random tensor of torch-order `shape`."""
    if qtype in FLOAT_TYPES:
        raw = _float_raw(qtype, shape, rng)
        ref = gguf_dequantize(raw, GGMLQuantizationType[qtype]).astype(np.float32)
        ref = torch.from_numpy(np.ascontiguousarray(ref)).reshape(shape)
    else:
        raw = random_blocks(qtype, shape, rng, scale=scale)
        ref = reference(raw, qtype, shape)
    return QTensor(torch.from_numpy(raw), qtype, tuple(shape), qtype), ref.double()


def test_load_line_names_the_cpu_kernels(native_backend):
    """The CLI's load line says which kernels multiply on the CPU (backend.cpu_kernels)."""
    from diffcli.compute import backend
    said = backend.cpu_kernels()
    assert said.startswith(f"native {native.simd()}")
    assert said.endswith(" + AMX") == native.amx()
    before = native.amx()
    native.set_amx(False)
    try:
        assert "AMX" not in backend.cpu_kernels()
        assert backend.cpu_kernels().endswith(" bf16") == native.has_bf16()
    finally:
        native.set_amx(before)
    set_backend("torch")
    assert backend.cpu_kernels() == "torch"


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES)
def test_block_sizes_match_gguf(lib, qtype):
    expected = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    assert native.block_info(qtype) == expected == native._BLOCKS[qtype]


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES)
def test_dequantize_bit_exact(lib, qtype):
    rng = np.random.default_rng(1)
    qt, ref = _weights(qtype, (24, 512), rng, scale=1.0)
    got = native.dequantize(qt)
    assert got.shape == (24, 512)
    # compare bit patterns: equal values, equal signs of zero
    assert torch.equal(got.view(torch.int32), ref.float().view(torch.int32))
    assert torch.equal(got.view(torch.int32), quants.dequantize_torch(qt.raw, qtype).view(torch.int32)
                       .view(24, 512))


def _fp32_bound(x, ref, qt):
    """|fp32 kernel - exact| per output (tests/_bounds.py): a K-term fp32 sum against the exact
    one, gamma(K) |x| @ |W|.T, plus the weights' decoding in the kernel's own order (2 u M)."""
    M = decode_magnitude(qt.raw, qt.qtype, tuple(ref.shape), ref)
    return (matmul_bound(x.double(), ref.double(), evaluations=1)
            + 2 * unit_roundoff(torch.float32) * (x.double().abs() @ M.T))


def _check_matmul(y, x, ref, qt):
    exact = x.double() @ ref.T                                          # [T, N]
    bound = _fp32_bound(x, ref, qt)
    assert y.dtype == x.dtype and y.shape == exact.shape
    assert torch.isfinite(y).all()
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), f"max error {err.max():.3e} (bound {bound.min():.3e}..)"


@pytest.mark.parametrize("qtype,K", [("Q4_K", 768), ("Q6_K", 512), ("Q8_0", 288), ("Q5_0", 96),
                                     ("F32", 100), ("F16", 272), ("BF16", 64)])
@pytest.mark.parametrize("T", [1, 3, 37, 256])
def test_qmatmul(lib, qtype, K, T):
    rng = np.random.default_rng(T)
    qt, ref = _weights(qtype, (37, K), rng)                             # N = 37: a partial tile
    x = torch.from_numpy(rng.standard_normal((T, K)).astype(np.float32))
    _check_matmul(native.qmatmul(x, qt), x, ref, qt)


def test_qlinear_dispatches_to_native(native_backend):
    rng = np.random.default_rng(5)
    qt, ref = _weights("Q4_K", (40, 256), rng)
    x = torch.from_numpy(rng.standard_normal((9, 256)).astype(np.float32))
    y = ops.qlinear(x, qt)
    _check_matmul(y, x, ref, qt)
    assert torch.equal(y, native.qmatmul(x, qt))
    yb = ops.qlinear(x.bfloat16(), qt)                                  # bf16 in, bf16 out
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, native.qmatmul(x.bfloat16(), qt, out_dtype=torch.float32).bfloat16())


def test_qmatmul_into_a_given_buffer(lib):
    """`out` receives the fp32 result (any layout of T * N elements) and is what comes back for
    an fp32 out_dtype; a buffer of the wrong size or dtype is refused before the kernel runs."""
    rng = np.random.default_rng(6)
    qt, _ = _weights("Q6_K", (40, 256), rng)
    x = torch.from_numpy(rng.standard_normal((9, 256)).astype(np.float32)).bfloat16()
    want = native.qmatmul(x, qt, out_dtype=torch.float32)
    buf = torch.full((9 * 40,), float("nan"))
    got = native.qmatmul(x, qt, out_dtype=torch.float32, out=buf)
    assert torch.equal(got, want) and got.data_ptr() == buf.data_ptr()
    for bad in (torch.empty(9 * 40 - 1), torch.empty(9 * 40, dtype=torch.float64), torch.empty(40, 18)[:, ::2]):
        with pytest.raises(ValueError, match="contiguous fp32"):
            native.qmatmul(x, qt, out=bad)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """What the bf16 kernels (qmatmul, qmatmul_t, moe) multiply: t rounded to bf16 (nearest even),
    where the library has bf16 dot products (AVX512-BF16 or AMX); elsewhere bf16 calls are widened
    to the fp32 kernels (weights unrounded)."""
    return t.to(torch.bfloat16).double() if native.has_bf16() else t.double()


@pytest.mark.parametrize("qtype,K", [("Q4_K", 768), ("Q6_K", 512), ("Q8_0", 288), ("Q5_0", 96),
                                     ("F32", 100), ("F16", 272), ("BF16", 64)])
@pytest.mark.parametrize("T", [1, 13, 37, 256])
def test_qmatmul_bf16(lib, qtype, K, T):
    """bf16 activations: the same products as a float64 matmul of the bf16-rounded operands, up to
    fp32 accumulation (checked on the fp32 output, before any rounding of the result)."""
    rng = np.random.default_rng(100 + T)
    qt, ref = _weights(qtype, (37, K), rng)
    x = torch.from_numpy(rng.standard_normal((T, K)).astype(np.float32)).bfloat16()
    y = native.qmatmul(x, qt, out_dtype=torch.float32)
    exact = x.double() @ _bf16(ref).T
    bound = 1e-5 * (x.double().abs() @ ref.abs().T) + 1e-7
    assert y.dtype == torch.float32 and y.shape == exact.shape
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), f"max error {err.max():.3e}"
    assert torch.equal(native.qmatmul(x, qt), y.bfloat16())            # default: x's dtype


@pytest.mark.parametrize("qtype,K", [("Q4_K", 512), ("Q6_K", 256), ("Q8_0", 96), ("Q5_0", 160),
                                     ("F32", 100), ("F16", 48), ("BF16", 64)])
def test_bf16_kernels_decode_exactly(lib, qtype, K):
    """One-hot bf16 rows pick single weights out of the product (one nonzero term per sum, so the
    sum is exact): qmatmul(I, W) = W^T and qmatmul_t(I, W) = W, each weight exactly as the kernel
    multiplies it: the fp32 decode rounded to bf16 (nearest even), or unrounded where the kernel
    multiplies in fp32 (see _bf16). Catches a decoder off by one bf16 ulp anywhere."""
    N = 37
    qt, ref = _weights(qtype, (N, K), np.random.default_rng(K))
    y = native.qmatmul(torch.eye(K).bfloat16(), qt, out_dtype=torch.float32)      # [K, N]
    assert torch.equal(y.T.double(), _bf16(ref.float()))
    yt = native.qmatmul_t(torch.eye(N).bfloat16(), qt)                              # [N, K]
    assert torch.equal(yt.double(), _bf16(ref.float()))


@pytest.mark.parametrize("gu_type,dn_type,F", [("Q4_K", "Q6_K", 256), ("Q8_0", "Q5_0", 96)])
def test_moe_bf16(native_backend, gu_type, dn_type, F):
    """bf16 experts: x and gelu(gate) * up are bf16 operands, every sum fp32. The reference rounds
    the same two operands; its float64 gate/up can round h the other way near a bf16 tie, so the
    bound is relative to the output's norm."""
    E, A, K, T = 8, 3, 256, 37
    rng = np.random.default_rng(11)
    gen = torch.Generator().manual_seed(11)
    gu, gu_ref = _weights(gu_type, (E, 2 * F, K), rng)
    dn, dn_ref = _weights(dn_type, (E, K, F), rng)
    x = torch.randn(T, K, generator=gen).bfloat16()
    ids, w = _routing(T, A, E, used=6, gen=gen)
    y = native.moe(x, gu, dn, ids, w, out_dtype=torch.float32)
    ref = torch.zeros(T, K, dtype=torch.float64)
    for t in range(T):
        for a in range(A):
            e = int(ids[t, a])
            g, u = (x[t].double() @ _bf16(gu_ref[e]).T).chunk(2)
            h = torch.nn.functional.gelu(g, approximate="tanh") * u
            h = h.bfloat16().double() if native.has_bf16() else h.float().bfloat16().double()
            ref[t] += w[t, a].double() * (h @ _bf16(dn_ref[e]).T)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-3, f"relative error {err:.2e}"
    assert ops.moe_experts(x, gu, dn, ids, w).dtype == torch.bfloat16  # dispatches here in bf16
    assert torch.equal(ops.moe_experts(x, gu, dn, ids, w), y.bfloat16())


@pytest.mark.parametrize("gu_type,dn_type,F", [("Q4_K", "Q6_K", 256), ("Q8_0", "Q5_0", 96),
                                               ("Q4_K", "Q8_0", 96), ("F16", "BF16", 48)])
@pytest.mark.parametrize("T", [1, 37, 256])
def test_moe(native_backend, gu_type, dn_type, F, T):
    E, A, K = 8, 3, 256
    rng = np.random.default_rng(T)
    gen = torch.Generator().manual_seed(T)
    gu, gu_ref = _weights(gu_type, (E, 2 * F, K), rng)
    dn, dn_ref = _weights(dn_type, (E, K, F), rng)
    x = torch.randn(T, K, generator=gen)
    ids, w = _routing(T, A, E, used=6, gen=gen)
    y = ops.moe_experts(x, gu, dn, ids, w)                              # dispatches to native.moe
    ref = ops.moe_torch(x.double(), gu_ref, dn_ref, ids, w.double())
    assert y.shape == (T, K) and y.dtype == torch.float32
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-5, f"relative error {err:.2e}"
    assert torch.equal(y, native.moe(x, gu, dn, ids, w))


def test_moe_with_an_expert_listed_twice(native_backend):
    """A token may name one expert twice (ops.moe_torch adds both); the native kernels then add
    two rows into one output row, which must not race (64 tokens: the threaded path)."""
    E, K, F, T = 4, 256, 96, 64
    rng = np.random.default_rng(8)
    gu, gu_ref = _weights("Q4_K", (E, 2 * F, K), rng)
    dn, dn_ref = _weights("Q8_0", (E, K, F), rng)
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(8))
    ids = torch.tensor([[t % E, t % E] for t in range(T)])
    w = torch.full((T, 2), 0.6)
    ref = ops.moe_torch(x.double(), gu_ref, dn_ref, ids, w.double())
    runs = [(native.moe(x, gu, dn, ids, w), 1e-5),                    # as test_moe
            (native.moe(x.bfloat16(), gu, dn, ids, w, out_dtype=torch.float32), 1e-2)]   # bf16 operands
    for y, tol in runs:
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < tol, f"relative error {err:.2e}"


def test_results_do_not_depend_on_threads(lib):
    rng = np.random.default_rng(3)
    gen = torch.Generator().manual_seed(3)
    gu, _ = _weights("Q4_K", (4, 192, 256), rng)
    dn, _ = _weights("Q8_0", (4, 256, 96), rng)
    x = torch.randn(50, 256, generator=gen)
    ids, w = _routing(50, 2, 4, used=4, gen=gen)
    calls = lambda xx: (native.qmatmul(xx, gu[0]), native.moe(xx, gu, dn, ids, w))   # noqa: E731
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = calls(x) + calls(x.bfloat16())
        torch.set_num_threads(2)
        two = calls(x) + calls(x.bfloat16())
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_bad_calls_raise(lib):
    rng = np.random.default_rng(4)
    qt, _ = _weights("Q8_0", (16, 64), rng)
    with pytest.raises(ValueError, match="features"):
        native.qmatmul(torch.zeros(2, 32), qt)
    gu, _ = _weights("Q8_0", (2, 64, 64), rng)
    dn, _ = _weights("Q8_0", (2, 64, 32), rng)
    with pytest.raises(ValueError, match="expert id out of range"):
        native.moe(torch.zeros(1, 64), gu, dn, torch.tensor([[2]]), torch.ones(1, 1))
    short = QTensor(qt.raw[:-34], "Q8_0", (16, 64), "short")          # one block missing
    with pytest.raises(ValueError, match="do not hold"):
        native.qmatmul(torch.zeros(2, 64), short)
    assert native.supports("Q4_K") and not native.supports("IQ4_XS")
    assert not native.supports("F32")          # the BLAS on the zero-copy view is faster
    assert native.supports("F32", torch.bfloat16)   # ... but bf16 would convert it on every call
    assert native.main(["frobnicate"]) == 2


def test_ops_dequantize_uses_native_bit_exact(native_backend):
    rng = np.random.default_rng(6)
    qt, ref = _weights("Q6_K", (8, 512), rng)
    got = ops.dequantize(qt)
    assert got.shape == (8, 512) and got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), ref.float().view(torch.int32))
    assert ops.dequantize(qt, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("C,V,scale", [(256, 4096, 3.0), (5, 700, 30.0), (1, 3, 0.5)])
def test_sample_is_torch_multinomial(lib, C, V, scale):
    """dn_sample runs torch's CPU generator itself: the same tokens as torch.multinomial and the
    same generator state after, over several draws in a row (the generator state crosses many
    MT19937 regenerations), with zero-probability entries that must never be drawn."""
    assert draws._state_layout_ok()
    data = torch.Generator().manual_seed(C + V)
    ours, theirs = torch.Generator().manual_seed(C), torch.Generator().manual_seed(C)
    for _ in range(3):
        probs = torch.softmax(torch.randn(C, V, generator=data) * scale, dim=-1)
        probs[:, ::3] = 0.0
        got = draws.sample(probs, ours)
        assert torch.equal(got, torch.multinomial(probs, 1, generator=theirs).view(C))
        assert (got % 3 != 0).all()
        assert torch.equal(ours.get_state(), theirs.get_state())


# --- the vocabulary side (dn_vocab, dn_draw_bf16; diffcli/compute/vocab.py) ---------------------
#
# Reference: float64 softcap, tempering, softmax, logsumexp, entropy and argmax of the same fp32
# (or bf16) logits. Error budget of the kernel, eps = 2^-24 (fp32 unit roundoff):
#   z = cap tanh(l / cap): tanh from e^(-2|y|) with relative error <= 2^-22 (exp16's polynomial,
#       or libm's expf) and three roundings -> |dz| <= cap * 8 eps + |z| * 4 eps;
#   t = z / T: |dt| <= delta = |dz| / T + |t| eps;
#   S, Q: partial sums of at most 64 fp32 terms (<= 64 eps relative to the sum of magnitudes),
#       each term with its own exp error (2^-22 = 4 eps) and the delta of t (relative e^delta - 1);
#   lse = max + log S: <= delta + (64 + 4 + 2) eps + 2 delta (the max itself carries delta);
#   entropy = log S - Q / S: moving every t by <= delta moves H by <= 2 delta sum p |t - E t|;
#       the rounding of the sums adds (70 eps)(1 + sum p |t - max|);
#   probs: bf16 rounding (<= 2^-8 relative: 8 significant bits) of p, whose own relative error is <= 4 delta + 70 eps.
EPS = 2.0 ** -24


def _vocab_reference(logits, cap, T):
    l = logits.double()
    z = cap * torch.tanh(l / cap) if cap else l
    t = z / T
    p = torch.softmax(t, dim=-1)
    lse = torch.logsumexp(t, dim=-1)
    ent = -(p * torch.log_softmax(t, dim=-1)).sum(-1)
    zmax = z.abs().amax(-1, keepdim=True)
    delta = ((cap or 0) * 8 * EPS + zmax * 4 * EPS) / T + t.abs().amax(-1, keepdim=True) * EPS
    return t, p, lse, ent, delta.squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C,V,cap,T,scale", [(3, 262144, 30.0, 0.8, 6.0), (4, 1037, 30.0, 0.4, 40.0),
                                              (2, 5, None, 1.0, 2.0), (5, 4099, 0.0, 0.55, 3.0)])
def test_vocab_matches_float64(lib, dtype, C, V, cap, T, scale):
    gen = torch.Generator().manual_seed(V + C)
    logits = (torch.randn(C, V, generator=gen) * scale).to(dtype)
    probs, argmax, lse, ent = native.vocab(logits, cap, T)
    t, p, lse_ref, ent_ref, delta = _vocab_reference(logits, cap, T)
    assert probs.dtype == torch.bfloat16 and probs.shape == (C, V)
    assert argmax.dtype == torch.int64 and lse.dtype == ent.dtype == torch.float32
    # argmax: the reference's value there is a maximum up to the kernel's error on t
    rows = torch.arange(C)
    assert (t[rows, argmax] >= t.amax(-1) - 2 * delta).all()
    top = t.topk(2, dim=-1).values
    clear = top[:, 0] - top[:, 1] > 2 * delta                          # no near-tie: must be exact
    assert torch.equal(argmax[clear], t.argmax(-1)[clear])
    lse_bound = 3 * delta + 70 * EPS * (1 + lse_ref.abs())
    assert ((lse.double() - lse_ref).abs() <= lse_bound).all(), (lse.double() - lse_ref).abs().max()
    mean_t = (p * t).sum(-1, keepdim=True)
    spread = (p * (t - mean_t).abs()).sum(-1)
    gap = (p * (t - t.amax(-1, keepdim=True)).abs()).sum(-1)
    ent_bound = 2 * delta * spread + 70 * EPS * (1 + gap) + 70 * EPS * ent_ref.abs()
    assert ((ent.double() - ent_ref).abs() <= ent_bound).all(), (ent.double() - ent_ref).abs().max()
    rel = 2.0 ** -8 + (4 * delta + 70 * EPS)[:, None]
    assert ((probs.double() - p).abs() <= p * rel + 2e-38).all()


def test_vocab_in_place_and_threads(lib):
    gen = torch.Generator().manual_seed(9)
    logits = (torch.randn(7, 3001, generator=gen) * 5).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.vocab(logits, 30.0, 0.7)
        torch.set_num_threads(2)
        two = native.vocab(logits, 30.0, 0.7)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    buf = logits.clone()
    inplace = native.vocab(buf, 30.0, 0.7, in_place=True)
    assert inplace[0].data_ptr() == buf.data_ptr()
    for a, b in zip(one, inplace):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="temperature"):
        native.vocab(logits, 30.0, 0.0)


@pytest.mark.parametrize("C,V", [(64, 5003), (3, 262144)])
def test_draw_bf16_is_the_inverse_cdf(lib, C, V):
    """The drawn index v has cum[v] <= u * total < cum[v + 1] (float64 running sums of the bf16
    values), up to the kernel's sums: 16-value fp32 chunks (<= 15 eps relative each) added in
    fp64, so within 16 eps * total of the boundary; zero-probability entries are never drawn."""
    gen = torch.Generator().manual_seed(C)
    probs = torch.softmax(torch.randn(C, V, generator=gen) * 3, dim=-1)
    probs[:, ::4] = 0.0
    probs = probs.bfloat16()
    u = torch.rand(C, dtype=torch.float64, generator=gen)
    u[0], u[-1] = 0.0, 1.0 - 2.0 ** -53                               # both ends of [0, 1)
    got = draws.draw_bf16(probs, u)
    p = probs.double()
    cum = torch.cumsum(p, dim=-1)
    total = cum[:, -1]
    thr = u * total
    rows = torch.arange(C)
    assert (p[rows, got] > 0).all()
    tol = 16 * EPS * total
    assert (cum[rows, got] - p[rows, got] <= thr + tol).all()          # starts at or before thr
    assert (cum[rows, got] > thr - tol).all()                          # ends after thr
    assert got[0] == int((p[0] > 0).nonzero()[0])                      # u = 0: the first p > 0
    assert got[-1] == int((p[-1] > 0).nonzero()[-1])                   # u -> 1: the last one


def test_draw_bf16_frequencies(lib):
    """Many draws from one small distribution: the frequencies are the probabilities (a chi-square
    bound far out in the tail, p-value ~1e-9 for 4 degrees of freedom)."""
    p = torch.tensor([[0.1, 0.0, 0.2, 0.3, 0.15, 0.25]]).bfloat16()
    n = 20000
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = draws.draw_bf16(p.expand(n, -1).contiguous(), u)
    counts = torch.bincount(got, minlength=6).double()
    expect = p[0].double() / p[0].double().sum() * n
    assert counts[1] == 0
    keep = expect > 0
    chi2 = (((counts - expect) ** 2)[keep] / expect[keep]).sum()
    assert chi2 < 45.0, chi2


@pytest.mark.parametrize("qtype,K", [("Q6_K", 512), ("Q4_K", 768), ("Q8_0", 288), ("Q5_0", 96),
                                     ("F32", 100), ("BF16", 64),
                                     ("Q6_K", 1280)])   # 5 column slices: AMX groups of 3 and 2
@pytest.mark.parametrize("T,N", [(1, 37), (13, 300), (256, 130),
                                 (5, 1100)])    # parts of 275 rows: chunks of 128 and a partial one
def test_qmatmul_t(lib, qtype, K, T, N):
    """x [T, N] @ W [N, K] from W's blocks: against float64 with W dequantized by gguf-py (fp32
    products and sums: each output a sum of N terms split in 4 ordered parts of 64-row tiles ->
    bounded by (N + 8) eps32 * sum |x| |W|, within the 1e-5 relative slack used for qmatmul here);
    bf16 x is the same matmul of the bf16 values (widened exactly), times W rounded to bf16 where
    the library has bf16 dot products (_bf16)."""
    rng = np.random.default_rng(T * N)
    qt, ref = _weights(qtype, (N, K), rng)
    x = torch.from_numpy(rng.standard_normal((T, N)).astype(np.float32))
    for xx in (x, x.bfloat16()):
        y = native.qmatmul_t(xx, qt)
        exact = xx.double() @ (_bf16(ref) if xx.dtype == torch.bfloat16 else ref)
        bound = (N + 8) * 2.0 ** -24 * (xx.double().abs() @ ref.abs()) + 1e-30
        assert y.dtype == torch.float32 and y.shape == (T, K)
        assert ((y.double() - exact).abs() <= bound).all()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.qmatmul_t(x, qt), native.qmatmul_t(x.bfloat16(), qt)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], native.qmatmul_t(x, qt))
    assert torch.equal(one[1], native.qmatmul_t(x.bfloat16(), qt))
    with pytest.raises(ValueError, match="rows"):
        native.qmatmul_t(x[:, :-1], qt)


def test_no_amx_build_stayed_off(lib, request):
    """Each group ran the kernels it names, to its last test: the native/no-amx group the
    AVX512-BF16 ones (no test turned AMX back on), the others AMX wherever it is available."""
    off = request.node.callspec.params["lib"] == NO_AMX
    assert native.amx() == (native.amx_available() and not off)
