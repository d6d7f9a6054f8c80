"""diffcli's GGUF parser and ModelConfig: against gguf-py's reader on the real file, on a small
diffusion-gemma file written with GGUFWriter, and on broken files (one-line InputError)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from diffcli.gguf import quants
from diffcli.model.config import EB_DEFAULTS, ModelConfig
from diffcli.errors import InputError
from diffcli.gguf import reader
from diffcli.gguf.reader import open_gguf

import _tinygguf
from _tinygguf import (ARCH_KEYS, DIMS, EB_KEYS, HEAD_KV, PATTERN, broken_files,
                       write_unsupported)


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


def test_custom_alignment_matches_gguf_reader(tmp_path):
    path = _tinygguf.write(tmp_path / "a64.gguf", alignment=64)
    f = compare_with_reader(path)
    assert f.data_offset % 64 == 0 and all(f.info(n).offset % 64 == 0 for n in f.tensor_names)


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

def test_broken_files_raise_one_line_input_errors(tmp_path):
    cases = broken_files(tmp_path)
    assert len(cases) == 8
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_WILLNEED) as Linux takes it")
def test_prefetch_asks_the_os_unless_the_file_would_not_fit(tiny, monkeypatch):
    f = open_gguf(tiny)
    before = f.tensor(f.tensor_names[0]).raw.clone()
    assert f.prefetch()                               # the kernel took the advice
    assert torch.equal(f.tensor(f.tensor_names[0]).raw, before)
    monkeypatch.setattr(reader, "available_ram", lambda: f.file_size // 2)
    assert not f.prefetch()                           # a file larger than the memory: no read-ahead


def test_available_ram_is_a_plausible_byte_count():
    got = reader.available_ram()
    assert got is None or 0 < got < 1 << 50
