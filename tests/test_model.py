"""diffcli.model against transformers 5.23.0 (spec §G): tiny random DiffusionGemma models
exported to GGUF, the same encode / denoise / commit sequence run through both.

The HF side is driven as spec §G.2 says: `hf(input_ids=prompt, decoder_input_ids=canvas)` for
prefill + first step, `hf(past_key_values=..., decoder_input_ids=..., self_conditioning_logits=...)`
for later steps, and `hf.model.encoder(input_ids=canvas, past_key_values=...)` to commit a
canvas, as DiffusionGemmaGenerationMixin.generate does.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffcli
from diffcli.compute.backend import set_backend
from diffcli.errors import InputError

from _spec_names import gguf_name_for

TOL = 1e-4          # max |Δlogit| against transformers, float32 (spec §G.4)
PROMPT = torch.tensor([2] + list(range(10, 21)))    # 12 tokens > sliding window 8


def _tiny(tmp_path_factory, variant, outtype="f32", seed=0, **overrides):
    from diffcli.testing import make_tiny_gguf
    path = tmp_path_factory.mktemp(f"{variant}_{outtype}") / "tiny.gguf"
    return make_tiny_gguf(path, outtype=outtype, seed=seed, variant=variant, **overrides)


@pytest.fixture
def backends():
    """The CPU backends to check: torch always, the C++ library when it is built."""
    from diffcli.compute import native
    yield ["torch"] + (["native"] if native.available() else [])
    set_backend(None)
    native.set_int8(None)


@pytest.fixture(scope="module", params=["h64", "h96"])
def tiny(request, tmp_path_factory):
    path, hf = _tiny(tmp_path_factory, request.param)
    return diffcli.load(path, dtype=torch.float32), hf.eval()


def _canvas(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 500, (n,), generator=g)     # skip pad (row 0 is zero) and specials


def _hf_run(hf, commits=3):
    """transformers on the scenario: prefill + a step without and one with SC, then `commits`
    canvases committed, each followed by a step without and one with SC (the SC input being
    the previous step's logits over a temperature). Returns the steps, each
    (label, canvas or committed ids, sc logits, reference logits), and the HF cache."""
    steps = []
    canvas = _canvas(1)
    with torch.no_grad():
        out = hf(input_ids=PROMPT[None], decoder_input_ids=canvas[None])
    pkv = out.past_key_values
    steps.append(("prefill step 1", canvas, None, out.logits[0]))
    for b in range(-1, commits):
        if b >= 0:
            block = _canvas(10 + b)
            with torch.no_grad():
                hf.model.encoder(input_ids=block[None], past_key_values=pkv)
            steps.append((f"commit {b}", block, None, None))
            canvas = _canvas(20 + b)
            with torch.no_grad():
                first = hf(past_key_values=pkv, decoder_input_ids=canvas[None]).logits[0]
            steps.append((f"commit {b} step 1", canvas, None, first))
        sc = steps[-1][3] / (0.8 if b < 0 else 0.6)
        with torch.no_grad():
            ref = hf(past_key_values=pkv, decoder_input_ids=canvas[None],
                     self_conditioning_logits=sc[None]).logits[0]
        steps.append((f"{'prefill' if b < 0 else f'commit {b}'} step 2 (SC)", canvas, sc, ref))
    return steps, pkv


def _replay(model, steps):
    """Our model on the same steps; yields (label, our logits, reference logits), then the cache."""
    cache = model.encode(PROMPT)
    for label, ids, sc, ref in steps:
        if ref is None:
            model.commit(cache, ids)
        else:
            yield label, model.denoise(cache, ids, sc), ref
    yield cache


def _check(model, steps, what=""):
    *pairs, cache = _replay(model, steps)
    for label, ours, theirs in pairs:
        assert ours.dtype == torch.float32 and ours.shape == (16, model.config.vocab_size)
        err = (ours - theirs).abs().max().item()
        assert err <= TOL, f"{what} {label}: max |Δlogit| = {err:.2e}"
    return pairs, cache


def test_logits_match_transformers(tiny, backends):
    model, hf = tiny
    steps, pkv = _hf_run(hf)
    for b in backends:
        set_backend(b)
        pairs, cache = _check(model, steps, f"backend {b}")
        assert len(pairs) == 8 and cache.length == pkv.get_seq_length() == 12 + 3 * 16


def test_cache_matches_transformers(tiny):
    """Per-layer K/V after prefill and commits: sliding layers hold the last W-1 positions,
    global layers all of them, with the same values as transformers' DynamicCache."""
    model, hf = tiny
    steps, pkv = _hf_run(hf, commits=2)
    *_, cache = _replay(model, steps)
    W = model.config.sliding_window
    for i, layer in enumerate(pkv.layers):
        want_k, want_v = layer.keys[0], layer.values[0]            # [Nkv, L, D]
        expect_len = W - 1 if model.config.is_sliding(i) else cache.length
        assert cache.keys[i].shape == want_k.shape and want_k.shape[1] == expect_len
        assert (cache.keys[i] - want_k).abs().max() <= 5e-5
        assert (cache.values[i] - want_v).abs().max() <= 5e-5


def test_uncached_matches_cached(tiny):
    model, _ = tiny
    prefix = torch.cat([PROMPT, _canvas(10), _canvas(11)])        # 44 tokens
    cache = model.encode(PROMPT)
    model.commit(cache, _canvas(10))
    model.commit(cache, _canvas(11))
    canvas = _canvas(30)
    sc = torch.randn(16, model.config.vocab_size, generator=torch.Generator().manual_seed(4)) * 3
    for s in (None, sc):
        want = model.denoise(cache, canvas, s)
        got = model.denoise_uncached(prefix, canvas, s)
        assert (got - want).abs().max() <= 1e-5
    # one long encode equals prompt + commits (positions and windows carry over), and so does
    # a prefill run in chunks that do not line up with the window or the canvases
    whole = model.encode(prefix)
    model.prefill_chunk = 5
    try:
        chunked = model.encode(prefix)
    finally:
        model.prefill_chunk = 1024
    for c in (whole, chunked):
        assert c.length == cache.length
        for a, b in zip(c.keys + c.values, cache.keys + cache.values):
            assert a.shape == b.shape and (a - b).abs().max() <= 5e-5, (a - b).abs().max()


def test_denoise_reads_cache_only(tiny):
    model, _ = tiny
    cache = model.encode(PROMPT)
    before = [t.clone() for t in cache.keys + cache.values]
    logits = model.denoise(cache, _canvas(5))
    model.denoise(cache, _canvas(6), logits)
    assert cache.length == PROMPT.numel()
    assert all(torch.equal(a, b) for a, b in zip(before, cache.keys + cache.values))


# -- quantized files: same model, weights as the file stores them ------------------------------

def _load_file_weights_into(hf, path):
    """Give the HF model the weights exactly as the GGUF stores them, dequantized by gguf-py."""
    reader = gguf.GGUFReader(path)
    stored = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
              for t in reader.tensors}
    dec = hf.model.decoder
    with torch.no_grad():
        for name, p in dec.named_parameters():
            key = gguf_name_for(f"model.decoder.{name}")     # spec §A.5 table
            p.copy_(stored[key].reshape(p.shape))


@pytest.mark.parametrize("outtype,hidden,types", [
    ("f16", 64, ("F16", "F16")), ("bf16", 64, ("BF16", "BF16")), ("q8_0", 64, ("Q8_0", "Q8_0")),
    ("q4_k_m", 256, ("Q4_K", "Q6_K")),     # rows of 256, so the K-quants really are used
])
def test_quantized_file_matches_transformers(tmp_path_factory, backends, outtype, hidden, types):
    """The HF model gets the weights exactly as the file stores them (dequantized by gguf-py),
    so our quantized path must match it as tightly as the float32 file does."""
    path, hf = _tiny(tmp_path_factory, "h64", outtype=outtype, seed=1, hidden_size=hidden)
    model = diffcli.load(path, dtype=torch.float32)
    assert (model.w.layers[0].wq.qtype, model.w.embed.qtype) == types
    _load_file_weights_into(hf.eval(), path)
    steps, _ = _hf_run(hf, commits=1)
    for b in backends:
        set_backend(b)
        _check(model, steps, f"{outtype} backend {b}")


# -- loading: validation, memory, no transformers -------------------------------------------------

def _random_gguf(path, H=64, V=512, n_layer=2, qtype=gguf.GGMLQuantizationType.F32, drop=(),
                 retype=None, seed=0):
    """A diffusion-gemma GGUF with random weights (no transformers): for loader tests."""
    rng = np.random.default_rng(seed)
    Nq, D, Dg, Nkv, Nkvg, F, E, Fe, W = 4, 16, 32, 2, 1, 96, 8, 32, 8
    sliding = [i % 2 == 0 for i in range(n_layer)]
    A = "diffusion-gemma."
    w = gguf.GGUFWriter(str(path), "diffusion-gemma")
    for k, v in {"block_count": n_layer, "context_length": 4096, "embedding_length": H,
                 "feed_forward_length": F, "attention.head_count": Nq, "expert_count": E,
                 "expert_used_count": 2, "attention.key_length": Dg, "attention.value_length": Dg,
                 "attention.sliding_window": W, "attention.key_length_swa": D,
                 "attention.value_length_swa": D, "expert_feed_forward_length": Fe}.items():
        w.add_uint32(A + k, v)
    w.add_array(A + "attention.head_count_kv", [Nkv if s else Nkvg for s in sliding])
    w.add_array(A + "attention.sliding_window_pattern", sliding)
    w.add_float32(A + "attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32("diffusion.canvas_length", 16)
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,),
              "rope_freqs.weight": (Dg // 2,), "self_cond_pre_norm.weight": (H,),
              "self_cond_gate.weight": (F, H), "self_cond_up.weight": (F, H),
              "self_cond_down.weight": (H, F)}
    for i, s in enumerate(sliding):
        d, kv = (D, Nkv) if s else (Dg, Nkvg)
        layer = {"attn_norm.weight": (H,), "attn_q.weight": (Nq * d, H), "attn_k.weight": (kv * d, H),
                 "attn_output.weight": (H, Nq * d), "attn_q_norm.weight": (d,),
                 "attn_k_norm.weight": (d,), "post_attention_norm.weight": (H,),
                 "ffn_norm.weight": (H,), "ffn_gate.weight": (F, H), "ffn_up.weight": (F, H),
                 "ffn_down.weight": (H, F), "post_ffw_norm_1.weight": (H,),
                 "pre_ffw_norm_2.weight": (H,), "ffn_gate_inp.weight": (E, H),
                 "ffn_gate_inp.scale": (H,), "ffn_gate_up_exps.weight": (E, 2 * Fe, H),
                 "ffn_down_exps.weight": (E, H, Fe), "ffn_down_exps.scale": (E,),
                 "post_ffw_norm_2.weight": (H,), "post_ffw_norm.weight": (H,),
                 "layer_output_scale.weight": (1,), "enc_layer_output_scale.weight": (1,)}
        if s:
            layer["attn_v.weight"] = (kv * d, H)
        shapes.update({f"blk.{i}.{k}": v for k, v in layer.items()})
    for name, shape in shapes.items():
        if name in drop:
            continue
        arr = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if name == "rope_freqs.weight":
            arr = np.array([1.0] * 4 + [1e30] * (Dg // 2 - 4), dtype=np.float32)
        t = (retype or {}).get(name, qtype if len(shape) > 1 and "gate_inp" not in name
                               else gguf.GGMLQuantizationType.F32)
        if t == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_name_table_covers_the_file(tiny):
    """Every tensor of a converted file is read by the model, and nothing else is expected."""
    from diffcli.model.weights import expected_shapes
    model, _ = tiny
    f = model.gguf
    shapes = expected_shapes(model.config)
    assert set(shapes) == set(f.tensor_names)
    for name, shape in shapes.items():
        assert tuple(f.info(name).shape) in (shape, (1,) + shape), name


def test_missing_tensor_is_named(tmp_path):
    path = _random_gguf(tmp_path / "m.gguf", drop=("blk.1.ffn_gate_up_exps.weight",))
    with pytest.raises(InputError, match=r"blk\.1\.ffn_gate_up_exps\.weight.*missing"):
        diffcli.load(path)


def test_a_type_without_a_fused_kernel_loads(tmp_path):
    """Q4_1 has a dequantizer but no fused kernel: it runs through dequantize -> matmul (issue
    13 item 19; a type without a dequantizer is refused: tests/test_types_run.py)."""
    q41 = gguf.GGMLQuantizationType.Q4_1
    path = _random_gguf(tmp_path / "q.gguf", retype={"blk.0.attn_q.weight": q41})
    model = diffcli.load(path)
    assert model.w.layers[0].wq.qtype == "Q4_1"


def test_shape_mismatch_is_rejected(tmp_path):
    path = _random_gguf(tmp_path / "s.gguf", V=512)
    # a file whose metadata says 2 KV heads on a layer whose K projection has 1
    from diffcli.model.config import ModelConfig
    from diffcli.model.weights import validate
    f = diffcli.open_gguf(path)
    cfg = ModelConfig.from_gguf(f)
    cfg.n_head_kv[1] = 2
    with pytest.raises(InputError, match=r"blk\.1\.attn_k\.weight.*shape"):
        validate(f, cfg)


def test_loading_keeps_weights_quantized_and_mapped(tmp_path):
    """Every matrix is a QTensor viewing the file's mmap at its own offset (no copy); the float
    tensors the model holds are only the small norms/scales/router."""
    path = _random_gguf(tmp_path / "w.gguf", qtype=gguf.GGMLQuantizationType.F16)
    model = diffcli.load(path)
    f = model.gguf
    base, size = f._map.ctypes.data, os.path.getsize(path)
    float_bytes, quantized = 0, 0
    for name, t in model.w.tensors():
        if isinstance(t, diffcli.QTensor):
            info = f.info(t.name)
            assert t.qtype == "F16" and t.raw.numel() == info.nbytes, name
            assert t.raw.data_ptr() - base == info.offset, name
            quantized += 1
        else:
            float_bytes += t.numel() * t.element_size()
    assert quantized == 4 + 9 + 8     # globals, sliding layer (with attn_v), global layer
    assert float_bytes < 0.05 * size, float_bytes


def test_load_does_not_dequantize_the_model(tmp_path):
    """Peak RSS growth of `load` stays far below the file size (F32 weights: a dequantized copy
    would double it)."""
    small = _random_gguf(tmp_path / "small.gguf")
    path = _random_gguf(tmp_path / "big.gguf", H=256, V=32768, n_layer=2)   # 36 MB
    size = os.path.getsize(path)
    code = textwrap.dedent(f"""
        import resource, diffcli, torch, diffcli.model
        def rss():
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * resource.getpagesize()
        diffcli.load({str(small)!r})    # one-off lazy initialisation (torch, gguf) not counted
        before = rss()
        m = diffcli.load({str(path)!r})
        print(rss() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown < 0.2 * size, f"load grew RSS by {grown:,} bytes for a {size:,}-byte file"


def test_runtime_does_not_import_transformers(tmp_path):
    path = _random_gguf(tmp_path / "r.gguf")
    code = textwrap.dedent(f"""
        import sys, torch, diffcli, diffcli.model
        m = diffcli.load({str(path)!r})
        cache = m.encode(torch.tensor([2, 5, 6]))
        logits = m.denoise(cache, torch.arange(16) + 5)
        m.denoise(cache, torch.arange(16) + 5, logits)
        m.commit(cache, torch.arange(16) + 5)
        print("transformers" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _short_run(model):
    cache = model.encode(PROMPT)
    first = model.denoise(cache, _canvas(1))
    model.commit(cache, _canvas(2))
    return first, model.denoise(cache, _canvas(3), first / 0.7)


@pytest.mark.gpu
@pytest.mark.parametrize("outtype,hidden", [("f32", 64), ("bf16", 96), ("q8_0", 64),
                                            ("q4_k_m", 256)])
def test_cuda_matches_cpu(tmp_path, outtype, hidden):
    """CUDA with its default backend (Triton where the type has kernels) against the CPU float32
    run: float32 activations match tightly; bfloat16 ones within bf16 noise. Every expert is
    active here: with top-2 routing of a random model, bf16 rounding flips expert choices and no
    tolerance means anything (transformers' own bf16 run differs from its fp32 one by ~9% RMS on
    this model even with every expert active)."""
    from diffcli.testing import make_random_gguf
    path = make_random_gguf(tmp_path / "r.gguf", {"hidden_size": hidden, "top_k_experts": 8},
                            outtype=outtype, seed=3)
    want = _short_run(diffcli.load(path, dtype=torch.float32))
    fp32 = _short_run(diffcli.load(path, device="cuda", dtype=torch.float32))
    bf16 = diffcli.load(path, device="cuda")
    assert bf16.dtype == torch.bfloat16
    got = _short_run(bf16)
    for a, b32, b16 in zip(want, fp32, got):
        assert b16.dtype == torch.float32 and b16.device.type == "cuda"
        err32 = ((a - b32.cpu()).norm() / a.norm()).item()
        err16 = ((a - b16.cpu()).norm() / a.norm()).item()
        print(f"{outtype}: relative RMS error fp32 {err32:.2e}, bf16 {err16:.2e}")
        assert err32 <= 1e-3 and err16 <= 0.15, (err32, err16)


@pytest.mark.parametrize("outtype,hidden", [("f32", 64), ("q8_0", 64), ("q4_k_m", 256)])
def test_cpu_bf16_matches_fp32(tmp_path, backends, outtype, hidden):
    """bfloat16 activations on the CPU (the default where the CPU has bf16 dot products) against
    the float32 run, on both CPU backends: within bf16 noise, with the same bound and for the same
    reason as test_cuda_matches_cpu. The head then uses a cached bf16 copy of the embedding on the
    torch backend, and the embedding's own blocks (no copy) on the native one (issue 14). The
    native backend multiplies with bf16 products here (native.set_int8(False)): that bound is bf16
    noise; the int8 products are bounded per kernel in test_native_q8.py and test_soft_int8.py,
    and their effect on real-shape logits is what scripts/int8_error.py measures."""
    from diffcli.testing import make_random_gguf
    path = make_random_gguf(tmp_path / "r.gguf", {"hidden_size": hidden, "top_k_experts": 8},
                            outtype=outtype, seed=3)
    from diffcli.compute import native
    want = _short_run(diffcli.load(path, dtype=torch.float32))
    native.set_int8(False)
    for b in backends:
        set_backend(b)
        model = diffcli.load(path, dtype=torch.bfloat16)
        assert model.cache_embedding == (b != "native")
        for a, got in zip(want, _short_run(model)):
            assert got.dtype == torch.float32 and torch.isfinite(got).all()
            err = ((a - got).norm() / a.norm()).item()
            print(f"{outtype} {b}: relative RMS error bf16 {err:.2e}")
            assert err <= 0.15, (b, err)
        if b != "native":
            assert model._embed_dense is not None and model._embed_dense.dtype == torch.bfloat16
        else:
            assert model._embed_dense is None


def test_default_dtype_follows_the_cpu_and_the_environment(tmp_path, monkeypatch):
    from diffcli.compute import native
    from diffcli.compute.backend import backend_for, cpu_has_bf16, default_dtype
    from diffcli.testing import make_random_gguf
    path = make_random_gguf(tmp_path / "r.gguf", {"hidden_size": 64}, outtype="f32", seed=3)
    cpu = torch.device("cpu")
    monkeypatch.delenv("DIFFCLI_DTYPE", raising=False)
    want = torch.bfloat16 if cpu_has_bf16() else torch.float32      # an F32 file: no int8 products
    assert default_dtype(cpu) == want and diffcli.load(path).dtype == want
    fast_int8 = backend_for("cpu") == "native" and native.q8_simd() != "portable" and native.int8()
    q4 = make_random_gguf(tmp_path / "q.gguf", {"hidden_size": 64}, outtype="q4_k_m", seed=3)
    assert diffcli.load(q4).dtype == (torch.bfloat16 if cpu_has_bf16() or fast_int8 else torch.float32)
    assert default_dtype(cpu, text=False, qtypes={"Q4_K"}) == want
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setenv("DIFFCLI_DTYPE", "f32")
    model = diffcli.load(path)
    assert model.dtype == torch.float32 and not model.cache_embedding
    monkeypatch.setenv("DIFFCLI_DTYPE", "bf16")
    assert diffcli.load(path).dtype == torch.bfloat16
    assert diffcli.load(path, dtype=torch.float32).dtype == torch.float32   # explicit wins
    monkeypatch.setenv("DIFFCLI_DTYPE", "f64")
    with pytest.raises(InputError, match="DIFFCLI_DTYPE"):
        default_dtype(cpu)


@pytest.mark.parametrize("q8,int8,backend,qtypes,want", [
    ("avx2", True, "native", {"Q4_K", "F32"}, torch.bfloat16), ("vnni", True, "native", {"Q8_0"}, torch.bfloat16),
    ("avx2", True, "native", {"F16", "F32"}, torch.float32), ("avx2", False, "native", {"Q4_K"}, torch.float32),
    ("portable", True, "native", {"Q4_K"}, torch.float32), ("avx2", True, "torch", {"Q4_K"}, torch.float32)])
def test_default_dtype_without_bf16_dot_products(monkeypatch, q8, int8, backend, qtypes, want):
    """On a CPU without bf16 dot products the text model defaults to bf16 exactly where the native
    library's fast int8 products take it (AVX2 or VNNI, int8 not switched off, native backend, a
    weight type they multiply); the vision tower (text=False) stays float32 there."""
    from diffcli.compute import backend as be, native
    monkeypatch.delenv("DIFFCLI_DTYPE", raising=False)
    monkeypatch.setattr(be, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(native, "q8_simd", lambda: q8)
    monkeypatch.setattr(native, "int8", lambda: int8)
    monkeypatch.setattr(be, "backend_for", lambda device_type: backend)
    cpu = torch.device("cpu")
    assert be.default_dtype(cpu, qtypes=qtypes) == want
    assert be.default_dtype(cpu, text=False, qtypes=qtypes) == torch.float32
    assert be.default_dtype(cpu) == torch.float32                # no weight types known


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window", [None, 100], ids=["causal", "sliding"])
def test_attention_query_blocks(dtype, tol, window):
    """A masked CPU attention longer than QUERY_BLOCK goes block by block, each block against the
    key columns its rows may attend (an encoder chunk after 120 cached keys, causal or with a
    sliding window, one query's row widened to every key as an image block would): against
    float64 SDPA, and against the unblocked product up to the order of fp32 sums."""
    from diffcli.model import layers
    from diffcli.model.layers import QUERY_BLOCK, _attend, attention
    T, P, Nq, Nkv, D = 2 * QUERY_BLOCK + 37, 120, 4, 2, 256
    gen = torch.Generator().manual_seed(T)
    q = (torch.randn(T, Nq, D, generator=gen) * 0.1).to(dtype)
    k = (torch.randn(Nkv, P + T, D, generator=gen) * 0.1).to(dtype)
    v = torch.randn(Nkv, P + T, D, generator=gen).to(dtype)
    pos, kpos = torch.arange(P, P + T), torch.arange(P + T)
    mask = kpos[None, :] <= pos[:, None]
    if window is not None:
        mask &= kpos[None, :] > pos[:, None] - window
    mask[QUERY_BLOCK + 5] = True
    got = attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q.transpose(0, 1)[None].double(), k[None].double(),
                                          v[None].double(), attn_mask=mask, scale=1.0,
                                          enable_gqa=True)[0].transpose(0, 1).reshape(T, Nq * D)
    assert got.dtype == dtype and (got.double() - want).abs().max() <= tol
    spans = [mask[a:a + QUERY_BLOCK].any(0).nonzero() for a in range(0, T, QUERY_BLOCK)]
    assert any(int(c[0]) > 0 or int(c[-1]) < P + T - 1 for c in spans)    # some columns skipped


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("T,Nq,Nkv,D,L,masked", [(5, 4, 2, 256, 9, True), (7, 4, 1, 512, 7, False),
                                                 (3, 2, 2, 256, 5, True), (6, 4, 2, 64, 8, True)])
@pytest.mark.parametrize("bf16_dot", [True, False], ids=["bf16-matmuls", "f32-matmuls"])
def test_attention_matches_sdpa(dtype, tol, T, Nq, Nkv, D, L, masked, bf16_dot, monkeypatch):
    """layers.attention (batched matmuls on the CPU at D >= 256, SDPA below) against float64 SDPA
    with grouped query heads and a mask; bf16 within the rounding of its operands and output,
    both where the CPU multiplies bf16 and where those matmuls go through float32 (AVX2-only)."""
    from diffcli.model import layers
    from diffcli.model.layers import attention
    monkeypatch.setattr(layers, "cpu_has_bf16", lambda: bf16_dot)
    gen = torch.Generator().manual_seed(T * D)
    q = (torch.randn(T, Nq, D, generator=gen) * 0.1).to(dtype)
    k = (torch.randn(Nkv, L, D, generator=gen) * 0.1).to(dtype)
    v = torch.randn(Nkv, L, D, generator=gen).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(T, L, generator=gen) > 0.3
        mask[:, 0] = True
    got = attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q.transpose(0, 1)[None].double(), k[None].double(),
                                          v[None].double(), attn_mask=mask, scale=1.0,
                                          enable_gqa=True)[0].transpose(0, 1).reshape(T, Nq * D)
    assert got.dtype == dtype and got.shape == (T, Nq * D)
    assert (got.double() - want).abs().max() <= tol
    if dtype == torch.bfloat16 and D >= 256 and not bf16_dot:   # float32 work, one rounding at the end
        assert torch.equal(got, attention(q.float(), k.float(), v.float(), mask).bfloat16())
    # the CUDA path at D > 256: KV heads expanded to the query heads (head h reads KV h // G)
    from diffcli.model.layers import sdpa
    expanded = sdpa(q, k, v, mask, expand_kv=True)
    assert expanded.dtype == dtype and expanded.shape == (T, Nq * D)
    assert (expanded.double() - want).abs().max() <= tol
