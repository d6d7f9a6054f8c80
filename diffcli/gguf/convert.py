"""Hugging Face DiffusionGemma checkpoint -> GGUF in the llama.cpp PR #24423 layout (spec §A).

`convert(hf_dir, out_path, outtype)` reads `config.json`, `generation_config.json`, the safetensors
shards and the tokenizer files, and streams one tensor at a time into a temporary file that is
renamed into place when complete. The layout it writes is the one the real files have: the A.5 name
table below, the A.2/A.3 keys, a generated `rope_freqs.weight`, no `output.weight` (the LM head is
the embedding), the fused expert gate/up kept fused, the vision tower dropped. Nothing is transposed:
an HF `[out, in]` weight is byte-identical to a GGUF `[in, out]` tensor.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import InputError
from .convert_vocab import Vocab, read_hf_tokenizer
from .quantize import BLOCK, can_quantize, quantize

ARCH = "diffusion-gemma"
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")

# GGUF tensor -> HF parameter (spec §A.5). `{i}` is the layer index. Encoder and decoder share every
# weight; only the per-layer scalar exists twice, and both are kept.
TENSOR_NAMES: dict[str, str] = {
    "token_embd.weight": "model.decoder.embed_tokens.weight",
    "output_norm.weight": "model.decoder.norm.weight",
    "self_cond_pre_norm.weight": "model.decoder.self_conditioning.pre_norm.weight",
    "self_cond_gate.weight": "model.decoder.self_conditioning.gate_proj.weight",
    "self_cond_up.weight": "model.decoder.self_conditioning.up_proj.weight",
    "self_cond_down.weight": "model.decoder.self_conditioning.down_proj.weight",
    "blk.{i}.attn_norm.weight": "model.decoder.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.decoder.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.decoder.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.decoder.layers.{i}.self_attn.v_proj.weight",   # sliding layers only
    "blk.{i}.attn_output.weight": "model.decoder.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.decoder.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.decoder.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "model.decoder.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.decoder.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.decoder.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.decoder.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.decoder.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.post_ffw_norm_1.weight": "model.decoder.layers.{i}.post_feedforward_layernorm_1.weight",
    "blk.{i}.pre_ffw_norm_2.weight": "model.decoder.layers.{i}.pre_feedforward_layernorm_2.weight",
    "blk.{i}.ffn_gate_inp.weight": "model.decoder.layers.{i}.router.proj.weight",
    "blk.{i}.ffn_gate_inp.scale": "model.decoder.layers.{i}.router.scale",
    "blk.{i}.ffn_gate_up_exps.weight": "model.decoder.layers.{i}.experts.gate_up_proj",
    "blk.{i}.ffn_down_exps.weight": "model.decoder.layers.{i}.experts.down_proj",
    "blk.{i}.ffn_down_exps.scale": "model.decoder.layers.{i}.router.per_expert_scale",
    "blk.{i}.post_ffw_norm_2.weight": "model.decoder.layers.{i}.post_feedforward_layernorm_2.weight",
    "blk.{i}.post_ffw_norm.weight": "model.decoder.layers.{i}.post_feedforward_layernorm.weight",
    "blk.{i}.layer_output_scale.weight": "model.decoder.layers.{i}.layer_scalar",
    "blk.{i}.enc_layer_output_scale.weight": "model.encoder.language_model.layers.{i}.layer_scalar",
}
ROPE_FREQS = "rope_freqs.weight"   # generated, not read

# HF tensors that are deliberately not written: the tied LM head, the vision tower and its projector,
# and the encoder's copies (the encoder owns nothing but its layer scalars).
_DROPPED = re.compile(r"^(lm_head\.|model\.encoder\.|model\.embed_vision|model\.vision|.*vision_tower)")

# Tensors kept F32 in every file: the router, as llama.cpp does (its logits decide the top-k).
_KEEP_F32 = re.compile(r"ffn_gate_inp\.weight$")

FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15, "bf16": 32}   # gguf.LlamaFileType


@dataclass
class HParams:
    """The text-model hyperparameters the GGUF needs, from an HF `config.json` (spec §A.2)."""
    n_layer: int
    hidden: int
    ff: int
    n_head: int
    kv_sliding: int
    kv_full: int
    head_dim: int            # sliding layers
    head_dim_full: int       # global layers
    layer_types: list[str]   # "sliding_attention" | "full_attention"
    sliding_window: int
    n_expert: int
    n_expert_used: int
    ff_exp: int
    vocab_size: int
    rms_eps: float = 1e-6
    context_length: int = 262_144
    rope_theta: float = 1_000_000.0
    rope_theta_swa: float = 10_000.0
    partial_rotary: float = 0.25
    softcap: float = 30.0
    canvas_length: int = 256
    sampler: dict[str, float] = field(default_factory=dict)   # diffusion.eb_* keys present

    @property
    def sliding(self) -> list[bool]:
        return [t == "sliding_attention" for t in self.layer_types]

    @property
    def n_rot(self) -> int:
        """Rotated frequency pairs of the proportional RoPE (64 of 256 on the real model)."""
        return int(self.head_dim_full * self.partial_rotary // 2)

    @classmethod
    def from_hf(cls, cfg: dict, generation: dict | None = None) -> "HParams":
        text = cfg.get("text_config", cfg)
        n_layer = int(text["num_hidden_layers"])
        types = list(text.get("layer_types") or
                     ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layer)])
        types[-1] = "full_attention"   # transformers forces this too
        # Global layers' head dim and KV heads: transformers 5.23 saves them as per-layer overrides;
        # a config written by hand may carry the constructor kwargs instead.
        # transformers leaves out an override equal to the base value.
        head_dim = int(text.get("head_dim", 256))
        if "per_layer_config" in text:
            per_layer = {int(k): v for k, v in (text["per_layer_config"] or {}).items()}
            over = per_layer.get(types.index("full_attention"), {})
            head_dim_full = int(over.get("head_dim", head_dim))
            kv_full = int(over.get("num_key_value_heads", text["num_key_value_heads"]))
        else:
            head_dim_full = int(text.get("global_head_dim", 512))
            kv_full = int(text.get("num_global_key_value_heads") or text["num_key_value_heads"])
        rope = text.get("rope_parameters") or {}
        rope_full, rope_swa = rope.get("full_attention", {}), rope.get("sliding_attention", {})
        return cls(
            n_layer=n_layer, hidden=int(text["hidden_size"]), ff=int(text["intermediate_size"]),
            n_head=int(text["num_attention_heads"]), kv_sliding=int(text["num_key_value_heads"]),
            kv_full=kv_full, head_dim=head_dim, head_dim_full=head_dim_full,
            layer_types=types, sliding_window=int(text["sliding_window"]),
            n_expert=int(text["num_experts"]), n_expert_used=int(text["top_k_experts"]),
            ff_exp=int(text["moe_intermediate_size"]), vocab_size=int(text["vocab_size"]),
            rms_eps=float(text.get("rms_norm_eps", 1e-6)),
            context_length=int(text.get("max_position_embeddings", 262_144)),
            rope_theta=float(rope_full.get("rope_theta", 1_000_000.0)),
            rope_theta_swa=float(rope_swa.get("rope_theta", 10_000.0)),
            partial_rotary=float(rope_full.get("partial_rotary_factor", 0.25)),
            softcap=float(text.get("final_logit_softcapping") or 30.0),
            canvas_length=int(cfg.get("canvas_length") or 256),
            sampler=sampler_keys(generation or {}),
        )


def sampler_keys(gen: dict) -> dict[str, float]:
    """generation_config.json -> the `diffusion.eb_*` keys the PR writes (only those that are set)."""
    sc = gen.get("sampler_config") or {}
    src = {
        "diffusion.eb_max_steps": gen.get("max_denoising_steps"),
        "diffusion.eb_t_min": gen.get("t_min"),
        "diffusion.eb_t_max": gen.get("t_max"),
        "diffusion.eb_entropy_bound": sc.get("entropy_bound") if isinstance(sc, dict) else None,
        "diffusion.eb_stability_threshold": gen.get("stability_threshold"),
        "diffusion.eb_confidence_threshold": gen.get("confidence_threshold"),
    }
    return {k: v for k, v in src.items() if v is not None}


def tensor_plan(hp: HParams) -> list[tuple[str, str | None]]:
    """(GGUF name, HF name) in writing order; HF name None for the generated `rope_freqs`."""
    plan: list[tuple[str, str | None]] = []
    for gguf_name, hf_name in TENSOR_NAMES.items():
        if "{i}" not in gguf_name:
            plan.append((gguf_name, hf_name))
    plan.append((ROPE_FREQS, None))
    for i, sliding in enumerate(hp.sliding):
        for gguf_name, hf_name in TENSOR_NAMES.items():
            if "{i}" not in gguf_name or (gguf_name.endswith("attn_v.weight") and not sliding):
                continue
            plan.append((gguf_name.format(i=i), hf_name.format(i=i)))
    return plan


def hf_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> torch shape implied by the config (what transformers 5.23 allocates)."""
    H, F, E, Fe, V = hp.hidden, hp.ff, hp.n_expert, hp.ff_exp, hp.vocab_size
    out: dict[str, tuple[int, ...]] = {}
    for gguf_name, hf_name in tensor_plan(hp):
        if hf_name is None:
            continue
        layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1
        hd = hp.head_dim if layer >= 0 and hp.sliding[layer] else hp.head_dim_full
        kv = hp.kv_sliding if layer >= 0 and hp.sliding[layer] else hp.kv_full
        kind = gguf_name.split(".", 2)[-1] if layer >= 0 else gguf_name
        out[hf_name] = {
            "token_embd.weight": (V, H), "self_cond_gate.weight": (F, H), "self_cond_up.weight": (F, H),
            "self_cond_down.weight": (H, F),
            "attn_q.weight": (hp.n_head * hd, H), "attn_k.weight": (kv * hd, H),
            "attn_v.weight": (kv * hd, H), "attn_output.weight": (H, hp.n_head * hd),
            "attn_q_norm.weight": (hd,), "attn_k_norm.weight": (hd,),
            "ffn_gate.weight": (F, H), "ffn_up.weight": (F, H), "ffn_down.weight": (H, F),
            "ffn_gate_inp.weight": (E, H), "ffn_gate_up_exps.weight": (E, 2 * Fe, H),
            "ffn_down_exps.weight": (E, H, Fe), "ffn_down_exps.scale": (E,),
            "layer_output_scale.weight": (1,), "enc_layer_output_scale.weight": (1,),
        }.get(kind, (H,))   # every other tensor is a norm weight or the router scale, [H]
    return out


def rope_freqs(hp: HParams) -> np.ndarray:
    """Frequency divisors of the global layers: 1 keeps a pair rotating, 1e30 freezes it (spec §A.5)."""
    half = hp.head_dim_full // 2
    return np.array([1.0] * hp.n_rot + [1e30] * (half - hp.n_rot), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Tensor types per outtype (spec §A.4)

def _more_bits(i: int, n: int) -> bool:
    """llama-quantize's "use more bits" layers: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_types(plan: list[tuple[str, tuple[int, ...]]], outtype: str, n_layer: int) -> dict[str, str]:
    """GGUF tensor name -> ggml type name, from (name, torch shape) in writing order."""
    out: dict[str, str] = {}
    n_attn_v = sum(name.endswith("attn_v.weight") for name, _ in plan)
    i_attn_v = 0
    for name, shape in plan:
        row = shape[-1]
        if outtype == "f32" or len(shape) == 1 or _KEEP_F32.search(name):
            out[name] = "F32"
            continue
        if outtype in ("f16", "bf16"):
            out[name] = outtype.upper()
            continue
        if outtype == "q8_0":
            out[name] = "Q8_0" if can_quantize("Q8_0", row) else "F16"
            continue
        # q4_k_m: Q4_K by default; the embedding (= LM head) Q6_K; attn_v and ffn_down get more bits
        # on the _more_bits layers. K-quants need rows of 256, else Q4_K -> Q5_0, Q6_K -> Q8_0.
        qtype = "Q4_K"
        if name == "token_embd.weight":
            qtype = "Q6_K"
        elif name.endswith("attn_v.weight"):
            qtype = "Q6_K" if _more_bits(i_attn_v, n_attn_v) else "Q4_K"
            i_attn_v += 1
        elif ".ffn_down" in name:
            layer = int(name.split(".")[1])
            qtype = "Q6_K" if _more_bits(layer, n_layer) else "Q4_K"
        if not can_quantize(qtype, row):
            qtype = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[qtype]
        out[name] = qtype if can_quantize(qtype, row) else "F16"
    return out


# ---------------------------------------------------------------------------------------------
# Writing

def size_label(n_expert: int, total: int, expert_elems: int) -> str:
    """`128x2.6B` style label: experts x (shared + one expert's) parameters, as llama.cpp writes it."""
    n = total - expert_elems + expert_elems // max(n_expert, 1) if n_expert else total
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            text = f"{v:.1f}" if v < 10 else f"{v:.0f}"
            break
    else:
        unit, text = "", str(n)
    return f"{n_expert}x{text}{unit}" if n_expert else f"{text}{unit}"


def write_gguf(out_path: str | os.PathLike, hp: HParams, get_tensor: Callable[[str], np.ndarray],
               vocab: Vocab | None, outtype: str = "f32", *, name: str = "DiffusionGemma",
               overwrite: bool = False) -> Path:
    """Write a diffusion-gemma GGUF. `get_tensor(hf_name)` returns a float array of the HF (torch)
    shape that `hf_shapes(hp)` gives; tensors are read one at a time, in writing order."""
    import gguf

    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise InputError(f"unknown output type {outtype!r}", fix=f"use one of {', '.join(OUTTYPES)}")
    out_path = check_output_path(out_path, overwrite)

    plan = tensor_plan(hp)
    shapes = hf_shapes(hp)
    gshapes = [(g, (hp.head_dim_full // 2,) if h is None else tuple(shapes[h])) for g, h in plan]
    types = tensor_types(gshapes, outtype, hp.n_layer)

    w = gguf.GGUFWriter(path=None, arch=ARCH)
    _add_keys(w, hp, vocab, outtype, name, gshapes)

    def tensors():
        for (gname, hf_name), (_, shape) in zip(plan, gshapes):
            data = rope_freqs(hp) if hf_name is None else np.asarray(get_tensor(hf_name), np.float32)
            if tuple(data.shape) != shape:
                raise InputError(f"tensor {hf_name!r} has shape {list(data.shape)} but config.json "
                                 f"implies {list(shape)}", fix="config.json does not belong to these weights")
            yield data

    write_tensors(w, out_path, [(g, shape, types[g]) for g, shape in gshapes], tensors())
    return out_path


def check_output_path(out_path: str | os.PathLike, overwrite: bool) -> Path:
    """The output path, refused before any work if it cannot be written without losing a file."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise InputError("output path is a directory", path=out_path, fix="pass a file name ending in .gguf")
    if out_path.exists() and not overwrite:
        raise InputError("output file already exists", path=out_path,
                         fix="pass --force to overwrite it, or choose another -o path")
    if not out_path.parent.is_dir():
        raise InputError("output directory does not exist", path=out_path.parent,
                         fix="create it first, or choose another -o path")
    return out_path


def write_tensors(w, out_path: Path, specs: list[tuple[str, tuple[int, ...], str]],
                  data: Iterable[np.ndarray]) -> None:
    """Write a GGUFWriter `w` (keys already added) with the tensors `specs` = (name, torch shape,
    ggml type), whose float32 values `data` yields one at a time in the same order, into a
    temporary file renamed onto `out_path` once complete (nothing is left behind on failure)."""
    import gguf

    for gname, shape, qtype in specs:
        if qtype in ("F32", "F16"):
            dt = np.float32 if qtype == "F32" else np.float16
            w.add_tensor_info(gname, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
        else:
            per, nbytes = BLOCK[qtype]
            byte_shape = (*shape[:-1], shape[-1] // per * nbytes)
            w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              raw_dtype=gguf.GGMLQuantizationType[qtype])
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".part", dir=out_path.parent)
    os.close(fd)
    try:
        w.write_header_to_file(path=Path(tmp))
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for (_, _, qtype), values in zip(specs, data):
            w.write_tensor_data(quantize(values, qtype))
        w.close()
        # mkstemp makes the file private (0600); give it the mode a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out_path)
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _add_keys(w, hp: HParams, vocab: Vocab | None, outtype: str, name: str,
              gshapes: list[tuple[str, tuple[int, ...]]]) -> None:
    total = sum(int(np.prod(s)) for _, s in gshapes)
    experts = sum(int(np.prod(s)) for g, s in gshapes if g.endswith("_exps.weight"))
    w.add_type("model")
    w.add_name(name)
    w.add_size_label(size_label(hp.n_expert, total, experts))
    a = f"{ARCH}."
    w.add_uint32(a + "block_count", hp.n_layer)
    w.add_uint32(a + "context_length", hp.context_length)
    w.add_uint32(a + "embedding_length", hp.hidden)
    w.add_uint32(a + "feed_forward_length", hp.ff)
    w.add_uint32(a + "attention.head_count", hp.n_head)
    w.add_array(a + "attention.head_count_kv",
                [hp.kv_sliding if s else hp.kv_full for s in hp.sliding])
    w.add_float32(a + "rope.freq_base", hp.rope_theta)
    w.add_float32(a + "rope.freq_base_swa", hp.rope_theta_swa)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", hp.rms_eps)
    w.add_uint32(a + "expert_count", hp.n_expert)
    w.add_uint32(a + "expert_used_count", hp.n_expert_used)
    w.add_uint32(a + "attention.key_length", hp.head_dim_full)
    w.add_uint32(a + "attention.value_length", hp.head_dim_full)
    w.add_float32(a + "final_logit_softcapping", hp.softcap)
    w.add_uint32(a + "attention.sliding_window", hp.sliding_window)
    w.add_uint32(a + "attention.shared_kv_layers", 0)
    w.add_uint32(a + "embedding_length_per_layer_input", 0)
    w.add_array(a + "attention.sliding_window_pattern", list(hp.sliding))
    w.add_uint32(a + "attention.key_length_swa", hp.head_dim)
    w.add_uint32(a + "attention.value_length_swa", hp.head_dim)
    w.add_uint32(a + "expert_feed_forward_length", hp.ff_exp)
    w.add_uint32(a + "rope.dimension_count", hp.head_dim_full)
    w.add_uint32(a + "rope.dimension_count_swa", hp.head_dim)
    w.add_bool(a + "attention.causal", False)
    w.add_uint32("diffusion.canvas_length", hp.canvas_length)
    for key, value in hp.sampler.items():
        if key.endswith(("max_steps", "stability_threshold")):
            w.add_uint32(key, int(value))
        else:
            w.add_float32(key, float(value))
    if vocab is not None:
        vocab.add_to_writer(w)
    w.add_quantization_version(2)
    w.add_file_type(FILE_TYPE[outtype])


# ---------------------------------------------------------------------------------------------
# Reading an HF directory

def _read_json(path: Path, required: bool = True) -> dict | None:
    if not path.exists():
        if required:
            raise InputError(f"{path.name} is missing", path=path.parent,
                             fix="pass a Hugging Face model directory (config.json, *.safetensors)")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"invalid JSON ({exc})", path=path, fix="download the file again") from None


class SafetensorsDir:
    """Lazy access to every tensor of the `*.safetensors` files in a directory, by name."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise InputError("no *.safetensors files", path=hf_dir,
                             fix="download the model weights (safetensors format) into this directory")
        self._handles, self.where = [], {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as exc:   # safetensors raises its own error types
                raise InputError(f"cannot read safetensors file ({exc})", path=f,
                                 fix="the download is incomplete or damaged; download it again") from None
            self._handles.append(h)
            for key in h.keys():
                self.where[key] = h

    def names(self) -> Iterable[str]:
        return self.where.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise InputError(f"tensor {name!r} is missing from the safetensors files",
                             fix="the checkpoint is incomplete or not a DiffusionGemma model")
        return self.where[name].get_tensor(name).float().numpy()


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "f32", *,
            overwrite: bool = False, name: str | None = None) -> Path:
    """Convert an HF DiffusionGemma directory into one GGUF file; returns the output path.
    (Its vision tower goes to an mmproj file: gguf/mmproj.py, `convert_mmproj`.)"""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise InputError("not a directory" if hf_dir.exists() else "no such directory", path=hf_dir,
                         fix="pass the Hugging Face model directory (with config.json)")
    cfg = _read_json(hf_dir / "config.json")
    if cfg.get("model_type") not in ("diffusion_gemma", "diffusion_gemma_text"):
        raise InputError(f"model_type is {cfg.get('model_type')!r}, not 'diffusion_gemma'",
                         path=hf_dir / "config.json", fix="diffcli converts DiffusionGemma checkpoints only")
    try:
        hp = HParams.from_hf(cfg, _read_json(hf_dir / "generation_config.json", required=False))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"config.json lacks or has a bad value for {exc}", path=hf_dir / "config.json",
                         fix="use the config.json that came with the checkpoint") from None
    st = SafetensorsDir(hf_dir)
    wanted = {h for _, h in tensor_plan(hp) if h is not None}
    unknown = [n for n in st.names() if n not in wanted and not _DROPPED.match(n)]
    if unknown:
        raise InputError(f"{len(unknown)} unexpected tensors, e.g. {unknown[0]!r}", path=hf_dir,
                         fix="this checkpoint's layout differs from DiffusionGemma's; it cannot be converted")
    missing = sorted(wanted - set(st.names()))
    if missing:
        raise InputError(f"{len(missing)} tensors are missing, e.g. {missing[0]!r}", path=hf_dir,
                         fix="the checkpoint is incomplete (check every safetensors shard is present)")
    vocab = read_hf_tokenizer(hf_dir, hp.vocab_size)
    for h, shape in hf_shapes(hp).items():   # fail before writing anything
        if st.shape(h) != shape:
            raise InputError(f"tensor {h!r} has shape {list(st.shape(h))} but config.json implies "
                             f"{list(shape)}", path=hf_dir, fix="config.json does not belong to these weights")
    return write_gguf(out_path, hp, st, vocab, outtype, overwrite=overwrite,
                      name=name or hf_dir.resolve().name)
