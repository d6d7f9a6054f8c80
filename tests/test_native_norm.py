"""The native fused norms (kernels/native/norm.cpp: dn_rms_norm, dn_rms_rope) against the torch
composition they replace (diffcli.model.layers.rms / rms_rope on the torch backend), on every
SIMD build this CPU runs (tests/_native_builds.py) and, in an AVX-512 build, on both row paths
(the register one and the portable one, dn_norm_portable); with the fp32 -> bf16 conversions
(dn_to_bf16, dn_round_bf16), the softcap and the bf16 softmax of the native step.

Bounds, from the arithmetic (u32 = 2^-24, u = the activation dtype's unit roundoff):
- The two sides run the same element-wise operations in the same order, so they differ only
  through the sum of squares: any two orders of a D-term sum differ by at most 2 gamma(D) of the
  sum (tests/_bounds.py), half of that reaches 1/sqrt, and the mean, + eps, sqrt, reciprocal and
  the two products each round once more on either side: the fp32 norm y = s r w differs by at
  most (gamma(D) + 12 u32) m, m = |s r w| evaluated in float64.
- A bf16 (or fp32) rounding of two values that close adds at most one ulp, 2u of the magnitude,
  at each rounding the composition has: after the norm, after the residual add, after the scale.
- bf16 bit equality: the roundings happen where torch's happen, so two results differ only
  when the fp32 values straddle a bf16 rounding boundary, which for values within a relative
  delta of each other happens for at most a fraction 2 delta / 2^-8 of them. A kernel that
  rounded at another point (or not at all) would differ on a large share of the values.
"""
import pytest
import torch

from _bounds import gamma, unit_roundoff
from _native_builds import lib  # noqa: F401 (the fixture)
from diffcli.compute import elementwise, native
from diffcli.compute.backend import set_backend
from diffcli.model import layers

U32 = 2.0 ** -24


def _row_paths():
    """The row paths of the loaded build, as dn_norm_portable settings: an AVX-512 build has the
    register path (0) and the portable loops (1); the scalar and AVX2 builds the portable only."""
    return [0, 1] if native.simd() == "avx512" else [0]


def _each_path(fn):
    """fn() under every row path of the loaded build; the results, in _row_paths order."""
    out = []
    try:
        for portable in _row_paths():
            native._library().dn_norm_portable(portable)
            out.append(fn())
    finally:
        native._library().dn_norm_portable(0)
    return out


def _reference(fn, *args, **kw):
    set_backend("torch")
    try:
        return fn(*args, **kw)
    finally:
        set_backend(None)


def _norm_magnitude(s: torch.Tensor, weight, eps: float) -> torch.Tensor:
    """m = |s r w| in float64 (s the rounded norm input)."""
    s = s.double()
    m = s.abs() * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    return m * weight.double().abs() if weight is not None else m


def _data(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    x2 = torch.randn(shape, generator=g).to(dtype)
    res = torch.randn(shape, generator=g).to(dtype)
    w = torch.rand(shape[-1], generator=g) + 0.5
    return x, x2, res, w


OPTIONS = [dict(), dict(plus=True), dict(residual=True), dict(plus=True, residual=True, scale=0.71),
           dict(scale=1.7), dict(weight=False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 512), (64, 2816), (33, 8, 64), (5, 40), (3, 7), (1, 16)])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(o) or "plain")
def test_rms_norm_matches_torch(lib, dtype, shape, opts):
    x, x2, res, w = _data(shape, dtype, seed=len(shape) * 1000 + shape[-1])
    kw = dict(plus=x2 if opts.get("plus") else None, residual=res if opts.get("residual") else None,
              scale=opts.get("scale", 1.0))
    weight = None if opts.get("weight") is False else w
    ref = _reference(layers.rms, x, weight, 1e-6, **kw)
    set_backend("native")
    results = _each_path(lambda: layers.rms(x, weight, 1e-6, **kw))
    set_backend(None)
    for got in results:
        _check_norm(got, ref, x, weight, kw, dtype, shape)


def _check_norm(got, ref, x, weight, kw, dtype, shape):
    assert got.dtype == dtype and got.shape == x.shape

    D, u = shape[-1], unit_roundoff(dtype)
    s = x if kw["plus"] is None else x + kw["plus"]
    m = _norm_magnitude(s, weight, 1e-6)
    delta = gamma(D) + 12 * U32                                  # relative, on the fp32 norm
    after_norm = delta * m + (2 * u * m if dtype == torch.bfloat16 else 0)
    if kw["residual"] is not None:
        after_norm = after_norm + 2 * u * (kw["residual"].double().abs() + m)
    bound = abs(kw["scale"]) * after_norm + 2 * u * ref.double().abs()
    err = (got.double() - ref.double()).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    if dtype == torch.bfloat16:
        share = (got != ref).double().mean().item()
        assert share <= 2 * delta / 2.0 ** -8, f"{share:.2%} of the values differ from torch's bits"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,heads,D", [(256, 8, 64), (17, 2, 128), (9, 4, 512), (6, 3, 40), (4, 1, 6)])
def test_rms_rope_matches_torch(lib, dtype, T, heads, D):
    x, _, _, w = _data((T, heads, D), dtype, seed=T * D)
    g = torch.Generator().manual_seed(D)
    angle = torch.rand(T, D // 2, generator=g) * 300
    angle = torch.cat([angle, angle], dim=-1)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    ref = _reference(layers.rms_rope, x, w, 1e-6, cos, sin)
    set_backend("native")
    results = _each_path(lambda: layers.rms_rope(x, w, 1e-6, cos, sin))
    set_backend(None)
    for got in results:
        _check_rope(got, ref, x, w, cos, sin, dtype, D)


def _check_rope(got, ref, x, w, cos, sin, dtype, D):
    assert got.dtype == dtype and got.shape == x.shape
    u = unit_roundoff(dtype)
    m = _norm_magnitude(x, w, 1e-6)                              # [T, heads, D]
    dy = (gamma(D) + 12 * U32) * m + (2 * u * m if dtype == torch.bfloat16 else 0)
    rot = torch.cat([m[..., D // 2:], m[..., :D // 2]], dim=-1)
    drot = torch.cat([dy[..., D // 2:], dy[..., :D // 2]], dim=-1)
    c, s = cos.double().abs(), sin.double().abs()
    bound = dy * c + drot * s + 6 * U32 * (m * c + rot * s) + 2 * u * ref.double().abs()
    err = (got.double() - ref.double()).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    if dtype == torch.bfloat16:
        share = (got != ref).double().mean().item()
        assert share <= 2 * (gamma(D) + 12 * U32) / 2.0 ** -8 * 2 + 1 / got.numel()


def test_norm_results_do_not_depend_on_threads(lib):
    x, x2, res, w = _data((300, 512), torch.bfloat16, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = elementwise.rms_norm(x, w, 1e-6, x2=x2, add=res, scale=0.5)
        torch.set_num_threads(2)
        two = elementwise.rms_norm(x, w, 1e-6, x2=x2, add=res, scale=0.5)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_norm_takes_strided_input_and_leaves_it(lib):
    x, _, res, w = _data((64, 128), torch.float32, seed=4)
    xt = x.t().contiguous().t()                                  # same values, column-major
    keep = xt.clone()
    assert torch.equal(elementwise.rms_norm(xt, w, 1e-6, add=res), elementwise.rms_norm(x, w, 1e-6, add=res))
    assert torch.equal(xt, keep)


def test_norm_edge_values(lib):
    """A zero row normalizes to zeros (eps keeps the scale finite); inf and NaN propagate as in
    torch's composition; empty inputs give empty outputs."""
    x = torch.zeros(3, 32)
    x[1, 5] = float("inf")
    x[2, 7] = float("nan")
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        got, ref = elementwise.rms_norm(xd, None, 1e-6), _reference(layers.rms, xd, None, 1e-6)
        assert torch.equal(got[0], ref[0]) and not got[0].any()
        assert torch.equal(got.isnan(), ref.isnan())
    assert elementwise.rms_norm(torch.zeros(0, 16), None, 1e-6).shape == (0, 16)


def test_bad_norm_calls_raise(lib):
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="weight has 16 values"):
        elementwise.rms_norm(x, torch.ones(16), 1e-6)
    with pytest.raises(ValueError, match="does not match"):
        elementwise.rms_norm(x, None, 1e-6, add=torch.randn(4, 32).bfloat16())
    with pytest.raises(ValueError, match="fp32 or bf16"):
        elementwise.rms_norm(x.double(), None, 1e-6)
    with pytest.raises(ValueError, match="rotary tables"):
        elementwise.rms_rope(x.view(4, 1, 32), None, 1e-6, torch.ones(3, 32), torch.ones(3, 32))
    with pytest.raises(ValueError, match=r"\[T, heads, D\]"):
        elementwise.rms_rope(x, None, 1e-6, torch.ones(4, 32), torch.ones(4, 32))
    with pytest.raises(ValueError, match="even"):
        elementwise.rms_rope(torch.randn(2, 1, 7), None, 1e-6, torch.ones(2, 7), torch.ones(2, 7))


def test_layers_take_the_native_norms_only_on_the_native_backend(lib, monkeypatch):
    calls = []
    monkeypatch.setattr(elementwise, "rms_norm", lambda *a, **k: calls.append("norm") or a[0])
    set_backend("torch")
    layers.rms(torch.randn(2, 16), None)
    assert calls == []
    set_backend("native")
    layers.rms(torch.randn(2, 16), None)
    layers.rms(torch.randn(2, 16).double(), None)                # float64: the torch composition
    set_backend(None)
    assert calls == ["norm"]


@pytest.mark.parametrize("n", [0, 5, 16, 1000, 70001])
def test_to_bf16_is_torchs_rounding(lib, n):
    """dn_to_bf16 (the matmuls' fp32 -> bf16 results) gives torch's bits: ties to even, the
    largest values rounding to inf, subnormals, signed zeros, inf, NaN (quiet)."""
    g = torch.Generator().manual_seed(n)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32).clone()
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.4e38, -3.4e38,
                            1e-40, -1e-45, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20])
    x[:min(n, len(special))] = special[:n]
    got = native._narrow(x, torch.bfloat16)
    ref = x.to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16)[~ref.isnan()], ref.view(torch.int16)[~ref.isnan()])
    assert torch.equal(got.isnan(), ref.isnan())


@pytest.mark.parametrize("cap", [30.0, 25.0, 1.0])
def test_softcap_matches_tanh(lib, cap):
    """dn_softcap against cap * tanh(x / cap) in float64. Its tanh is (1 - e) / (1 + e) with
    e = exp(-2|x| / cap) from a degree-6 polynomial (relative error < 2e-7 < 4 u32): e's error
    reaches tanh at most halved, and the division, the two sums and the products by 1 / cap and
    cap add one rounding each, so |error| <= cap * 8 u32 + 4 u32 |result|. inf gives +-cap, NaN
    stays NaN."""
    g = torch.Generator().manual_seed(int(cap))
    x = torch.cat([torch.randn(70000, generator=g) * 3 * cap, torch.randn(999, generator=g) * 1e-3,
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e30, -1e-30])])
    ref = cap * torch.tanh(x.double() / cap)
    got = elementwise.softcap_(x.clone(), cap)
    assert ((got.double() - ref).abs() <= cap * 8 * U32 + 4 * U32 * ref.abs()).all()
    nan = torch.tensor([float("nan")] * 9)
    assert elementwise.softcap_(nan, cap).isnan().all()
    set_backend("native")
    y = x.clone()
    assert layers.softcap_(y, cap) is y                          # in place, through the library
    set_backend(None)
    assert torch.equal(y, got)


def test_round_bf16_in_place_is_torchs_rounding(lib):
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-2 ** 31, 2 ** 31 - 1, (50021,), generator=g, dtype=torch.int64).to(torch.int32) \
        .view(torch.float32).clone()
    x[:6] = torch.tensor([1e-40, -1e-39, 1.0 + 2 ** -8, 3.4e38, float("inf"), float("nan")])
    ref = x.to(torch.bfloat16).float()
    got = elementwise.round_bf16_(x)
    assert got is x
    keep = ~ref.isnan()
    assert torch.equal(got[keep].view(torch.int32), ref[keep].view(torch.int32))
    assert torch.equal(got.isnan(), ref.isnan())


def test_softmax_bf16_matches_torch(lib):
    """compute.vocab.softmax_bf16 (dn_vocab, no cap, temperature 1) against torch.softmax then
    bf16: the fp32 probabilities differ by the exp polynomial (< 4 u32 relative) and the sum's
    order (gamma(V)), and the bf16 rounding adds at most one ulp (2^-7 relative)."""
    from diffcli.compute import vocab as cpu_vocab
    g = torch.Generator().manual_seed(8)
    V = 5000
    for logits in (torch.randn(16, V, generator=g) * 4, (torch.randn(8, V, generator=g) * 4).bfloat16()):
        ref = torch.softmax(logits.float(), dim=-1).double()
        got = cpu_vocab.softmax_bf16(logits)
        assert got.dtype == torch.bfloat16
        bound = (gamma(V) + 8 * U32 + 2.0 ** -7) * ref + 2.0 ** -133
        assert ((got.double() - ref).abs() <= bound).all()
