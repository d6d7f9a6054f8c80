"""diffcli.quantize (numpy quantisers of the converter) and the q4_k_m tensor-type policy.

Oracles: `gguf.quants.quantize` for the types gguf-py can produce (Q8_0, Q5_0, BF16, F16: bit for
bit); `gguf.quants.dequantize` to read back our Q4_K / Q6_K blocks (error bounds stated in
diffcli/quantize.py), and diffcli's own dequantiser must read them the same way; the per-type tensor
counts of the real Q4_K_M file (spec §A.4, from its loader log) for the type policy.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from diffcli.gguf import quantize as Q  # noqa: E402
from diffcli.gguf.convert import HParams, hf_shapes, tensor_plan, tensor_types  # noqa: E402
from diffcli.gguf.quants import dequantize_torch  # noqa: E402


def _data(rng: np.random.Generator, rows: int, cols: int, log_range: float = 12) -> np.ndarray:
    """Rows of very different magnitudes, plus blocks that stress the rounding rules."""
    x = rng.standard_normal((rows, cols)).astype(np.float32) * np.exp(rng.uniform(-log_range, 6, (rows, 1)))
    x = x.astype(np.float32)
    x[0, :64] = 0.0                                     # all-zero blocks: d = 0
    x[1, :32] = 3.0
    x[1, 7] = -3.0                                      # |max| tie of opposite signs: first one wins
    x[2, :32] = np.arange(32, dtype=np.float32) * 0.5 - 8   # many exact .5 rounding cases
    x[3, :256] = -np.abs(x[3, :256])                    # a super-block without positive values
    x[4, :256] = 7.0                                    # constant super-block
    return x


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "BF16", "F16"])
def test_bit_exact_with_gguf_quants(qtype):
    rng = np.random.default_rng(0)
    x = _data(rng, 37, 512)
    ours = Q.quantize(x, qtype)
    want = gguf.quants.quantize(x, T[qtype])
    assert ours.dtype == want.dtype and ours.shape == want.shape
    assert np.array_equal(ours.view(np.uint8), want.view(np.uint8))


def test_bf16_nan_and_inf_like_gguf():
    x = np.array([[np.nan, -np.nan, np.inf, -np.inf, 1e-45, -0.0, 3.3895314e38, 1.0]], np.float32)
    assert np.array_equal(Q.quantize(x, "BF16"), gguf.quants.quantize(x, T.BF16))


def test_3d_expert_tensor_rows_and_chunking(monkeypatch):
    monkeypatch.setattr(Q, "_CHUNK_ELEMENTS", 1000)   # force several chunks
    x = np.random.default_rng(1).standard_normal((3, 10, 96)).astype(np.float32)
    assert np.array_equal(Q.quantize(x, "Q8_0"), gguf.quants.quantize(x, T.Q8_0))
    with pytest.raises(ValueError, match="multiple of 256"):
        Q.quantize(x, "Q4_K")


def _k_bound(x: np.ndarray, qtype: str) -> np.ndarray:
    """Per-value error bound from x alone (see the docstrings in diffcli/quantize.py), with 1e-3
    relative slack for the f16 scales. It assumes the super-scale d is a normal f16 (blocks with
    amax above ~1e-3); below that f16 rounding of d dominates, in ggml's format as in ours."""
    if qtype == "Q4_K":
        sub = x.reshape(-1, 8, 32)
        lo = np.minimum(sub.min(axis=2), 0)
        need = (sub.max(axis=2) - lo) / 15 + (-lo).max(axis=1, keepdims=True) / 63
        step = need + need.max(axis=1, keepdims=True) / 63
        size = 32
    else:
        sub = x.reshape(-1, 16, 16)
        need = np.abs(sub).max(axis=2) / 31
        step = need + need.max(axis=1, keepdims=True) / 127
        size = 16
    return np.repeat(step * 0.5 * (1 + 1e-3), size, axis=1).reshape(x.shape)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quants_read_back_within_bound(qtype):
    rng = np.random.default_rng(2)
    x = _data(rng, 24, 512, log_range=6)
    raw = Q.quantize(x, qtype)
    assert raw.shape == (24, 512 // 256 * Q.BLOCK[qtype][1])
    back = gguf.quants.dequantize(raw, T[qtype])
    assert back.shape == x.shape
    err = np.abs(back - x)
    assert np.all(err <= _k_bound(x, qtype))
    assert np.all(back[0, :64] == 0) and np.allclose(back[4, :256], 7.0, rtol=0.02)
    # on plain Gaussian rows the RMS error is about a uniform rounding error of the grid step
    g = rng.standard_normal((64, 1024)).astype(np.float32)
    rms = np.sqrt(np.mean((gguf.quants.dequantize(Q.quantize(g, qtype), T[qtype]) - g) ** 2))
    assert rms < {"Q4_K": 0.12, "Q6_K": 0.03}[qtype]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_K", "Q6_K", "BF16"])
def test_diffcli_dequantizer_reads_our_blocks_like_gguf(qtype):
    x = _data(np.random.default_rng(3), 8, 768)
    raw = Q.quantize(x, qtype)
    want = gguf.quants.dequantize(raw, T[qtype]).reshape(-1)
    got = dequantize_torch(torch.from_numpy(raw.reshape(-1).copy()), qtype).numpy()
    assert np.array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# Tensor-type policy on the real 26B-A4B shapes (spec §1, §A.4): no data needed.

REAL = {"text_config": {
    "num_hidden_layers": 30, "hidden_size": 2816, "intermediate_size": 2112, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512, "num_global_key_value_heads": 2,
    "sliding_window": 1024, "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704,
    "vocab_size": 262144, "max_position_embeddings": 262144}, "canvas_length": 256}


def _real_types(outtype: str) -> dict[str, str]:
    hp = HParams.from_hf(REAL)
    shapes = hf_shapes(hp)
    plan = [(g, (256,) if h is None else shapes[h]) for g, h in tensor_plan(hp)]
    return tensor_types(plan, outtype, hp.n_layer)


def test_real_model_q4_k_m_type_counts_match_the_published_file():
    types = _real_types("q4_k_m")
    assert len(types) == 692
    # LEM loader log of the Unsloth Q4_K_M file: f32 423, q5_0 33, q8_0 28, q4_K 194, q6_K 14
    assert Counter(types.values()) == {"F32": 423, "Q5_0": 33, "Q8_0": 28, "Q4_K": 194, "Q6_K": 14}
    assert types["token_embd.weight"] == "Q6_K"
    assert types["self_cond_down.weight"] == "Q5_0" and types["self_cond_gate.weight"] == "Q4_K"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert Counter(types[f"blk.{i}.attn_v.weight"] for i in range(30) if (i + 1) % 6) == {"Q6_K": 13, "Q4_K": 12}
    more = [i for i in range(30) if types[f"blk.{i}.ffn_down.weight"] == "Q8_0"]
    assert more == [i for i in range(30) if types[f"blk.{i}.ffn_down_exps.weight"] == "Q8_0"]
    assert len(more) == 14


def test_real_model_q8_0_types_match_the_published_dump():
    types = _real_types("q8_0")
    # DUMPQ8: every matrix Q8_0 except the router, which stays F32 like every vector
    assert Counter(types.values()) == {"F32": 423, "Q8_0": 692 - 423}
    assert types["blk.3.ffn_gate_inp.weight"] == "F32" and types["token_embd.weight"] == "Q8_0"


def test_tiny_q4_k_m_file_uses_k_quants(tmp_path):
    pytest.importorskip("transformers")
    from diffcli.testing import make_tiny_gguf
    path, model = make_tiny_gguf(tmp_path / "t.gguf", "q4_k_m", variant="h256")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["blk.0.ffn_gate_up_exps.weight"] == "Q4_K"
    # "more bits" with 4 layers: i < 0, i >= 3, or i % 3 == 2 -> layers 2 and 3; for the two attn_v
    # tensors (layers 0, 2) the count is over attn_v tensors: index 1 (i >= 7*2//8) -> layer 2
    assert [types[f"blk.{i}.attn_v.weight"] for i in (0, 2)] == ["Q4_K", "Q6_K"]
    assert [types[f"blk.{i}.ffn_down_exps.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 1} == {"F32"}
    emb = model.model.decoder.embed_tokens.weight.detach().numpy()
    got = gguf.quants.dequantize(np.asarray(next(t.data for t in reader.tensors
                                                 if t.name == "token_embd.weight")), T.Q6_K)
    assert np.all(np.abs(got - emb) <= _k_bound(emb, "Q6_K"))


def test_real_model_shapes_total_and_size_label():
    from diffcli.gguf.convert import size_label
    hp = HParams.from_hf(REAL)
    shapes = hf_shapes(hp)
    dims = [(g, (256,) if h is None else shapes[h]) for g, h in tensor_plan(hp)]
    total = sum(int(np.prod(s)) for _, s in dims)
    assert total == 25_250_987_068                       # DUMPQ8 element count, spec §1
    experts = sum(int(np.prod(s)) for g, s in dims if g.endswith("_exps.weight"))
    assert size_label(128, total, experts) == "128x2.6B"  # general.size_label of the real files
    assert shapes["model.decoder.layers.5.self_attn.q_proj.weight"] == (8192, 2816)
    assert "model.decoder.layers.5.self_attn.v_proj.weight" not in shapes
