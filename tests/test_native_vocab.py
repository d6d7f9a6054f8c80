"""The CPU vocabulary side in the model and the loop (compute/vocab.py; issue 14 items 2 and 3).

On the tiny model converted to Q8_0 (its embedding then has native blocks), with the native
library of the default build (skipped without it; tests/test_native.py checks the kernels
themselves on every SIMD build):

- bf16 mode: generation runs the native head (`use_fused_head` on the CPU) and its step outputs
  match the torch sequence the unfused path runs (bf16 logits -> fp32 softcap, tempering, softmax,
  entropy, argmax; soft embedding from bf16 probabilities);
- f32 mode: the unfused path, exact multinomial draws, and the self-conditioning product from the
  embedding's blocks (no dense copy) gives the logits of the dense product;
- no dense embedding copy is made on the CPU by default.

Tolerances: the tiny model's logits are O(1) (|l| < 5), H = 64, V = 512.
- f32: the soft embedding is a sum of V fp32 products in another order than the BLAS ->
  |d soft| <= V eps |soft|_1-ish ~ 512 * 6e-8 * 0.1; through the rest of the step the logits move
  by < 1e-4 (the same slack test_fused_head uses for a different summation order of one matmul).
- bf16: logits are the same bf16 products in both (native qmatmul on the blocks vs the same
  qmatmul in the reference), so the statistics differ only by the kernel's error on fp32 math
  (bounded in test_native.py, < 1e-4 at these magnitudes) and the soft embedding by one bf16
  rounding of probabilities (2^-8 relative) -> 2^-7 of sum |p| |E|.
"""
import pytest
import torch

import diffcli
from diffcli.compute import native
from diffcli.compute.backend import set_backend
from diffcli.generation.loop import StepEvent, stream
from diffcli.generation.sampler import SamplerConfig

pytest.importorskip("transformers")     # make_tiny_gguf builds the tiny model with it

PROMPT = [2] + list(range(10, 21))


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    if not native.available():
        pytest.skip("the native library is not built")
    from diffcli.testing import make_tiny_gguf
    p, _ = make_tiny_gguf(tmp_path_factory.mktemp("cpuvocab") / "tiny-q8.gguf", outtype="q8_0", seed=0)
    return p


@pytest.fixture(autouse=True)
def native_backend():
    set_backend("native")
    yield
    set_backend(None)


def _canvas(seed, cfg):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=g)


def test_no_dense_embedding_by_default(path):
    for dtype in (torch.float32, torch.bfloat16):
        model = diffcli.load(path, device="cpu", dtype=dtype)
        assert not model.cache_embedding
        cache = model.encode(torch.tensor(PROMPT))
        sc = model.denoise(cache, _canvas(1, model.config)) / 0.7
        model.denoise(cache, _canvas(2, model.config), sc)
        assert model._embed_dense is None
    assert diffcli.load(path, device="cpu", dtype=torch.float32).use_fused_head is False


def test_f32_self_conditioning_from_blocks_matches_dense(path):
    model = diffcli.load(path, device="cpu", dtype=torch.float32)
    cache = model.encode(torch.tensor(PROMPT))
    sc = model.denoise(cache, _canvas(1, model.config)) / 0.7
    canvas = _canvas(2, model.config)
    blocks = model.denoise(cache, canvas, sc)
    model._embed_blocks_native = lambda: False          # the dense product, as before
    dense = model.denoise(cache, canvas, sc)
    assert (blocks - dense).abs().max() < 1e-4


def test_bf16_head_matches_torch_sequence(path):
    model = diffcli.load(path, device="cpu", dtype=torch.bfloat16)
    assert model.use_fused_head
    cfg = model.config
    cache = model.encode(torch.tensor(PROMPT))
    canvas, T = _canvas(3, cfg), 0.65
    out = model.denoise_fused(cache, canvas, T)
    assert out.logits is None and out.probs.dtype == torch.bfloat16
    # the torch sequence on the same bf16 logits (the head's bf16 product of the same blocks)
    x = model._decode(cache, canvas, None, None)[0]
    logits = native.qmatmul(x.bfloat16(), model.w.embed, out_dtype=torch.float32)
    cap = cfg.final_logit_softcap
    t = (cap * torch.tanh(logits.double() / cap)) / T
    p = torch.softmax(t, dim=-1)
    assert torch.equal(out.argmax, t.argmax(-1))
    assert (out.lse.double() - torch.logsumexp(t, -1)).abs().max() < 1e-4
    assert (out.entropy.double() - (-(p * p.log()).sum(-1))).abs().max() < 1e-4
    E = native.dequantize(model.w.embed).double()
    soft_ref = p @ E
    bound = 2.0 ** -7 * (p @ E.abs()) + 1e-6
    assert ((out.soft.double() - soft_ref).abs() <= bound).all()
    # the soft embedding is what the next step's self-conditioning takes
    from diffcli.compute import vocab as cpu_vocab
    buf = cpu_vocab._workspace.logits
    nxt = model.denoise_fused(cache, canvas, T, out.soft)
    assert torch.isfinite(nxt.lse).all()
    # the head's logits buffer is kept for the next step, and reusing it changes nothing
    assert cpu_vocab._workspace.logits is buf and buf.numel() == cfg.canvas_length * cfg.vocab_size
    again = model.denoise_fused(cache, canvas, T)
    assert cpu_vocab._workspace.logits is buf
    for a, b in ((again.argmax, out.argmax), (again.lse, out.lse), (again.soft, out.soft), (again.probs, out.probs)):
        assert torch.equal(a, b)
    assert again.probs.data_ptr() != out.probs.data_ptr()      # the returned probabilities are not shared


def test_bf16_generation_uses_the_native_head(path, monkeypatch):
    model = diffcli.load(path, device="cpu", dtype=torch.bfloat16)
    from diffcli.compute import vocab as cpu_vocab
    calls = []
    real = cpu_vocab.vocab_stats
    monkeypatch.setattr(cpu_vocab, "vocab_stats", lambda *a: calls.append(1) or real(*a))
    sampler = SamplerConfig(max_steps=4, confidence=0.0)
    runs = []
    for _ in range(2):
        events = [e for e in stream(model, PROMPT, max_new_tokens=model.config.canvas_length,
                                    sampler=sampler, seed=5) if isinstance(e, StepEvent)]
        runs.append(torch.stack([e.argmax for e in events]))
    assert len(calls) == 8 and len(events) == 4
    assert torch.equal(runs[0], runs[1])                  # same seed, same steps
    assert all(e.accepted.any() for e in events)
