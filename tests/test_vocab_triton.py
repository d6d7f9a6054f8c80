"""Fused vocabulary head (kernels/vocab.py) against its torch reference, vocab_head_torch.

Interpreter on CPU (TRITON_INTERPRET=1, set before triton is imported); CUDA when present. Small
shapes whose V, H and C are not multiples of the tiles (BV=64, BK=32/64, BH=32, BM=16 on CPU),
several vocabulary splits so the partial statistics are merged, fp32, bf16 and fp16 (checked
with the bf16 tolerances).

Tolerances. fp32: per-entry bounds derived from the arithmetic on the test's own data
(`_fp32_bounds`, tests/_bounds.py), never read off a run; they hold on every machine (an AMX Xeon's
BLAS sums x @ E.T in another order than an EPYC's) and catch any real defect. bf16: the kernel
rounds x @ E.T to bf16 like torch's matmul does, so the logits agree to the fp32 level too,
except where the two fp32 sums straddle a bf16 rounding midpoint
(one bf16 ulp, <= 0.0625 for scores below 16; rare: allowed on at most 0.1% of the entries, and
lse/entropy get 2e-3 for it);
soft is compared at 6e-3 relative: the reference rounds probs and its output to bf16 (2^-9
relative each), the kernel rounds exp(l - m_tile) to bf16 and accumulates in fp32.
"""
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from diffcli.kernels.vocab import vocab_head, vocab_head_torch  # noqa: E402

from _bounds import gamma, matmul_bound, unit_roundoff  # noqa: E402

CAP = 30.0


def _inputs(C, H, V, dtype, seed, device=DEVICE, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(C, H, generator=gen)
    E = torch.randn(V, H, generator=gen) * scale
    return x.to(device, dtype), E.to(device, dtype)


def _fp32_bounds(x, E, ref, cap, tau):
    """Bounds on |kernel - torch| for fp32 inputs, per logit, per row (lse, entropy) and per soft
    entry. u = 2^-24; both sides compute the same formulas in fp32, in different orders.

    scores s = x @ E.T       two orders of an H-term dot: 2 gamma(H) |x| @ |E|.T (tests/_bounds.py)
    logits cap tanh(s / cap) tanh is 1-Lipschitz; each side's tanh within 8u absolute (libm, or
                             the kernel's exp-based quotient: exp within 4 ulps, 3 ops), times cap,
                             plus the final rounding u |logit|, on both sides
    l = logits / tau         dl = dlogits / tau + 2u |l|
    p = softmax(l)           p_j moves by at most p_j expm1(dl_j + max dl) (both the numerator and
                             the normaliser move); each exp(l_j - m) is within (8 + |l_j - m|) u
                             relative (the argument's own rounding grows with it) and the V-term
                             sums add gamma(V): r_j = 2 (gamma(V) + (8 + |l_j - m|) u) per side pair
    lse = m + log(sum)       |dlse| <= log(sum_j p_j e^dl_j) + sum_j p_j r_j + 2u |lse|
    entropy = -sum p log p   entr'(p) = -(log p + 1): |dH| <= sum_j dp_j |log p_j + 1|, with dp_j
                             the softmax move above plus p_j r_j
    soft = p @ E             |dsoft_h| <= sum_j dp_j |E_jh| + 2 gamma(V) sum_j p_j |E_jh|
    """
    u = unit_roundoff(torch.float32)
    C, V = ref.logits.shape
    L = ref.logits.double()
    d_logit = matmul_bound(x, E) + 2 * ((8 * u * cap) if cap else 0.0) + 2 * u * L.abs()
    l = L / tau
    dl = d_logit / tau + 2 * u * l.abs()
    m = l.max(dim=1, keepdim=True).values
    p = torch.softmax(l, dim=1)
    r = 2 * (gamma(V) + (8 + (l - m).abs()) * u)
    dp = p * torch.expm1(dl + dl.max(dim=1, keepdim=True).values) + p * r
    lse = torch.logsumexp(l, dim=1)
    d_lse = torch.log((p * dl.exp()).sum(1)) + (p * r).sum(1) + 2 * u * lse.abs()
    d_ent = (dp * (p.clamp_min(1e-300).log() + 1).abs()).sum(1)
    E_abs = E.double().abs()
    d_soft = dp @ E_abs + 2 * gamma(V) * (p @ E_abs)
    return d_logit, dl, d_lse, d_ent, d_soft


def _compare(out, ref, dtype, tau, x=None, E=None, cap=CAP):
    C, V = ref.logits.shape
    assert out.logits.shape == (C, V) and out.logits.dtype == torch.float32
    assert out.argmax.shape == (C,) and out.argmax.dtype == torch.int64
    assert out.lse.dtype == out.entropy.dtype == out.soft.dtype == torch.float32
    assert out.soft.shape == ref.soft.shape
    for t in out:
        assert torch.isfinite(t.float()).all()
    dl = (out.logits - ref.logits).abs()
    l = ref.logits / tau
    if dtype == torch.float32:
        b_logit, b_l, b_lse, b_ent, b_soft = _fp32_bounds(x.cpu(), E.cpu(), _cpu(ref), cap, tau)
        assert (dl.cpu().double() <= b_logit).all(), \
            f"logits off by {dl.max().item():.2e} (bound there {b_logit.flatten()[dl.argmax()]:.2e})"
        # the kernel's argmax is a maximum of the reference up to the logits' bound
        # (|l_kernel - l_ref| <= b_l, so l_ref[a] + b_l[a] >= l_ref[j] - b_l[j] for every j)
        a = out.argmax.cpu()[:, None]
        lr = l.double().cpu()
        assert ((lr + b_l).gather(1, a).squeeze(1) >= (lr - b_l).max(dim=1).values).all()
        assert torch.equal(out.argmax, out.logits.argmax(dim=1))
        for name, got, want, bound in (("lse", out.lse, ref.lse, b_lse),
                                       ("entropy", out.entropy, ref.entropy, b_ent),
                                       ("soft", out.soft, ref.soft, b_soft)):
            err = (got - want).abs().cpu().double()
            assert (err <= bound).all(), f"{name}: error {err.max():.2e}, bound {bound.min():.2e}.."
        return
    rel = ((out.soft - ref.soft).norm() / ref.soft.norm()).item()
    assert dl.max().item() < 0.07 and (dl > 2e-5).float().mean().item() <= 1e-3, \
        f"logits: max {dl.max().item():.2e}, {(dl > 2e-5).sum().item()} entries off"
    # argmax of the kernel's logits; the reference's value there is the max up to a flip
    picked = l.gather(1, out.argmax[:, None]).squeeze(1)
    assert (picked >= l.max(dim=1).values - 0.07 / tau).all()
    assert torch.equal(out.argmax, out.logits.argmax(dim=1))
    tol, soft_tol = 2e-3, 6e-3
    assert ((out.lse - ref.lse).abs() / ref.lse.abs().clamp_min(1.0)).max().item() < tol
    assert (out.entropy - ref.entropy).abs().max().item() < tol
    assert rel < soft_tol, f"soft: relative error {rel:.2e}"


def _cpu(ref):
    return type(ref)(*(t.cpu() if t is not None else None for t in ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C,H,V,tau,kw", [
    (1, 96, 1000, 1.0, {}),                                  # 8 vocabulary splits of 2 tiles
    (7, 64, 300, 0.7, dict(splits=2, splits2=3)),            # V tail 44, splits of 3 and 2 tiles
    (33, 96, 1000, 2.5, dict(block_k=64, splits2=2)),        # C tail 1 (BM=16), H tail 32 (BK=64)
])
def test_vocab_matches_torch(C, H, V, tau, kw, dtype):
    x, E = _inputs(C, H, V, dtype, seed=C)
    out = vocab_head(x, E, CAP, tau, **kw)
    ref = vocab_head_torch(x, E, CAP, tau)
    _compare(out, ref, dtype, tau, x, E)


def test_vocab_soft_vs_float64():
    """bf16: the kernel's soft embedding is closer to the exact one than torch's (which rounds its
    output to bf16): ~4e-4 against ~2e-3 here."""
    x, E = _inputs(33, 64, 1000, torch.bfloat16, seed=5)
    out = vocab_head(x, E, CAP, 0.8)
    ref = vocab_head_torch(x, E, CAP, 0.8)
    exact = torch.softmax(ref.logits.double() / 0.8, dim=-1) @ E.double()
    err = lambda s: ((s.double() - exact).norm() / exact.norm()).item()   # noqa: E731
    assert err(out.soft) < 1e-3
    assert err(out.soft) < err(ref.soft)


def test_vocab_flags():
    """Without logits every other output is unchanged; tempered logits are logits / tau."""
    x, E = _inputs(7, 96, 1000, torch.float32, seed=1)
    full = vocab_head(x, E, CAP, 0.6)
    bare = vocab_head(x, E, CAP, 0.6, write_logits=False)
    assert bare.logits is None
    for a, b in zip(full[1:], bare[1:]):
        assert torch.equal(a, b)
    tempered = vocab_head(x, E, CAP, 0.6, tempered_logits=True)
    torch.testing.assert_close(tempered.logits, full.logits / 0.6, rtol=1e-6, atol=0)
    # no softcap
    out = vocab_head(x, E, None, 0.6)
    ref = vocab_head_torch(x, E, None, 0.6)
    _compare(out, ref, torch.float32, 0.6, x, E, cap=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_argmax_ties(dtype):
    """Scores far past the softcap give exactly cap in fp32, so ties are exact. The lowest index
    must win within a tile, across tiles and across vocabulary splits."""
    C, H, V = 5, 64, 1000
    x, E = _inputs(C, H, V, torch.float32, seed=2, scale=0.05)
    E[:, 0] = 0.0
    x[:, 0] = 0.0
    tie_cols = [[3, 40], [70, 999], [130, 640, 700], [998, 999], [0, 64, 128]]
    x[:, 1:1 + C] = 0.0
    for r, cols in enumerate(tie_cols):      # row r's own hidden column: score 40 * 20 = 800
        x[r, 1 + r] = 40.0                   # for its tie columns, and tanh(800 / 30) == 1
        E[cols, 1 + r] = 20.0
    x, E = x.to(dtype), E.to(dtype)
    out = vocab_head(x, E, CAP, 0.9, splits=4, splits2=2)
    ref = vocab_head_torch(x, E, CAP, 0.9)
    expected = torch.tensor([cols[0] for cols in tie_cols], device=DEVICE)
    assert torch.equal(ref.argmax, expected)
    assert torch.equal(out.argmax, expected)
    assert (out.logits.gather(1, expected[:, None]) == CAP).all()
    _compare(out, ref, dtype, 0.9, x, E)


def test_vocab_peaked():
    """A near one-hot distribution (low temperature): entropy ~0 without NaNs or negatives."""
    x, E = _inputs(7, 64, 300, torch.float32, seed=3, scale=1.0)
    out = vocab_head(x, E, CAP, 0.05)
    ref = vocab_head_torch(x, E, CAP, 0.05)
    assert (out.entropy >= 0).all()
    _compare(out, ref, torch.float32, 0.05, x, E)


def test_vocab_rejects_bad_inputs():
    x, E = _inputs(2, 64, 100, torch.float32, seed=0)
    with pytest.raises(AssertionError, match="do not match"):
        vocab_head(x[:, :32], E, CAP, 1.0)
    with pytest.raises(AssertionError, match="share a float dtype"):
        vocab_head(x.bfloat16(), E, CAP, 1.0)
    with pytest.raises(AssertionError, match="temperature"):
        vocab_head(x, E, CAP, 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_vocab_gpu_canvas_shape(dtype):
    x, E = _inputs(256, 2816, 32768, dtype, seed=4, device="cuda")
    _compare(vocab_head(x, E, CAP, 0.8), vocab_head_torch(x, E, CAP, 0.8), dtype, 0.8, x, E)
