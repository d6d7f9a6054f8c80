"""`diffcli convert --mmproj` against the layout llama.cpp writes for Gemma 4 vision.

What llama.cpp's converter does for a Gemma 4 mmproj (read from its source: conversion/gemma.py,
the Gemma 4 vision/audio mmproj class, and conversion/base.py's mmproj base class; nothing copied):
it renames `model.vision_tower.encoder.` to `vision_model.model.`, drops `.linear` from the
clipped linears' weights, adds `.weight` to the position table, then maps names through
gguf-py's tensor table (`TensorNameMap` for MODEL_ARCH.MMPROJ, shipped in the `gguf` package,
used here as the oracle); the patch projection becomes a [H, 3, p, p] kernel; the keys are the
mmproj base class's `clip.vision.*` set plus `clip.vision.projector_type = gemma4v`; types: the
position table F32, the patch kernel F16 only in f16 files (else F32), 1-D tensors F32, other
matrices in the output type. DiffusionGemma holds the same tower under `model.encoder.`.
The file is read back with gguf-py's own `GGUFReader`.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from diffcli.errors import InputError
from diffcli.gguf import mmproj as fmt

SUFFIXES = (".weight", ".bias", ".input_max", ".input_min", ".output_max", ".output_min")
CLIPPED = dict(num_hidden_layers=2, standardize=True, use_clipped_linears=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from diffcli.testing import build_tiny_hf_model, save_tiny_checkpoint
    hf = build_tiny_hf_model(vision=CLIPPED)
    d = save_tiny_checkpoint(hf, tmp_path_factory.mktemp("hf"))
    return d, {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}, hf.config


def llama_cpp_name(hf_name: str, n_blocks: int) -> str:
    """The GGUF name llama.cpp's Gemma 4 mmproj conversion gives an HF tensor (see above)."""
    name = hf_name.replace("model.encoder.", "model.", 1)           # Gemma 4's nesting
    name = name.replace("model.vision_tower.encoder.", "vision_model.model.")
    name = name.replace(".linear.weight", ".weight")
    if name.endswith("position_embedding_table"):
        name += ".weight"
    mapped = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_blocks).get_name(name, try_suffixes=SUFFIXES)
    assert mapped is not None, f"gguf-py has no mmproj name for {name}"
    return mapped


def llama_cpp_type(gguf_name: str, n_dims: int, outtype: str) -> str:
    if gguf_name == "v.position_embd.weight":
        return "F32"
    if gguf_name == "v.patch_embd.weight":
        return "F16" if outtype == "f16" else "F32"
    if n_dims <= 1 or outtype == "f32":
        return "F32"
    return {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]


def fields(reader):
    return {f.name: f for f in reader.fields.values() if not f.name.startswith("GGUF.")}


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_tensors_and_keys_are_llama_cpps(checkpoint, tmp_path, outtype):
    hf_dir, state, cfg = checkpoint
    path = fmt.convert_mmproj(hf_dir, tmp_path / f"mmproj-{outtype}.gguf", outtype)
    r = gguf.GGUFReader(path)
    vision_hf = [k for k in state if k.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision."))]
    want_names = {llama_cpp_name(k, cfg.vision_config.num_hidden_layers): k for k in vision_hf}
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == set(want_names)           # every tower tensor, nothing else
    p = cfg.vision_config.patch_size
    for gname, t in tensors.items():
        ref = state[want_names[gname]]
        if gname == "v.patch_embd.weight":           # [H, p*p*3] (row, col, channel) -> [H, 3, p, p]
            ref = ref.reshape(ref.shape[0], p, p, 3).transpose(0, 3, 1, 2)
        ref = ref.reshape(-1) if ref.ndim == 0 else ref
        assert tuple(int(d) for d in t.shape) == tuple(reversed(ref.shape)), gname
        assert t.tensor_type.name == llama_cpp_type(gname, ref.ndim, outtype), gname
        if outtype == "q8_0" and t.tensor_type.name == "Q8_0":
            assert np.array_equal(np.asarray(t.data).reshape(-1),
                                  gguf.quants.quantize(ref.astype(np.float32), t.tensor_type).reshape(-1))
        else:
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
            tol = {"F32": 0, "F16": 1e-3, "BF16": 1e-2}[t.tensor_type.name]
            np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * 1e-2)
    f = fields(r)
    V = gguf.Keys.ClipVision
    vc = cfg.vision_config
    want = {   # key: (gguf value type, value)
        "general.architecture": (gguf.GGUFValueType.STRING, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]),
        "general.type": (gguf.GGUFValueType.STRING, gguf.GGUFType.MMPROJ),
        "general.file_type": (gguf.GGUFValueType.UINT32, {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[outtype]),
        gguf.Keys.Clip.HAS_VISION_ENCODER: (gguf.GGUFValueType.BOOL, True),
        V.PROJECTOR_TYPE: (gguf.GGUFValueType.STRING, gguf.VisionProjectorType.GEMMA4V),
        V.PROJECTION_DIM: (gguf.GGUFValueType.UINT32, cfg.text_config.hidden_size),
        V.IMAGE_SIZE: (gguf.GGUFValueType.UINT32, 224),
        V.PATCH_SIZE: (gguf.GGUFValueType.UINT32, vc.patch_size),
        V.EMBEDDING_LENGTH: (gguf.GGUFValueType.UINT32, vc.hidden_size),
        V.FEED_FORWARD_LENGTH: (gguf.GGUFValueType.UINT32, vc.intermediate_size),
        V.BLOCK_COUNT: (gguf.GGUFValueType.UINT32, vc.num_hidden_layers),
        V.Attention.HEAD_COUNT: (gguf.GGUFValueType.UINT32, vc.num_attention_heads),
        V.Attention.LAYERNORM_EPS: (gguf.GGUFValueType.FLOAT32, pytest.approx(1e-6)),
        V.IMAGE_MEAN: (gguf.GGUFValueType.ARRAY, [0.0, 0.0, 0.0]),
        V.IMAGE_STD: (gguf.GGUFValueType.ARRAY, [1.0, 1.0, 1.0]),
    }
    for key, (vtype, value) in want.items():
        assert key in f, key
        assert f[key].types[0] == vtype, key
        assert f[key].contents() == value, key
    assert f[V.IMAGE_MEAN].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32]
    # beyond llama.cpp's keys: only the general ones every converter writes
    assert set(f) - set(want) <= {"general.name", "general.quantization_version"}


def test_the_plain_tower_has_no_clip_or_std_tensors(tmp_path):
    from diffcli.testing import build_tiny_hf_model, save_tiny_checkpoint
    save_tiny_checkpoint(build_tiny_hf_model(), tmp_path / "hf")
    r = gguf.GGUFReader(fmt.convert_mmproj(tmp_path / "hf", tmp_path / "mm.gguf", "bf16"))
    names = {t.name for t in r.tensors}
    assert "v.std_bias" not in names and not any(n.endswith("input_min") for n in names)
    assert len(names) == 2 + 13 + 1


def test_unfit_vision_configs_are_refused(tmp_path):
    """Values the format cannot carry (llama.cpp's loader assumes Gemma 4's) are not written."""
    from diffcli.testing import build_tiny_hf_model, save_tiny_checkpoint
    save_tiny_checkpoint(build_tiny_hf_model(vision=dict(pooling_kernel_size=2)), tmp_path / "hf")
    with pytest.raises(InputError, match="pooling_kernel_size is 2"):
        fmt.convert_mmproj(tmp_path / "hf", tmp_path / "mm.gguf")
    assert not (tmp_path / "mm.gguf").exists()
    cfg = {"model_type": "diffusion_gemma", "text_config": {"hidden_size": 64}}
    with pytest.raises(InputError, match="no vision tower"):
        fmt.VisionHParams.from_hf(cfg)
    cfg["vision_config"] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                rope_parameters={"rope_type": "axial", "rope_theta": 50.0})
    with pytest.raises(InputError, match="rope_theta is 50.0"):
        fmt.VisionHParams.from_hf(cfg)


def test_refusals_leave_nothing_behind(checkpoint, tmp_path):
    hf_dir, _, _ = checkpoint
    out = tmp_path / "mm.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(InputError, match="already exists"):
        fmt.convert_mmproj(hf_dir, out)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(InputError, match="cannot be written as 'q4_k_m'"):
        fmt.convert_mmproj(hf_dir, tmp_path / "other.gguf", "q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mm.gguf"]


def test_cli_convert_mmproj(checkpoint, tmp_path):
    from _cli_fixtures import run
    hf_dir, _, _ = checkpoint
    out = tmp_path / "mmproj.gguf"
    res = run(["convert", hf_dir, "--mmproj", "-o", out, "--outtype", "q8_0"])
    assert res.exit_code == 0, res.stderr
    assert "wrote mmproj" in res.stderr and out.exists()
    assert fields(gguf.GGUFReader(out))["general.file_type"].contents() == 7
    bad = run(["convert", hf_dir, "--mmproj", "-o", tmp_path / "x.gguf", "--outtype", "q4_k_m"])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "error:" in bad.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_a_file_written_the_llama_cpp_way_loads_and_matches_transformers(checkpoint, tmp_path):
    """Interop the other way: an mmproj written straight with gguf-py from the names and rules
    above (not through diffcli's writer) runs in diffcli and gives transformers' soft tokens."""
    from PIL import Image
    from diffcli.media.image import prepare_image
    from diffcli.model.vision import load_vision
    from diffcli.testing import build_tiny_hf_model
    hf_dir, state, cfg = checkpoint
    vc, p = cfg.vision_config, cfg.vision_config.patch_size
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_vision_projector_type(gguf.VisionProjectorType.GEMMA4V)
    w.add_vision_projection_dim(cfg.text_config.hidden_size)
    w.add_vision_image_size(224)
    w.add_vision_patch_size(p)
    w.add_vision_embedding_length(vc.hidden_size)
    w.add_vision_feed_forward_length(vc.intermediate_size)
    w.add_vision_block_count(vc.num_hidden_layers)
    w.add_vision_head_count(vc.num_attention_heads)
    w.add_vision_attention_layernorm_eps(1e-6)
    w.add_vision_image_mean([0.0, 0.0, 0.0])
    w.add_vision_image_std([1.0, 1.0, 1.0])
    for k, v in reversed(list(state.items())):       # another tensor order than diffcli's
        if not k.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision.")):
            continue
        if k.endswith("patch_embedder.input_proj.weight"):
            v = v.reshape(v.shape[0], p, p, 3).transpose(0, 3, 1, 2)
        w.add_tensor(llama_cpp_name(k, vc.num_hidden_layers), np.ascontiguousarray(v.reshape(-1) if v.ndim == 0 else v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tower = load_vision(tmp_path / "llama.gguf", dtype=torch.float32)
    img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (70, 50, 3), dtype=np.uint8))
    prep = prepare_image(img, p, max_soft_tokens=70)
    got = tower.embed(torch.from_numpy(prep.pixels), prep.grid)
    hf = build_tiny_hf_model(vision=CLIPPED)
    pv = torch.zeros(1, 630, p * p * 3)
    pos = torch.full((1, 630, 2), -1, dtype=torch.long)
    pv[0, :len(prep.pixels)] = torch.from_numpy(prep.pixels)
    pos[0, :len(prep.pixels)] = torch.from_numpy(prep.positions)
    with torch.no_grad():
        ref = hf.model.encoder.get_image_features(pv, pos).pooler_output
    assert (got - ref).abs().max().item() < 1e-4
