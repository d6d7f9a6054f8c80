"""The int8 kernels (kernels/native/q8.cpp: dn_qmatmul_q8, dn_moe_q8, dn_quantize_q8) on every
SIMD build this CPU can run (AVX512-VNNI where -march=native has it, the portable loops in the
x86-64 baseline and AVX2 builds).

The oracle has two parts, both independent of the kernels:
- the activations' int8 rounding, replicated in numpy fp32 (the same IEEE operations: 127 / max|x|,
  x * that, round half to even; dx = max|x| / 127): the kernel's xq, dx and sums (sx, or the
  integer zx) must be equal to it;
- the product of those rounded activations x^ = dx * xq with the weights dequantized by gguf-py,
  in float64. The kernel sums exact integer dot products per group of 32 (Q6_K: per half of 16)
  and adds a few fp32 terms per group, so it is within 2 gamma(K / 32 + 4) of |x^| @ M^T, M the
  magnitude of those terms per weight. Q4_K adds (dx * dl) * isum and ml * sx: M = |dl u| + |ml|
  (tests/_bounds.py's decode_magnitude). Q5_0, Q8_0 and Q6_K, whose offset is a whole number of
  scales, keep it in the integers (the sum starts at zx) and add dx * dl * (signed sum): M = |w|.
A third check ties the result to the unrounded x: |y - x @ W^T| <= sum_k |x - x^| |W| plus that
fp32 slack, with |x - x^| <= dx / 2 (the cost of int8, as the note in q8.cpp says).
"""
import numpy as np
import pytest
import torch

from diffcli.compute import native, ops
from diffcli.compute.backend import set_backend
from diffcli.gguf.qtensor import QTensor

from _bounds import decode_magnitude, gamma
from _native_builds import lib  # noqa: F401 (the fixture)
from _qblocks import F16_FIELDS, random_blocks, reference
from _qblocks import random_routing as _routing

Q8 = ["Q4_K", "Q5_0", "Q6_K", "Q8_0"]
OFFSET = {"Q5_0": 16, "Q8_0": 128, "Q6_K": 32}         # in whole scales


@pytest.fixture
def int8(lib):
    native.set_int8(True)
    set_backend("native")
    yield
    native.set_int8(None)
    set_backend(None)


TINY = np.float32(127) / np.finfo(np.float32).max    # below it 127 / max|x| would overflow


def quantize_ref(x: np.ndarray, qtype: str = "Q4_K"):
    """(xq int8 [T, K], dx [T, K / 32], sums) as q8.cpp rounds x for weights of qtype, in numpy
    fp32: sums = sx = dx * sum(xq) per group for Q4_K, zx = -offset * sum(xq) int32 per 32 values
    (per 16 for Q6_K) for the others. A group with max|x| < TINY is zeros, one holding a NaN or
    an inf has xq = zx = 0 and dx = sx = NaN."""
    T, K = x.shape
    g = x.astype(np.float32).reshape(T, K // 32, 32)
    finite = np.isfinite(g).all(-1)
    g = np.where(np.isfinite(g), g, np.float32(0))        # those groups are zeros anyway
    amax = np.where(finite, np.abs(g).max(-1), np.float32(0))
    live = finite & (amax >= TINY)
    safe = np.where(live, amax, np.float32(1))
    inv = np.where(live, np.float32(127) / safe, np.float32(0)).astype(np.float32)
    xq = np.rint(g * inv[..., None]).astype(np.int8)
    dx = np.where(live, amax / np.float32(127), np.float32(0)).astype(np.float32)
    if qtype == "Q4_K":
        sx = (dx * xq.astype(np.int32).sum(-1).astype(np.float32)).astype(np.float32)
        dx[~finite], sx[~finite] = np.nan, np.nan
        return xq.reshape(T, K), dx, sx
    sub = 16 if qtype == "Q6_K" else 32
    zx = -OFFSET[qtype] * xq.astype(np.int32).reshape(T, K // 32, 32 // sub, sub).sum(-1)
    dx[~finite] = np.nan
    return xq.reshape(T, K), dx, zx.reshape(T, K // sub).astype(np.int32)


def dequantized_x(xq: np.ndarray, dx: np.ndarray) -> torch.Tensor:
    T, K = xq.shape
    v = xq.reshape(T, K // 32, 32).astype(np.float64) * dx[..., None].astype(np.float64)
    return torch.from_numpy(v.reshape(T, K))


def weights(qtype, shape, rng):
    raw = random_blocks(qtype, shape, rng, scale=0.05)
    return QTensor(torch.from_numpy(raw), qtype, tuple(shape), qtype), reference(raw, qtype, shape).double()


def magnitude(qt: QTensor, w: torch.Tensor) -> torch.Tensor:
    """M [N, K]: the size of the fp32 terms the kernel adds per weight: |dl u| + |ml| for Q4_K,
    |w| for the types whose offset stays in the integers."""
    if qt.qtype == "Q4_K":
        return decode_magnitude(qt.raw, "Q4_K", tuple(qt.shape), w)
    return w.abs()


def rows(T, K, rng):
    """Activations with the cases the rounding must handle: an all-zero group, a group of one
    value, negative maxima, a wide range of magnitudes."""
    x = (rng.standard_normal((T, K)) * np.exp(rng.uniform(-3, 3, (T, 1)))).astype(np.float32)
    x[0, :32] = 0.0
    if K >= 64:
        x[-1, 32:64] = 0.0
        x[-1, 40] = -7.5
    return x


def test_quantize_matches_numpy(lib):
    rng = np.random.default_rng(1)
    x = rows(9, 320, rng)
    for xx in (torch.from_numpy(x), torch.from_numpy(x).bfloat16()):
        for qtype in Q8:
            xq, dx, sums = native.quantize_q8(xx, qtype)
            want = quantize_ref(xx.float().numpy(), qtype)
            assert torch.equal(xq, torch.from_numpy(want[0])) and torch.equal(dx, torch.from_numpy(want[1]))
            assert torch.equal(sums, torch.from_numpy(want[2])), qtype
    assert sums.dtype == torch.int32 and sums.shape == (9, 10)               # Q8_0: per 32
    assert native.quantize_q8(xx, "Q6_K")[2].shape == (9, 20)                # Q6_K: per 16
    assert xq.abs().max() == 127 and (xq[0, :32] == 0).all() and dx[0, 0] == 0
    # groups the rounding cannot scale: max|x| below 127 / FLT_MAX (zeros), a NaN, an inf
    odd = np.ones((4, 64), np.float32)
    odd[0, :32] = 1e-37
    odd[1, 3], odd[2, 40], odd[3, 0] = np.nan, np.inf, -np.inf
    for qtype in ("Q4_K", "Q6_K"):
        got = native.quantize_q8(torch.from_numpy(odd), qtype)
        want = quantize_ref(odd, qtype)
        assert torch.equal(got[0], torch.from_numpy(want[0]))
        for a, b in zip(got[1:], want[1:]):
            assert torch.equal(a.isnan(), torch.from_numpy(np.isnan(b)))
            assert torch.equal(a.nan_to_num(), torch.from_numpy(np.nan_to_num(b)))
        assert got[1][0, 0] == 0 and got[1][1, 0].isnan() and got[1][2, 1].isnan() and got[1][1, 1] == 1 / 127
    with pytest.raises(ValueError, match="multiple of 32"):
        native.quantize_q8(torch.zeros(2, 48))
    with pytest.raises(ValueError, match="F16 has no int8 kernels"):
        native.quantize_q8(torch.zeros(2, 64), "F16")


@pytest.mark.parametrize("qtype,K", [("Q4_K", 768), ("Q5_0", 96), ("Q8_0", 288), ("Q5_0", 704),
                                     ("Q6_K", 256), ("Q6_K", 768),
                                     # a long K goes in chunks of 64 groups (q8.cpp's KC), the
                                     # last one short, here also of a partial slice (150 groups)
                                     ("Q8_0", 4800), ("Q6_K", 4608), ("Q4_K", 4352)])
@pytest.mark.parametrize("T", [1, 13, 37, 256])
def test_qmatmul_q8(int8, qtype, K, T):
    rng = np.random.default_rng(7 * T + K)
    qt, w = weights(qtype, (37, K), rng)                               # N = 37: a partial tile
    x = torch.from_numpy(rows(T, K, rng)).bfloat16()
    y = native.qmatmul(x, qt, out_dtype=torch.float32)
    xq, dx, _ = quantize_ref(x.float().numpy())
    xh = dequantized_x(xq, dx)
    exact = xh @ w.T
    slack = 2 * gamma(K // 32 + 4) * (xh.abs() @ magnitude(qt, w).T) + 1e-30
    err = (y.double() - exact).abs()
    assert (err <= slack).all(), f"max error {err.max():.3e} (slack {slack.max():.3e})"
    # against the unrounded activations: within the int8 rounding, dx / 2 per value
    half = torch.from_numpy(np.repeat(dx.astype(np.float64) / 2, 32, axis=1))
    cost = half @ w.abs().T
    assert ((y.double() - x.double() @ w.T).abs() <= cost + slack).all()
    assert torch.equal(ops.qlinear(x, qt), y.bfloat16())              # ops dispatches here
    bad = x.clone()
    bad[0, K - 1] = float("nan")                                      # a NaN reaches every output
    yb = native.qmatmul(bad, qt, out_dtype=torch.float32)
    assert yb[0].isnan().all() and torch.equal(yb[1:], y[1:])


@pytest.mark.parametrize("qtype,K", [("Q8_0", 288), ("Q8_0", 4800), ("Q6_K", 768), ("Q4_K", 512)])
@pytest.mark.parametrize("T", [1, 13, 256])
def test_qmatmul_q8_nonnegative_x(int8, qtype, K, T):
    """Probabilities as x (the self-conditioning product's: >= 0, most tiny, some exactly 0): on
    AVX2 the Q8_0 kernel takes a different instruction sequence when no xq is negative. Against
    the same oracle as test_qmatmul_q8; one negative value anywhere takes the general path, and
    the rows it does not touch come out the same."""
    rng = np.random.default_rng(5 * T + K)
    qt, w = weights(qtype, (37, K), rng)
    logits = rng.standard_normal((T, K)) * 4.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p[:, 64:96] = 0.0                                                 # a group of zeros
    x = torch.from_numpy((p / p.sum(-1, keepdims=True)).astype(np.float32)).bfloat16()
    y = native.qmatmul(x, qt, out_dtype=torch.float32)
    xq, dx, _ = quantize_ref(x.float().numpy())
    assert (xq >= 0).all()
    xh = dequantized_x(xq, dx)
    exact = xh @ w.T
    slack = 2 * gamma(K // 32 + 4) * (xh.abs() @ magnitude(qt, w).T) + 1e-30
    err = (y.double() - exact).abs()
    assert (err <= slack).all(), f"max error {err.max():.3e} (slack {slack.max():.3e})"
    mixed = x.clone()
    mixed[0, 0] = -mixed[0, 0] - 1e-3
    ym = native.qmatmul(mixed, qt, out_dtype=torch.float32)
    assert torch.equal(ym[1:], y[1:])


# Quant bytes that make every quant its type's largest (Q8_0: +127 and -128 in alternate rows).
EXTREME = {"Q4_K": 0xFF, "Q5_0": 0xFF, "Q6_K": 0xFF}


@pytest.mark.parametrize("qtype,K", [("Q4_K", 512), ("Q5_0", 704), ("Q6_K", 512), ("Q8_0", 288)])
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("signs", ["alternating", "positive"])
def test_qmatmul_q8_largest_quants(int8, qtype, K, T, signs):
    """Every quant at its extreme and |xq| = 127 everywhere, with one sign per row: the largest
    integer sums the kernels form. The AVX2 kernel adds vpmaddubsw's 16-bit pair sums over
    several quads before widening (8 for Q4_K, 4 for Q5_0, 2 for Q6_K) and takes Q8_0's quants
    signed; one quad too many, or Q8_0 unsigned, overflows 2^15 here (random blocks never get
    near it). All rows positive: for Q8_0 the AVX2 kernel then takes x as the unsigned operand
    (pairs of 127 * 127 and 127 * -128)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    rng = np.random.default_rng(K + T)
    N = 21
    raw = random_blocks(qtype, (N, K), rng, scale=0.05)
    per, bsize = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    blocks = raw.reshape(N, K // per, bsize)
    keep = np.zeros(bsize, bool)
    for off in F16_FIELDS[qtype]:
        keep[off:off + 2] = True
    if qtype == "Q8_0":
        blocks[0::2, :, ~keep] = 0x7F
        blocks[1::2, :, ~keep] = 0x80
    else:
        blocks[:, :, ~keep] = EXTREME[qtype]
    qt = QTensor(torch.from_numpy(raw), qtype, (N, K), qtype)
    w = reference(raw, qtype, (N, K)).double()
    sign = np.where((np.arange(T) % 2 == 0) | (signs == "positive"), 1.0, -1.0).astype(np.float32)[:, None]
    x = torch.from_numpy(np.repeat(sign, K, axis=1) * np.float32(0.75)).bfloat16()
    y = native.qmatmul(x, qt, out_dtype=torch.float32)
    xq, dx, _ = quantize_ref(x.float().numpy())
    assert (np.abs(xq) == 127).all()
    xh = dequantized_x(xq, dx)
    exact = xh @ w.T
    slack = 2 * gamma(K // 32 + 4) * (xh.abs() @ magnitude(qt, w).T) + 1e-30
    err = (y.double() - exact).abs()
    assert (err <= slack).all(), f"max error {err.max():.3e} (slack {slack.max():.3e})"


def test_int8_is_for_bf16_activations_and_q8_types(int8):
    """f32 activations keep the exact fp32 kernels; a type the int8 kernels lack (F16) keeps
    the bf16 one; the switch turns it all back."""
    rng = np.random.default_rng(3)
    q4, _ = weights("Q4_K", (20, 256), rng)
    q6, _ = weights("Q6_K", (20, 256), rng)
    f16 = QTensor(torch.randn(20, 256).half().view(torch.uint8).reshape(-1), "F16", (20, 256), "F16")
    x = torch.from_numpy(rows(5, 256, rng))
    xb = x.bfloat16()

    def run():
        return [native.qmatmul(x, q4), native.qmatmul(xb, f16, out_dtype=torch.float32),
                native.qmatmul(xb, q4, out_dtype=torch.float32), native.qmatmul(xb, q6, out_dtype=torch.float32)]
    on = run()
    native.set_int8(False)
    off = run()
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
    assert not torch.equal(on[2], off[2]) and not torch.equal(on[3], off[3])   # int8 products, not bf16
    assert not native.int8()


@pytest.mark.parametrize("gu_type,dn_type,F", [("Q4_K", "Q5_0", 96), ("Q8_0", "Q8_0", 64),
                                               ("Q4_K", "Q8_0", 704), ("Q6_K", "Q6_K", 256),
                                               ("Q5_0", "Q6_K", 512)])
@pytest.mark.parametrize("T", [1, 37])
def test_moe_q8(int8, gu_type, dn_type, F, T):
    """x rounded to int8 once per token, gelu(gate) * up once per (expert, token) from fp32. The
    reference rounds the same two operands the same way (h from float64, rounded to fp32 first);
    near a rounding step of h the two can pick neighbouring int8 values, so the bound is relative
    to the output's norm (one step moves an output by dx / 127 of |D|, far below 1e-4 here)."""
    E, A, K = 8, 3, 256
    rng = np.random.default_rng(11 + T)
    gen = torch.Generator().manual_seed(11 + T)
    gu, gu_w = weights(gu_type, (E, 2 * F, K), rng)
    dn, dn_w = weights(dn_type, (E, K, F), rng)
    x = torch.from_numpy(rows(T, K, rng)).bfloat16()
    ids, w = _routing(T, A, E, used=6, gen=gen)
    y = native.moe(x, gu, dn, ids, w, out_dtype=torch.float32)
    xq, dx, _ = quantize_ref(x.float().numpy())
    xh = dequantized_x(xq, dx)
    ref = torch.zeros(T, K, dtype=torch.float64)
    for t in range(T):
        for a in range(A):
            e = int(ids[t, a])
            g, u = (xh[t] @ gu_w[e].T).chunk(2)
            h = (torch.nn.functional.gelu(g, approximate="tanh") * u).float().numpy()[None]
            hq, dh, _ = quantize_ref(h)
            ref[t] += w[t, a].double() * (dequantized_x(hq, dh)[0] @ dn_w[e].T)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-4, f"relative error {err:.2e}"
    assert torch.equal(ops.moe_experts(x, gu, dn, ids, w), y.bfloat16())   # ops dispatches here
    native.set_int8(False)
    assert not torch.equal(native.moe(x, gu, dn, ids, w, out_dtype=torch.float32), y)


def test_q8_results_do_not_depend_on_threads(int8):
    rng = np.random.default_rng(5)
    gen = torch.Generator().manual_seed(5)
    gu, _ = weights("Q4_K", (4, 192, 256), rng)
    dn, _ = weights("Q5_0", (4, 256, 96), rng)
    x = torch.from_numpy(rows(50, 256, rng)).bfloat16()
    ids, w = _routing(50, 2, 4, used=4, gen=gen)
    before = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got.append((native.qmatmul(x, gu[0], out_dtype=torch.float32), native.moe(x, gu, dn, ids, w)))
    finally:
        torch.set_num_threads(before)
    for a, b in got[1:]:
        assert torch.equal(a, got[0][0]) and torch.equal(b, got[0][1])


def test_q8_entry_points_refuse_other_types(lib):
    """The C side checks the type itself (Python never routes F16 or BF16 there)."""
    raw = torch.zeros(16 * 256, dtype=torch.float16)
    x, y = torch.zeros(2, 256), torch.empty(2, 16)
    lib_ = native._library()
    assert lib_.dn_qmatmul_q8(x.data_ptr(), 2, 256, raw.data_ptr(), 1, 16, y.data_ptr()) == -1
    assert [lib_.dn_q8_supports(native.QTYPE_IDS[q]) for q in native.QTYPE_IDS] == \
        [q in native.Q8_TYPES for q in native.QTYPE_IDS]
    assert lib_.dn_q8_supports(14) == 1 and lib_.dn_q8_supports(1) == 0 and lib_.dn_q8_supports(30) == 0
    xq, dx, sx = torch.empty(2, 256, dtype=torch.int8), torch.empty(2, 8), torch.empty(2, 16)
    assert lib_.dn_quantize_q8(x.data_ptr(), 2, 256, 1, xq.data_ptr(), dx.data_ptr(), sx.data_ptr(), None) == -1


def test_vnni_follows_the_cpu(lib):
    """The AVX512-VNNI kernels are compiled in exactly where -march=native saw the instructions;
    the x86-64 baseline and AVX2 builds run the portable loops (and are checked above as well)."""
    from _native_builds import cpu_flags
    has = {"avx512_vnni", "avx512bw", "avx512vl"} <= cpu_flags() and native.simd() == "avx512"
    assert native.has_vnni() == has


def test_q8_simd_follows_the_build(lib):
    """The int8 kernels run on VNNI where the build has it, on vpmaddubsw in every other AVX2 or
    AVX-512 build, and as plain loops in the x86-64 baseline (and where neither exists)."""
    want = "vnni" if native.has_vnni() else "avx2" if native.simd() in ("avx2", "avx512") else "portable"
    assert native.q8_simd() == want


def test_int8_default_follows_the_cpu(lib, monkeypatch):
    """Unset (or auto), int8 is on exactly where the library has fast int8 products (VNNI or
    AVX2) and no AMX tiles are in use; switching the tiles off (where the CPU has them) turns it
    on, the environment and set_int8 override it, and the x86-64 baseline build leaves it off."""
    monkeypatch.delenv("DIFFCLI_NATIVE_INT8", raising=False)
    native.set_int8(None)
    vnni = native.q8_simd() != "portable"         # per test_q8_simd_follows_the_build
    assert native.int8() == (vnni and not native.amx())
    before = native.amx()
    try:
        if native.amx_available():
            native.set_amx(True)
            assert not native.int8()              # the bf16 tiles are faster
            native.set_amx(False)
            assert native.int8() == vnni
        monkeypatch.setenv("DIFFCLI_NATIVE_INT8", "0")
        assert not native.int8()
        monkeypatch.setenv("DIFFCLI_NATIVE_INT8", "on")
        assert native.int8()
        native.set_int8(False)                    # the API over the environment
        assert not native.int8()
        monkeypatch.setenv("DIFFCLI_NATIVE_INT8", "auto")
        native.set_int8(None)
        assert native.int8() == (vnni and not native.amx())
    finally:
        native.set_amx(before)
        native.set_int8(None)


@pytest.mark.parametrize("word,value", [("1", True), ("ON", True), ("yes", True), ("0", False),
                                        (" off ", False), ("false", False), ("auto", None), ("", None)])
def test_int8_environment_words(monkeypatch, word, value):
    monkeypatch.setenv("DIFFCLI_NATIVE_INT8", word)
    assert native._int8_from_env() is value
    native.check_settings()


def test_int8_environment_bad_word(monkeypatch):
    from diffcli.errors import InputError
    monkeypatch.setenv("DIFFCLI_NATIVE_INT8", "Fast")
    with pytest.raises(InputError, match="DIFFCLI_NATIVE_INT8='Fast'"):
        native.check_settings()


def test_load_line_says_int8_for_bf16_only(int8):
    from diffcli.compute import backend
    assert backend.cpu_kernels(torch.bfloat16, {"Q4_K", "Q6_K"}).endswith(" + int8")
    assert "int8" not in backend.cpu_kernels(torch.float32, {"Q4_K"})
    assert backend.cpu_kernels(torch.bfloat16, {"F32", "Q6_K"}).endswith(" + int8")
    assert "int8" not in backend.cpu_kernels(torch.bfloat16, {"F32", "F16"})   # no weight it takes
    native.set_int8(False)
    assert "int8" not in backend.cpu_kernels(torch.bfloat16, {"Q4_K"})


def test_model_step_in_int8(lib, tmp_path):
    """The tiny model (Q8_0) in bf16 mode with int8 on: every projection, expert and head call
    goes to the int8 entry points, and the step's logits stay near f32 mode's. How near: int8
    rounds each activation to 1/254 of its group's largest value, ~2-5x the noise of bf16's
    8-bit mantissa on Gaussian-like rows (and keeps the weights exact where bf16 rounds them), so
    the int8 step is within 4x the bf16 step's own distance from f32 (measured: 2.3x); a wrong
    scale or a dropped group lands at O(1)."""
    pytest.importorskip("transformers")            # make_tiny_gguf builds the model with it
    import collections

    import diffcli
    from diffcli.testing import make_tiny_gguf
    path, _ = make_tiny_gguf(tmp_path / "tiny-q8.gguf", outtype="q8_0", seed=0)
    set_backend("native")
    try:
        prompt = torch.tensor([2] + list(range(10, 21)))
        f32 = diffcli.load(path, device="cpu", dtype=torch.float32)
        canvas = torch.randint(0, f32.config.vocab_size, (f32.config.canvas_length,),
                               generator=torch.Generator().manual_seed(1))
        ref = f32.denoise(f32.encode(prompt), canvas)
        model = diffcli.load(path, device="cpu", dtype=torch.bfloat16)
        native.set_int8(False)                      # the bf16 products, whatever the default
        bf16 = model.denoise(model.encode(prompt), canvas).float()
        calls, call = collections.Counter(), native._call

        def spy(name, *args):
            calls[name] += 1
            call(name, *args)

        native.set_int8(True)
        native._call = spy
        try:
            q8 = model.denoise(model.encode(prompt), canvas).float()
        finally:
            native._call = call
        assert model.cpu_kernels.endswith(" + int8")
    finally:
        native.set_int8(None)
        set_backend(None)
    n_layer = model.config.n_layer
    # the step's layers and the encoder's but its last (whose MLP nothing reads: only its K, V)
    assert calls["dn_moe_q8_bf16"] == 2 * n_layer - 1
    assert calls["dn_qmatmul_q8_bf16"] > 0 and calls["dn_qmatmul_bf16"] == 0 and calls["dn_moe_bf16"] == 0
    distance = lambda x: ((x - ref).norm() / ref.norm()).item()    # noqa: E731
    assert distance(q8) < 4 * distance(bf16), (distance(q8), distance(bf16))
