"""diffcli's GGUF parser and ModelConfig: against gguf-py's reader on the real file, on a small
diffusion-gemma file written with GGUFWriter, and on broken files (one-line InputError)."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from diffcli import quants
from diffcli.config import EB_DEFAULTS, ModelConfig
from diffcli.errors import InputError
from diffcli.gguffile import open_gguf

import _tinygguf
from _tinygguf import ARCH_KEYS, DIMS, EB_KEYS, HEAD_KV, PATTERN


@pytest.fixture
def tiny(tmp_path):
    return _tinygguf.write(tmp_path / "tiny.gguf")


def assert_one_line_error(exc: InputError, path, *words):
    msg = exc.message
    assert "\n" not in msg and msg.startswith(str(path)), msg
    for w in words:
        assert w in msg, (w, msg)


# -- against gguf.GGUFReader ----------------------------------------------------------------

def compare_with_reader(path):
    ours, ref = open_gguf(path), GGUFReader(str(path))
    ref_fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(ref_fields)
    for key, field in ref_fields.items():
        assert ours.value_types[key] == field.types[0], key
        want = field.contents()
        got = ours.metadata[key]
        if isinstance(want, float):      # stored f32: gguf-py widens the same way
            assert got == want, key
        else:
            assert got == want and type(got) is type(want), key
    assert ours.tensor_names == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.info(t.name)
        assert info.qtype == t.tensor_type.name
        assert info.ggml_dims == tuple(int(d) for d in t.field.parts[3]), t.name   # as stored
        assert info.shape == tuple(reversed(info.ggml_dims))
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes, t.name
        raw = ours.tensor(t.name).raw
        assert np.array_equal(raw.numpy(), np.asarray(t.data).view(np.uint8).reshape(-1)), t.name
    return ours


def test_matches_gguf_reader_on_tiny_file(tiny):
    f = compare_with_reader(tiny)
    assert f.architecture == "diffusion-gemma" and f.version == 3


@pytest.mark.slow
@pytest.mark.realdata
def test_matches_gguf_reader_on_real_file(real_gguf):
    f = compare_with_reader(real_gguf)
    assert len(f.tensor_names) == 236
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 262_144


# -- ModelConfig.from_gguf --------------------------------------------------------------------

def test_config_reads_every_key(tiny):
    cfg = ModelConfig.from_gguf(open_gguf(tiny))
    expect = {
        "n_layer": ARCH_KEYS["block_count"][1], "n_embd": DIMS["n_embd"], "n_ff": DIMS["n_ff"],
        "n_head": DIMS["n_head"], "n_head_kv": HEAD_KV, "head_dim": DIMS["head_dim"],
        "head_dim_swa": DIMS["head_dim_swa"],
        "sliding_window": ARCH_KEYS["attention.sliding_window"][1], "swa_pattern": PATTERN,
        "rope_theta": 500_000.0, "rope_theta_swa": 5_000.0, "n_rot": DIMS["n_rot"],
        "n_expert": DIMS["n_expert"], "n_expert_used": DIMS["n_expert_used"],
        "n_ff_exp": DIMS["n_ff_exp"], "rms_eps": float(np.float32(1e-5)),
        "final_logit_softcap": 25.0, "vocab_size": DIMS["vocab"], "canvas_length": _tinygguf.CANVAS,
        "context_length": ARCH_KEYS["context_length"][1],
        "layer_types": ["sliding", "sliding", "sliding", "full", "sliding", "full"],
    }
    for name, value in expect.items():
        assert getattr(cfg, name) == value, name
    assert cfg.sampler_defaults == EB_DEFAULTS                       # no diffusion.eb_* keys
    assert [cfg.layer_head_dim(i) for i in range(6)] == [16, 16, 16, 32, 16, 32]


def test_config_sampler_keys_override_defaults(tmp_path):
    eb = {k: v for k, (_, v) in EB_KEYS.items()}
    cfg = ModelConfig.from_gguf(open_gguf(_tinygguf.write(tmp_path / "eb.gguf", eb=eb)))
    assert cfg.sampler_defaults == {"max_steps": 20, "t_min": 0.25, "t_max": 0.75,
                                    "entropy_bound": 0.5, "stability": 3, "confidence": 0.125}
    assert isinstance(cfg.sampler_defaults["max_steps"], int)
    # only some present: the others keep their defaults; strings are accepted (the PR reads them so)
    part = {"diffusion.eb_t_max": ("add_string", "0.9")}
    cfg = ModelConfig.from_gguf(open_gguf(_tinygguf.write(tmp_path / "part.gguf", eb=part)))
    assert cfg.sampler_defaults == {**EB_DEFAULTS, "t_max": 0.9}


def test_config_errors_name_the_file_and_key(tmp_path):
    p = _tinygguf.write(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(InputError) as err:
        ModelConfig.from_gguf(open_gguf(p))
    assert_one_line_error(err.value, p, "'llama'", "diffusion-gemma")
    assert err.value.exit_code == 2

    p = _tinygguf.write(tmp_path / "nokey.gguf", drop=("embedding_length",))
    with pytest.raises(InputError) as err:
        ModelConfig.from_gguf(open_gguf(p))
    assert_one_line_error(err.value, p, "diffusion-gemma.embedding_length", "missing")

    p = _tinygguf.write(tmp_path / "nocanvas.gguf", canvas=None)
    with pytest.raises(InputError) as err:
        ModelConfig.from_gguf(open_gguf(p))
    assert_one_line_error(err.value, p, "diffusion.canvas_length")

    p = _tinygguf.write(tmp_path / "badeb.gguf", eb={"diffusion.eb_t_min": ("add_string", "low")})
    with pytest.raises(InputError) as err:
        ModelConfig.from_gguf(open_gguf(p))
    assert_one_line_error(err.value, p, "diffusion.eb_t_min", "'low'")


# -- broken files -----------------------------------------------------------------------------

def _patch(path, at: int, data: bytes):
    b = bytearray(path.read_bytes())
    b[at:at + len(data)] = data
    path.write_bytes(bytes(b))


def _type_field(path, name: str) -> int:
    """Byte offset of the ggml type id in `name`'s tensor info (after its name, n_dims, dims)."""
    b = path.read_bytes()
    at = b.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    n_dims = struct.unpack_from("<I", b, at)[0]
    return at + 4 + 8 * n_dims


def broken_files(tmp_path):
    """(kind, path, words the message must contain) for every kind of damage open_gguf reports."""
    good = _tinygguf.write(tmp_path / "good.gguf").read_bytes()
    out = []

    def case(kind, data, *words):
        p = tmp_path / f"{kind}.gguf"
        p.write_bytes(data)
        out.append((kind, p, words))
        return p

    case("text", b"this is a README, not a model\n" * 4, "not a GGUF file")
    case("tiny", b"GGUF\x03\x00", "too small")
    case("header_cut", good[:300], "truncated")
    case("data_cut", good[:-200], "past the end of the file")
    p = case("version", good, "unsupported GGUF version 7")
    _patch(p, 4, struct.pack("<I", 7))
    p = case("type_id", good, "unknown ggml type id 99", "output_norm.weight")
    _patch(p, _type_field(p, "output_norm.weight"), struct.pack("<I", 99))
    # the first key's value type (after magic, version, counts and the key string)
    key_len = struct.unpack_from("<Q", good, 24)[0]
    p = case("value_type", good, "corrupt GGUF header")
    _patch(p, 32 + key_len, struct.pack("<I", 77))
    return out


def test_broken_files_raise_one_line_input_errors(tmp_path):
    cases = broken_files(tmp_path)
    assert len(cases) == 7
    for kind, path, words in cases:
        with pytest.raises(InputError) as err:
            open_gguf(path)
        assert_one_line_error(err.value, path, *words)


def test_missing_paths_and_tensors(tmp_path, tiny):
    with pytest.raises(InputError) as err:
        open_gguf(tmp_path / "nope.gguf")
    assert_one_line_error(err.value, tmp_path / "nope.gguf", "no such file")
    with pytest.raises(InputError) as err:
        open_gguf(tmp_path)
    assert_one_line_error(err.value, tmp_path, "directory")
    f = open_gguf(tiny)
    assert "blk.9.attn_q.weight" not in f
    for get in (f.info, f.tensor):
        with pytest.raises(InputError) as err:
            get("blk.9.attn_q.weight")
        assert_one_line_error(err.value, tiny, "'blk.9.attn_q.weight'", "missing")


def write_unsupported(path):
    """A file with one IQ2_XXS tensor: gguf knows the type, diffcli has no dequantiser for it."""
    w = GGUFWriter(str(path), "diffusion-gemma")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((2, 66), dtype=np.uint8),
                 raw_dtype=GGMLQuantizationType.IQ2_XXS)
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_tensor_type_is_reported_with_file_and_tensor(tmp_path):
    path = write_unsupported(tmp_path / "iq2.gguf")
    f = open_gguf(path)                          # the file itself is fine: inspect can list it
    info = f.info("blk.0.attn_q.weight")
    assert info.qtype == "IQ2_XXS" and info.shape == (2, 256)
    with pytest.raises(InputError) as err:
        quants.require_supported(info.qtype, tensor=info.name, path=f.path)
    assert_one_line_error(err.value, path, "'blk.0.attn_q.weight'", "IQ2_XXS", "Q4_K_M")
    with pytest.raises(InputError, match="IQ2_XXS"):
        f.tensor("blk.0.attn_q.weight").dequantize()


def test_tensors_are_zero_copy_views_with_torch_shapes(tiny):
    f = open_gguf(tiny)
    qt = f.tensor("blk.0.ffn_gate_up_exps.weight")
    assert qt.shape == (DIMS["n_expert"], 2 * DIMS["n_ff_exp"], DIMS["n_embd"])
    assert qt.raw.dtype == torch.uint8 and qt.nbytes == f.info(qt.name).nbytes
    ref = GGUFReader(str(tiny)).get_tensor(4)
    assert ref.name == qt.name
    from gguf.quants import dequantize
    want = dequantize(np.asarray(ref.data), ref.tensor_type).reshape(qt.shape)
    assert np.array_equal(qt.dequantize().numpy(), want)
    assert np.array_equal(qt[1].dequantize().numpy(), want[1])
