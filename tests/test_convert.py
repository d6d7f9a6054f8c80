"""diffcli convert: HF checkpoint (transformers 5.23.0 tiny model) -> GGUF in the PR #24423 layout.

The expected layout below is written from spec §A (names, dims, keys), independently of
diffcli/gguf/convert.py (the name table is shared with the model tests: tests/_spec_names.py);
files are read back with `gguf.GGUFReader` (the gguf-py oracle), not our parser.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from diffcli.cli import cli  # noqa: E402
from diffcli.gguf.convert import convert  # noqa: E402
from diffcli.errors import InputError  # noqa: E402
from diffcli.testing import (build_tiny_hf_model, make_random_gguf, save_tiny_checkpoint,  # noqa: E402
                             toy_tokenizer)

from _spec_names import gguf_name_for  # noqa: E402

# Tiny config of spec §G.1: H 64, F 96, 4 layers [sliding, full, sliding, full], 4 heads,
# sliding kv 2 x 16, full kv 1 x 32, 8 experts top-2 width 32, vocab 512, canvas 16.
H, F, V, E, FE, HEADS = 64, 96, 512, 8, 32, 4
SLIDING = [True, False, True, False]


def expected_tensors(hidden: int = H) -> dict[str, tuple[int, ...]]:
    """GGUF name -> GGUF dims (ne[0] first), from the tables of spec §A.4."""
    out = {
        "token_embd.weight": (hidden, V), "output_norm.weight": (hidden,), "rope_freqs.weight": (16,),
        "self_cond_pre_norm.weight": (hidden,), "self_cond_gate.weight": (hidden, F),
        "self_cond_up.weight": (hidden, F), "self_cond_down.weight": (F, hidden),
    }
    for i, sliding in enumerate(SLIDING):
        hd, kv = (16, 2) if sliding else (32, 1)
        b = f"blk.{i}."
        out.update({
            b + "attn_norm.weight": (hidden,), b + "attn_q.weight": (hidden, HEADS * hd),
            b + "attn_k.weight": (hidden, kv * hd), b + "attn_output.weight": (HEADS * hd, hidden),
            b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,),
            b + "post_attention_norm.weight": (hidden,), b + "ffn_norm.weight": (hidden,),
            b + "ffn_gate.weight": (hidden, F), b + "ffn_up.weight": (hidden, F),
            b + "ffn_down.weight": (F, hidden), b + "post_ffw_norm_1.weight": (hidden,),
            b + "pre_ffw_norm_2.weight": (hidden,), b + "ffn_gate_inp.weight": (hidden, E),
            b + "ffn_gate_inp.scale": (hidden,), b + "ffn_gate_up_exps.weight": (hidden, 2 * FE, E),
            b + "ffn_down_exps.weight": (FE, hidden, E), b + "ffn_down_exps.scale": (E,),
            b + "post_ffw_norm_2.weight": (hidden,), b + "post_ffw_norm.weight": (hidden,),
            b + "layer_output_scale.weight": (1,), b + "enc_layer_output_scale.weight": (1,),
        })
        if sliding:
            out[b + "attn_v.weight"] = (hidden, kv * hd)
    return out


def expected_keys(hidden: int = H) -> dict[str, object]:
    """Spec §A.2 keys with the tiny values of §G.4 (general.* and tokenizer.* checked elsewhere)."""
    a = "diffusion-gemma."
    return {
        a + "block_count": 4, a + "context_length": 4096, a + "embedding_length": hidden,
        a + "feed_forward_length": F, a + "attention.head_count": HEADS,
        a + "attention.head_count_kv": [2, 1, 2, 1], a + "rope.freq_base": 1e6,
        a + "rope.freq_base_swa": 1e4, a + "attention.layer_norm_rms_epsilon": np.float32(1e-6),
        a + "expert_count": E, a + "expert_used_count": 2, a + "attention.key_length": 32,
        a + "attention.value_length": 32, a + "final_logit_softcapping": 30.0,
        a + "attention.sliding_window": 8, a + "attention.shared_kv_layers": 0,
        a + "embedding_length_per_layer_input": 0, a + "attention.sliding_window_pattern": SLIDING,
        a + "attention.key_length_swa": 16, a + "attention.value_length_swa": 16,
        a + "expert_feed_forward_length": FE, a + "rope.dimension_count": 32,
        a + "rope.dimension_count_swa": 16, a + "attention.causal": False,
        "diffusion.canvas_length": 16,
    }




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = build_tiny_hf_model(seed=0)
    hf_dir = save_tiny_checkpoint(model, tmp_path_factory.mktemp("hf"))
    out = convert(hf_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "f32")
    return model, hf_dir, gguf.GGUFReader(out), out


def _fields(reader) -> dict[str, object]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_tensor_names_shapes_and_types(tiny):
    _, _, reader, _ = tiny
    got = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert got == expected_tensors()
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    assert "output.weight" not in got and not any("vision" in n for n in got)


def test_metadata_keys(tiny):
    _, _, reader, _ = tiny
    fields = _fields(reader)
    for key, want in expected_keys().items():
        assert fields[key] == pytest.approx(want) if isinstance(want, float) else fields[key] == want, key
    types = {k: f.types for k, f in reader.fields.items()}
    U32, I32, BOOL = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32, gguf.GGUFValueType.BOOL
    assert types["diffusion-gemma.attention.head_count_kv"] == [gguf.GGUFValueType.ARRAY, I32]
    assert types["diffusion-gemma.attention.sliding_window_pattern"] == [gguf.GGUFValueType.ARRAY, BOOL]
    assert types["diffusion-gemma.block_count"] == [U32]
    assert fields["general.architecture"] == "diffusion-gemma"
    assert fields["general.type"] == "model"
    assert fields["general.file_type"] == 0 and fields["general.quantization_version"] == 2
    # A.2/A.3 key set of the real files: 4 general + 25 architecture + 13 tokenizer + 2 = 44
    assert len(fields) == 44
    assert not any(k.startswith("diffusion.eb_") for k in fields)   # default generation_config


def test_f32_tensors_round_trip_exactly(tiny):
    model, _, reader, _ = tiny
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    seen = set()
    for hf_name, value in model.state_dict().items():
        name = gguf_name_for(hf_name)
        if name is None:
            continue
        want = value.detach().numpy()
        assert tensors[name].shape == want.shape, name
        assert np.array_equal(tensors[name], want), name
        seen.add(name)
    assert seen == set(tensors) - {"rope_freqs.weight"}
    # the fixture must exercise what it claims: scalars and norms differ from 1 and between phases
    assert tensors["blk.1.layer_output_scale.weight"][0] == np.float32(0.95)
    assert tensors["blk.1.enc_layer_output_scale.weight"][0] == np.float32(1.05)
    assert not np.any(tensors["blk.0.ffn_down_exps.scale"] == 1.0)


def test_rope_freqs_matches_transformers_inv_freq(tiny):
    model, _, reader, _ = tiny
    freqs = next(np.asarray(t.data) for t in reader.tensors if t.name == "rope_freqs.weight")
    assert freqs.tolist() == [1.0] * 4 + [np.float32(1e30)] * 12
    # transformers: the proportional RoPE rotates exactly the pairs that rope_freqs leaves at 1
    inv = model.model.decoder.rotary_emb.full_attention_inv_freq.numpy()
    assert np.array_equal(inv != 0, freqs == 1.0)


def test_tokenizer_keys(tiny):
    _, hf_dir, reader, _ = tiny
    fields = _fields(reader)
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    oracle = toy_tokenizer(V)
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == V and all(oracle.id_to_token(i) == t for i, t in enumerate(tokens))
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m)
                                               for m in tok["model"]["merges"]]
    types = dict(zip(tokens, fields["tokenizer.ggml.token_type"]))
    for t in ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|think|>", "<|tool>"]:
        assert types[t] == 3, t
    for t in ["<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
              "<tool_response|>", '<|"|>']:
        assert types[t] == 4, t
    assert types["<0x00>"] == types["<0xFF>"] == 6
    assert types["\u2581the"] == types["\n\n"] == 1
    for key, text in [("bos", "<bos>"), ("eos", "<eos>"), ("unknown", "<unk>"), ("padding", "<pad>"),
                      ("mask", "<mask>")]:
        assert fields[f"tokenizer.ggml.{key}_token_id"] == oracle.token_to_id(text)
    assert fields["tokenizer.ggml.model"] == "gemma4"
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["tokenizer.chat_template"] == (hf_dir / "chat_template.jinja").read_text()


def test_model_config_reads_converted_file(tiny):
    from diffcli.model.config import ModelConfig
    from diffcli.gguf.reader import open_gguf
    cfg = ModelConfig.from_gguf(open_gguf(tiny[3]))
    assert (cfg.n_layer, cfg.n_embd, cfg.head_dim, cfg.head_dim_swa, cfg.n_rot) == (4, 64, 32, 16, 4)
    assert cfg.n_head_kv == [2, 1, 2, 1] and cfg.layer_types == ["sliding", "full"] * 2
    assert (cfg.vocab_size, cfg.canvas_length, cfg.n_expert_used) == (V, 16, 2)


def test_refuses_to_overwrite(tiny, tmp_path):
    _, hf_dir, _, _ = tiny
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(InputError, match="already exists"):
        convert(hf_dir, out, "f32")
    assert out.read_bytes() == b"keep me"
    result = CliRunner().invoke(cli, ["convert", str(hf_dir), "-o", str(out), "--outtype", "f32"])
    assert result.exit_code == 2 and "--force" in result.output
    assert out.read_bytes() == b"keep me"
    result = CliRunner().invoke(cli, ["convert", str(hf_dir), "-o", str(out), "--outtype", "f32", "--force"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(os.listdir(tmp_path)) == ["x.gguf"]   # no temporary file left behind
    result = CliRunner().invoke(cli, ["convert", str(hf_dir), "-o", str(tmp_path), "--force"])
    assert result.exit_code == 2 and "directory" in result.output


@pytest.mark.parametrize("case", ["missing", "file", "no-config", "bad-json", "no-weights"])
def test_bad_hf_dir_is_one_line_exit_2(tmp_path, case):
    d = tmp_path / "hf"
    if case == "file":
        d.write_text("x")
    elif case != "missing":
        d.mkdir()
    if case == "bad-json":
        (d / "config.json").write_text("{not json")
    if case == "no-weights":
        (d / "config.json").write_text(json.dumps({"model_type": "diffusion_gemma", "text_config": {}}))
    result = CliRunner().invoke(cli, ["convert", str(d), "-o", str(tmp_path / "o.gguf")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffcli: error:") and str(d) in lines[0]
    assert not (tmp_path / "o.gguf").exists()


def test_shape_mismatch_and_missing_tokenizer_are_input_errors(tiny, tmp_path):
    _, hf_dir, _, _ = tiny
    d = tmp_path / "hf"
    d.mkdir()
    for f in hf_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="implies"):
        convert(d, tmp_path / "o.gguf")
    (d / "config.json").write_text((hf_dir / "config.json").read_text())
    (d / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="tokenizer.json"):
        convert(d, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_sampler_keys_from_generation_config(tiny, tmp_path):
    _, hf_dir, _, _ = tiny
    d = tmp_path / "hf"
    d.mkdir()
    for f in hf_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    gen = json.loads((d / "generation_config.json").read_text())
    gen.update(max_denoising_steps=32, t_min=0.3, t_max=0.9, stability_threshold=2,
               confidence_threshold=0.01, sampler_config={"entropy_bound": 0.2})
    (d / "generation_config.json").write_text(json.dumps(gen))
    fields = _fields(gguf.GGUFReader(convert(d, tmp_path / "o.gguf")))
    assert fields["diffusion.eb_max_steps"] == 32 and fields["diffusion.eb_stability_threshold"] == 2
    for key, want in [("t_min", 0.3), ("t_max", 0.9), ("entropy_bound", 0.2), ("confidence_threshold", 0.01)]:
        assert fields[f"diffusion.eb_{key}"] == pytest.approx(want), key


def test_outtypes_f16_bf16_q8_0(tiny, tmp_path):
    model, hf_dir, _, _ = tiny
    sd = {gguf_name_for(k): v.numpy() for k, v in model.state_dict().items() if gguf_name_for(k)}
    for outtype, qtype, ftype in [("f16", "F16", 1), ("bf16", "BF16", 32), ("q8_0", "Q8_0", 7)]:
        reader = gguf.GGUFReader(convert(hf_dir, tmp_path / f"{outtype}.gguf", outtype))
        assert _fields(reader)["general.file_type"] == ftype
        for t in reader.tensors:
            keep_f32 = len(t.shape) == 1 or t.name.endswith("ffn_gate_inp.weight")
            assert t.tensor_type.name == ("F32" if keep_f32 else qtype), t.name
            if t.name == "rope_freqs.weight":
                continue
            # the bytes are what gguf-py's own quantiser makes of the HF tensor
            want = gguf.quants.quantize(sd[t.name].astype(np.float32), t.tensor_type)
            assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), (outtype, t.name)


def test_hf_shapes_match_transformers_for_h96_and_default_layer_pattern():
    from diffcli.gguf.convert import HParams, hf_shapes
    for kw in [dict(variant="h96"), dict(num_hidden_layers=6, layer_types=None)]:
        model = build_tiny_hf_model(seed=1, **kw)
        sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        hp = HParams.from_hf(model.config.to_dict())
        assert hf_shapes(hp) == {k: sd[k] for k in hf_shapes(hp)}
        assert hp.layer_types == model.config.text_config.layer_types


def test_random_gguf_has_the_converted_layout(tiny, tmp_path):
    reader = gguf.GGUFReader(make_random_gguf(tmp_path / "r.gguf", {}, "f32", seed=3))
    assert {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors} == expected_tensors()
    got, want = _fields(reader), _fields(tiny[2])
    assert set(got) == set(want)
    for key in expected_keys():
        assert got[key] == want[key], key
    assert got["tokenizer.ggml.tokens"] == want["tokenizer.ggml.tokens"]


def test_toy_tokenizer_layout_and_round_trip():
    from diffcli.testing import GEMMA4_SPECIALS
    tok = toy_tokenizer(V)
    assert [tok.id_to_token(i) for i in range(5)] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    assert [tok.id_to_token(5 + i) for i in range(12)] == GEMMA4_SPECIALS
    assert tok.id_to_token(17) == "<0x00>" and tok.id_to_token(17 + 255) == "<0xFF>"
    text = "Why is the sky blue?\n\n  Über 漢字 <|turn>user\n"
    enc = tok.encode(text)
    assert enc.ids[0] == 2 and enc.ids.count(2) == 1
    assert tok.token_to_id("<|turn>") in enc.ids and tok.token_to_id("\n\n") in enc.ids
    assert "<0xC3>" in enc.tokens                        # byte fallback for a character not in vocab
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<bos>" + text
    assert tok.encode(" the sky").tokens == ["<bos>", "\u2581the", "\u2581sky"]   # learned merges apply


def test_failure_while_writing_leaves_nothing_behind(tmp_path):
    from diffcli.gguf.convert import HParams, write_gguf
    from diffcli.testing import random_state_dict, tiny_config_dict, toy_gguf_vocab
    cfg = tiny_config_dict()
    weights = random_state_dict(cfg)
    weights["model.decoder.layers.2.mlp.down_proj.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(InputError, match="down_proj"):
        write_gguf(tmp_path / "o.gguf", HParams.from_hf(cfg), weights.__getitem__, toy_gguf_vocab(V))
    assert os.listdir(tmp_path) == []
