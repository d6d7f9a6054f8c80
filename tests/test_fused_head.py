"""The fused vocabulary head wired into the model and the generation loop (issue 6, item 2).

Triton backend forced on the CPU under TRITON_INTERPRET=1 (set before triton is imported), which
is the one CPU configuration where `use_fused_head` is on, on the tiny f32 model of
test_generate.py. Checks: `denoise(sc_soft=...)` is `denoise(sc_logits=...)` given the soft
embedding of those logits; `denoise_fused` matches `denoise` plus the unfused sampler
statistics; `generate` gives the same tokens with the fused head on and off.

Tolerances (float32 everywhere): the soft embedding is the same fp32 product either way; with
sc_soft the head may take the weight's qlinear path instead of the dense embedding copy (the
f32 CPU model keeps no copy), which sums in another order -> logits within 1e-5. The fused
head's logits differ from denoise's by the softcap formula (exp-based tanh vs sigmoid, ~4e-6
absolute at cap 30) and the matmul's summation order -> 2e-5.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import diffcli  # noqa: E402
from diffcli.compute.backend import set_backend  # noqa: E402
from diffcli.generation.loop import StepEvent, generate, stream  # noqa: E402
from diffcli.generation.sampler import SamplerConfig, token_entropy  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("transformers")     # make_tiny_gguf builds the tiny model with it

PROMPT = [2] + list(range(10, 21))      # 12 tokens, longer than the sliding window of 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from diffcli.testing import make_tiny_gguf
    path, _ = make_tiny_gguf(tmp_path_factory.mktemp("fused") / "tiny.gguf", outtype="f32",
                             seed=0)
    return diffcli.load(path, device="cpu", dtype=torch.float32)


@pytest.fixture
def triton_cpu():
    """The triton backend on the CPU (interpreted); automatic choice again afterwards."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 on a machine without CUDA")
    set_backend("triton")
    yield
    set_backend(None)


def _canvas(seed, model):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (model.config.canvas_length,), generator=g)


def test_use_fused_head_follows_backend(model, triton_cpu):
    assert model.use_fused_head
    model.fused_head = False
    try:
        assert not model.use_fused_head
    finally:
        model.fused_head = True
    set_backend("torch")
    assert not model.use_fused_head


def test_use_fused_head_off_by_default_on_cpu(model):
    if os.environ.get("DIFFCLI_BACKEND"):
        pytest.skip("a backend is forced by DIFFCLI_BACKEND")
    set_backend(None)
    assert not model.use_fused_head


def test_denoise_sc_soft_equals_sc_logits(model):
    cache = model.encode(torch.tensor(PROMPT))
    sc_logits = model.denoise(cache, _canvas(1, model)) / 0.7
    E = model._dense_embedding()
    soft = torch.softmax(sc_logits.float(), dim=-1).to(E.dtype) @ E
    canvas = _canvas(2, model)
    want = model.denoise(cache, canvas, sc_logits)
    got = model.denoise(cache, canvas, sc_soft=soft)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5
    with pytest.raises(ValueError):
        model.denoise(cache, canvas, sc_logits, sc_soft=soft)
    off = model.denoise_uncached(torch.tensor(PROMPT), canvas, sc_soft=soft)
    assert (off - want).abs().max().item() <= 1e-5


def test_denoise_fused_matches_unfused(model, triton_cpu):
    cache = model.encode(torch.tensor(PROMPT))
    canvas, tau = _canvas(3, model), 0.7
    first = model.denoise_fused(cache, canvas, tau)
    raw = model.denoise(cache, canvas)
    logits = raw / tau
    assert (first.logits - logits).abs().max().item() <= 2e-5
    assert torch.equal(first.argmax, logits.argmax(-1))
    assert torch.allclose(first.lse, torch.logsumexp(logits, -1), atol=1e-5)
    assert torch.allclose(first.entropy, token_entropy(logits), atol=1e-5)
    # the next step: fused SC from `soft` against denoise's SC from the tempered logits
    canvas2 = _canvas(4, model)
    second = model.denoise_fused(cache, canvas2, tau, first.soft, tempered_logits=False)
    want = model.denoise(cache, canvas2, logits)
    assert (second.logits - want).abs().max().item() <= 2e-5


@pytest.mark.parametrize("kv_cache,steps", [(True, 3), (False, 2)])
def test_generate_same_tokens_fused_on_and_off(model, triton_cpu, monkeypatch, kv_cache, steps):
    """Same seed, same draws: identical tokens, argmax canvases and acceptances per step."""
    calls = []
    fused_step = model.denoise_fused
    monkeypatch.setattr(model, "denoise_fused",
                        lambda *a, **k: calls.append(1) or fused_step(*a, **k))
    sampler = SamplerConfig(max_steps=steps)
    tokens = {}
    for seed in (0, 7):
        runs = {}
        for fused in (True, False):
            model.fused_head = fused
            calls.clear()
            try:
                runs[fused] = list(stream(model, PROMPT, max_new_tokens=32, sampler=sampler,
                                          seed=seed, mode="hf", eog_ids=(), kv_cache=kv_cache))
            finally:
                model.fused_head = True
            assert len(calls) == (runs[fused][-1].stats.steps if fused else 0)
        on, off = runs[True], runs[False]
        assert on[-1].tokens == off[-1].tokens and len(on[-1].tokens) == 32
        tokens[seed] = on[-1].tokens
        steps_on = [e for e in on if isinstance(e, StepEvent)]
        steps_off = [e for e in off if isinstance(e, StepEvent)]
        assert len(steps_on) == len(steps_off) == on[-1].stats.steps
        for a, b in zip(steps_on, steps_off):
            assert torch.equal(a.argmax, b.argmax) and torch.equal(a.accepted, b.accepted)
            assert torch.allclose(a.entropy, b.entropy, atol=1e-5)
    assert tokens[0] != tokens[7]


def test_generate_fused_result_api(model, triton_cpu):
    got = generate(model, PROMPT, max_new_tokens=16, sampler=SamplerConfig(max_steps=2), seed=3,
                   mode="cli", eog_ids=())
    assert got.stats.steps >= 1 and all(0 <= t < model.config.vocab_size for t in got.tokens)
