"""A small diffusion-gemma GGUF written with gguf-py's GGUFWriter (every spec §A.2 key, a few
real-named tensors: tied embedding, rope_freqs, attention, experts), and broken variants of it."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

ARCH = "diffusion-gemma"
N_LAYER = 6
PATTERN = [True, True, True, False, True, False]       # True = sliding
HEAD_KV = [4, 4, 4, 2, 4, 2]
DIMS = dict(n_embd=64, n_ff=96, n_head=4, head_dim=32, head_dim_swa=16, n_expert=4,
            n_expert_used=2, n_ff_exp=32, vocab=128, n_rot=4)

# key suffix -> (writer method, value); the values deliberately differ from the real model's
# and from ModelConfig's defaults, so a key that is read wrongly (or not at all) shows
ARCH_KEYS = {
    "block_count": ("add_uint32", N_LAYER),
    "context_length": ("add_uint32", 8192),
    "embedding_length": ("add_uint32", DIMS["n_embd"]),
    "feed_forward_length": ("add_uint32", DIMS["n_ff"]),
    "attention.head_count": ("add_uint32", DIMS["n_head"]),
    "attention.head_count_kv": ("array_i32", HEAD_KV),
    "rope.freq_base": ("add_float32", 500_000.0),
    "rope.freq_base_swa": ("add_float32", 5_000.0),
    "attention.layer_norm_rms_epsilon": ("add_float32", 1e-5),
    "expert_count": ("add_uint32", DIMS["n_expert"]),
    "expert_used_count": ("add_uint32", DIMS["n_expert_used"]),
    "attention.key_length": ("add_uint32", DIMS["head_dim"]),
    "attention.value_length": ("add_uint32", DIMS["head_dim"]),
    "final_logit_softcapping": ("add_float32", 25.0),
    "attention.sliding_window": ("add_uint32", 48),
    "attention.shared_kv_layers": ("add_uint32", 0),
    "embedding_length_per_layer_input": ("add_uint32", 0),
    "attention.sliding_window_pattern": ("array_bool", PATTERN),
    "attention.key_length_swa": ("add_uint32", DIMS["head_dim_swa"]),
    "attention.value_length_swa": ("add_uint32", DIMS["head_dim_swa"]),
    "expert_feed_forward_length": ("add_uint32", DIMS["n_ff_exp"]),
    "rope.dimension_count": ("add_uint32", DIMS["head_dim"]),
    "rope.dimension_count_swa": ("add_uint32", DIMS["head_dim_swa"]),
    "attention.causal": ("add_bool", False),
}
EB_KEYS = {   # spec §A.2 names and types (counts u32, the rest f32)
    "diffusion.eb_max_steps": ("add_uint32", 20),
    "diffusion.eb_t_min": ("add_float32", 0.25),
    "diffusion.eb_t_max": ("add_float32", 0.75),
    "diffusion.eb_entropy_bound": ("add_float32", 0.5),
    "diffusion.eb_stability_threshold": ("add_uint32", 3),
    "diffusion.eb_confidence_threshold": ("add_float32", 0.125),
}
CANVAS = 16


def _q8(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return quantize(rng.standard_normal(shape).astype(np.float32), GGMLQuantizationType.Q8_0)


def write(path: Path, *, arch: str = ARCH, eb: dict | None = None, drop: tuple[str, ...] = (),
          canvas: int | None = CANVAS, extra: dict | None = None, alignment: int | None = None,
          seed: int = 0) -> Path:
    """Write the file; `drop` removes arch-key suffixes, `eb` adds sampler keys (name -> value,
    written with EB_KEYS' type unless given as (method, value)), `extra` adds metadata."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)      # writes general.alignment and pads to it
    for suffix, (method, value) in ARCH_KEYS.items():
        if suffix in drop:
            continue
        key = f"{arch}.{suffix}"
        if method == "array_i32":
            w.add_array(key, [int(v) for v in value])   # int -> i32 array
        elif method == "array_bool":
            w.add_array(key, [bool(v) for v in value])
        else:
            getattr(w, method)(key, value)
    if canvas is not None:
        w.add_uint32("diffusion.canvas_length", canvas)
    for key, value in (eb or {}).items():
        method, value = value if isinstance(value, tuple) else (EB_KEYS[key][0], value)
        getattr(w, method)(key, value)
    for key, (method, value) in (extra or {}).items():
        getattr(w, method)(key, value)
    H, V, E, F = DIMS["n_embd"], DIMS["vocab"], DIMS["n_expert"], DIMS["n_ff_exp"]
    freqs = np.full(DIMS["head_dim"] // 2, 1e30, dtype=np.float32)
    freqs[:DIMS["n_rot"]] = 1.0
    w.add_tensor("token_embd.weight", _q8((V, H), rng), raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("rope_freqs.weight", freqs)
    w.add_tensor("output_norm.weight", rng.standard_normal(H).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", _q8((DIMS["n_head"] * DIMS["head_dim_swa"], H), rng),
                 raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_gate_up_exps.weight", _q8((E, 2 * F, H), rng),
                 raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.1.attn_q.weight", _q8((DIMS["n_head"] * DIMS["head_dim_swa"], H), rng),
                 raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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
    good = write(tmp_path / "good.gguf").read_bytes()
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
    aligned = write(tmp_path / "aligned.gguf", alignment=64)
    p = case("alignment", aligned.read_bytes(), "general.alignment is 48")
    at = p.read_bytes().index(b"general.alignment") + len("general.alignment") + 4
    _patch(p, at, struct.pack("<I", 48))
    return out


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
