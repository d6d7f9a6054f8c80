"""The generation loop against transformers 5.23.0 `generate` (spec §C, §G.3), plus loop-shape
checks on a mock model.

Oracle: `torch.manual_seed(s); hf_model.generate(...)` on a tiny random DiffusionGemma. Our loop
runs on (1) an adapter that exposes the transformers model through diffcli's model API
(encode / denoise / commit), which isolates the sampler and loop, and (2) diffcli's own model
loaded from a GGUF converted from the same weights (diffcli.testing.make_tiny_gguf).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import diffcli
from diffcli.errors import InputError
from diffcli.generation.loop import CanvasEvent, Done, StepEvent, generate, stream
from diffcli.generation.sampler import SamplerConfig, trim_cli

transformers = pytest.importorskip("transformers")

C = 16          # tiny canvas
V = 512         # tiny vocabulary
PROMPT = [2] + list(range(10, 21))      # 12 tokens, longer than the sliding window of 8


# --- an adapter exposing the oracle through diffcli's model API -----------------------------

class HFAdapter:
    """transformers' DiffusionGemma behind diffcli's model API. Positions are passed explicitly
    (prefix length P for the canvas), as `generate` does."""

    def __init__(self, hf):
        self.hf = hf
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(canvas_length=hf.config.canvas_length,
                                      vocab_size=hf.config.text_config.vocab_size,
                                      sampler_defaults={})
        self.calls = []

    def _encode(self, cache, ids):
        pos = torch.arange(cache.length, cache.length + ids.numel())[None]
        self.hf.model.encoder(input_ids=ids[None], past_key_values=cache.kv, position_ids=pos)
        cache.length += ids.numel()

    @torch.no_grad()
    def encode(self, prompt_ids):
        from transformers import DynamicCache
        self.calls.append(("encode", prompt_ids.tolist()))
        cache = SimpleNamespace(kv=DynamicCache(config=self.hf.config.get_text_config(decoder=True)),
                                length=0)
        self._encode(cache, prompt_ids)
        return cache

    @torch.no_grad()
    def commit(self, cache, block_ids):
        self.calls.append(("commit", block_ids.tolist()))
        self._encode(cache, block_ids)

    @torch.no_grad()
    def denoise(self, cache, canvas_ids, sc_logits=None):
        self.calls.append(("denoise", None))
        pos = torch.arange(cache.length, cache.length + canvas_ids.numel())[None]
        out = self.hf(past_key_values=cache.kv, decoder_input_ids=canvas_ids[None],
                      self_conditioning_logits=None if sc_logits is None else sc_logits[None],
                      decoder_position_ids=pos)
        return out.logits[0]

    @torch.no_grad()
    def denoise_uncached(self, prefix_ids, canvas_ids, sc_logits=None):
        self.calls.append(("denoise_uncached", prefix_ids.numel()))
        cache = self.encode(prefix_ids)
        self.calls.pop()
        return self.denoise(cache, canvas_ids, sc_logits)


@pytest.fixture(scope="module")
def hf_model():
    # spec §G.1 tiny model: norms/router scales randomised, encoder and decoder scalars differ
    from diffcli.testing import build_tiny_hf_model
    return build_tiny_hf_model(seed=0)


@pytest.fixture(scope="module")
def diffcli_model(tmp_path_factory, hf_model):
    """diffcli's own model, loaded from an f32 GGUF converted from the oracle's weights."""
    from diffcli.testing import make_tiny_gguf
    path, hf2 = make_tiny_gguf(tmp_path_factory.mktemp("gen") / "tiny.gguf", outtype="f32", seed=0)
    return diffcli.load(path, device="cpu", dtype=torch.float32), hf2


def hf_generate(hf, seed, **kw):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSamplerConfig)
    kw.setdefault("max_new_tokens", 48)
    bound = kw.pop("entropy_bound", 0.1)
    torch.manual_seed(seed)
    out = hf.generate(torch.tensor(PROMPT)[None], sampler_config=EntropyBoundSamplerConfig(bound),
                      **kw)
    return out.sequences[0, len(PROMPT):].tolist(), float(out.tokens_per_forward[0])


def ours(model, seed, *, max_new_tokens=48, eos=(), steps=8, stability=1, confidence=0.005,
         bound=0.1, **kw):
    sampler = SamplerConfig(max_steps=steps, stability=stability, confidence=confidence,
                            entropy_bound=bound)
    return generate(model, PROMPT, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                    mode="hf", eog_ids=eos, **kw)


# Spec §G.3 cases: (a) defaults with few steps, (b) one step per canvas.
CASES = {
    "a_defaults": dict(steps=8),
    "b_one_step": dict(steps=8, stability=0, confidence=100.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_identical_to_transformers(hf_model, case):
    cfg = CASES[case]
    ref, ref_tpf = hf_generate(hf_model, 7, max_new_tokens=48, eos_token_id=[1], pad_token_id=0,
                               max_denoising_steps=cfg["steps"],
                               stability_threshold=cfg.get("stability", 1),
                               confidence_threshold=cfg.get("confidence", 0.005))
    got = ours(HFAdapter(hf_model), 7, eos=[1], **cfg)
    assert got.tokens == ref
    assert got.stats.tokens_per_forward == pytest.approx(ref_tpf)
    if case == "b_one_step":
        assert got.stats.steps_per_canvas == [1] * got.stats.canvases


ONE_STEP = dict(max_denoising_steps=8, stability_threshold=0, confidence_threshold=100.0)


def eos_mid_run_reference(hf, seed):
    """Case (c): as EOS, a token the oracle puts in canvas 2 but not in canvas 1 (and not last),
    so its run stops in canvas 2 with pad after the EOS. Returns (eos, tokens, tokens/forward)."""
    free, _ = hf_generate(hf, seed, max_new_tokens=64, **ONE_STEP)
    first, second = free[:C], free[C:2 * C]
    eos = next(t for t in second[:-1] if t not in first and t != 0)
    ref, ref_tpf = hf_generate(hf, seed, max_new_tokens=64, eos_token_id=[eos], pad_token_id=0,
                               **ONE_STEP)
    at = second.index(eos)
    assert len(ref) == 2 * C and ref[C + at + 1:] == [0] * (C - 1 - at)
    return eos, ref, ref_tpf


def test_identical_to_transformers_with_eos_mid_run(hf_model):
    eos, ref, ref_tpf = eos_mid_run_reference(hf_model, 11)
    got = ours(HFAdapter(hf_model), 11, max_new_tokens=64, eos=[eos], stability=0,
               confidence=100.0)
    assert got.tokens == ref
    assert got.stats.stop_reason == "eos" and got.stats.canvases == 2
    assert got.stats.tokens_per_forward == pytest.approx(ref_tpf)


def test_diffcli_model_identical_to_transformers(diffcli_model):
    model, hf = diffcli_model
    for cfg in CASES.values():
        ref, _ = hf_generate(hf, 3, max_new_tokens=48, eos_token_id=[1], pad_token_id=0,
                             max_denoising_steps=cfg["steps"],
                             stability_threshold=cfg.get("stability", 1),
                             confidence_threshold=cfg.get("confidence", 0.005))
        assert ours(model, 3, eos=[1], **cfg).tokens == ref
    eos, ref, _ = eos_mid_run_reference(hf, 11)
    got = ours(model, 11, max_new_tokens=64, eos=[eos], stability=0, confidence=100.0)
    assert got.tokens == ref


def test_diffcli_model_kv_cache_off_matches_on(diffcli_model):
    model, _ = diffcli_model
    on = ours(model, 5, steps=4)
    off = ours(model, 5, steps=4, kv_cache=False)
    assert off.tokens == on.tokens


def test_kv_cache_off_matches_on(hf_model):
    adapter = HFAdapter(hf_model)
    on = ours(adapter, 5, steps=4)
    off = ours(adapter, 5, steps=4, kv_cache=False)
    assert off.tokens == on.tokens
    prefixes = [n for what, n in adapter.calls if what == "denoise_uncached"]
    assert sorted(set(prefixes)) == [len(PROMPT), len(PROMPT) + C, len(PROMPT) + 2 * C]


def test_seed_reproducible_and_reported(hf_model):
    adapter = HFAdapter(hf_model)
    a = ours(adapter, 123, steps=3)
    b = ours(adapter, 123, steps=3)
    c = ours(adapter, 124, steps=3)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    r = ours(adapter, None, steps=3)
    assert isinstance(r.stats.seed, int)
    assert ours(adapter, r.stats.seed, steps=3).tokens == r.tokens
    before = torch.get_rng_state()
    ours(adapter, 1, steps=2)
    assert torch.equal(before, torch.get_rng_state())     # the caller's global RNG is untouched


def test_cli_mode_cuts_at_first_eog(hf_model):
    # Same seed, same draws: the cli run is the hf run cut before the first EOG token.
    adapter = HFAdapter(hf_model)
    full = ours(adapter, 9, stability=0, confidence=100.0).tokens        # no EOS: 3 canvases
    eog = next(t for t in full[C:] if t not in full[:C])
    sampler = SamplerConfig(max_steps=8, stability=0, confidence=100.0)
    got = generate(adapter, PROMPT, max_new_tokens=48, sampler=sampler, seed=9, mode="cli",
                   eog_ids=[eog])
    cut, _ = trim_cli(torch.tensor(full[:C]), [eog])
    assert cut == C, "pick a seed whose first canvas has no repetition loop"
    assert got.tokens == full[:full.index(eog)]
    assert got.stats.stop_reason == "eog" and got.stats.emitted_tokens == len(got.tokens)


# --- loop shape on a mock model -------------------------------------------------------------

class MockModel:
    """Logits that depend on the canvas and the self-conditioning input, and a record of calls."""

    def __init__(self, canvas_length=4, vocab=11, peaked=False):
        self.config = SimpleNamespace(canvas_length=canvas_length, vocab_size=vocab,
                                      sampler_defaults={"max_steps": 5})
        self.device = torch.device("cpu")
        self.peaked = peaked
        self.calls = []

    def encode(self, ids):
        self.calls.append(("encode", ids.tolist()))
        return {"n": ids.numel()}

    def commit(self, cache, ids):
        self.calls.append(("commit", ids.tolist()))
        cache["n"] += ids.numel()

    def denoise(self, cache, canvas, sc_logits=None):
        self.calls.append(("denoise", None if sc_logits is None else sc_logits.clone()))
        V = self.config.vocab_size
        g = torch.Generator().manual_seed(int(canvas.sum()) + cache["n"])
        logits = torch.randn(canvas.numel(), V, generator=g) * 3
        if self.peaked:          # a confident model: one huge logit per position
            logits[torch.arange(canvas.numel()), (torch.arange(canvas.numel()) + 3) % V] = 1e4
        if sc_logits is not None:
            logits = logits + 0.01 * sc_logits
        return logits


def test_events_and_self_conditioning_reset():
    model = MockModel()
    events = list(stream(model, [5, 6, 7], max_new_tokens=8, seed=0, mode="hf", eog_ids=()))
    steps = [e for e in events if isinstance(e, StepEvent)]
    canvases = [e for e in events if isinstance(e, CanvasEvent)]
    assert isinstance(events[-1], Done) and len(canvases) == 2 and len(steps) == 10
    assert [s.step for s in steps] == [0, 1, 2, 3, 4] * 2 and steps[0].steps == 5
    assert steps[0].temperature == pytest.approx(0.8) and steps[-1].temperature == pytest.approx(0.48)
    for s in steps:
        assert s.accepted.any() and torch.equal(s.renoised, ~s.accepted)
    denoise = [sc for what, sc in model.calls if what == "denoise"]
    assert denoise[0] is None and denoise[5] is None      # reset at every canvas
    assert all(sc is not None for i, sc in enumerate(denoise) if i % 5)
    # encoded once, committed once (not after the last canvas), with the last step's argmax
    kinds = [what for what, _ in model.calls]
    assert kinds.count("encode") == 1 and kinds.count("commit") == 1
    assert model.calls[kinds.index("commit")][1] == steps[4].argmax.tolist()
    assert canvases[0].tokens == steps[4].argmax.tolist()
    done = events[-1]
    assert done.tokens == canvases[0].tokens + canvases[1].tokens
    assert done.stats.steps == 10 and done.stats.emitted_tokens == 8


def test_self_conditioning_gets_tempered_logits():
    model = MockModel()
    list(stream(model, [1], max_new_tokens=4, seed=0, mode="hf", eog_ids=()))
    scs = [sc for what, sc in model.calls if what == "denoise"]
    # Replay step 0: its canvas is the first draw of a generator seeded 0.
    replay = MockModel()
    canvas0 = torch.randint(0, 11, (4,), generator=torch.Generator().manual_seed(0))
    raw0 = replay.denoise(replay.encode(torch.tensor([1])), canvas0)
    torch.testing.assert_close(scs[1], raw0 / 0.8, rtol=0, atol=0)


def test_stops_on_stable_confident_canvas():
    model = MockModel(peaked=True)
    done = generate(model, [1], max_new_tokens=4, seed=0, mode="cli", eog_ids=())
    # peaked logits: argmax fixed from step 1; stable (threshold 1) at step 2 -> stop after 2
    assert done.stats.steps_per_canvas == [2]


def test_canvas_count_from_n_or_blocks():
    model = MockModel()
    sampler = SamplerConfig(max_steps=1)
    for n, blocks, want in [(1, None, 1), (4, None, 1), (5, None, 2), (0, 3, 3), (None, None, 1),
                            (-1, 2, 2)]:
        done = generate(model, [1], max_new_tokens=n, blocks=blocks, sampler=sampler, seed=0,
                        mode="hf", eog_ids=())
        assert done.stats.canvases == want and len(done.tokens) == 4 * want


def test_bad_arguments_raise_input_error():
    model = MockModel()
    with pytest.raises(InputError):
        generate(model, [], seed=0)
    with pytest.raises(InputError):
        generate(model, [1], seed=0, mode="fast")
    with pytest.raises(InputError):
        generate(model, [1], max_new_tokens=0, blocks=0, seed=0)
    for seed in (-1, 2**64, 1.5):
        with pytest.raises(InputError, match="seed"):
            generate(model, [1], seed=seed)


def test_sampler_defaults_from_model_config():
    model = MockModel()              # sampler_defaults max_steps=5 stands in for a GGUF key
    done = generate(model, [1], max_new_tokens=4, seed=0, eog_ids=())
    assert done.stats.steps_per_canvas == [5]


def test_public_generate_callable_after_module_import():
    # this module imported diffcli.generation above; the public function must stay callable
    done = diffcli.generate(MockModel(), [1], max_new_tokens=4, seed=0, eog_ids=())
    assert isinstance(done, Done) and len(done.tokens) == 4
