"""A DiffusionGemma checkpoint's vision tower -> an mmproj GGUF, in the layout llama.cpp writes for
Gemma 4 vision, so files made by either tool load in both.

The layout is the one llama.cpp's converter gives a Gemma 4 checkpoint (`convert_hf_to_gguf.py
--mmproj`, its Gemma 4 vision/audio mmproj class), read from its source and gguf-py's tensor
name table (tests/test_mmproj.py checks both): architecture `clip`, `general.type` `mmproj`,
projector `gemma4v` under `clip.vision.projector_type`, the `clip.vision.*` sizes, and tensors
`v.*` (the tower) and `mm.input_projection.weight` (the embedder). DiffusionGemma nests the Gemma 4
tower under its encoder (`model.encoder.vision_tower`, `model.encoder.embed_vision`); the tensors
are the same. Two transformations, as llama.cpp does them:

- `v.patch_embd.weight`: the patch projection [H, p*p*3] (patches flattened row, column, channel)
  is stored as a convolution kernel [H, 3, p, p];
- the clipped linears' scalar bounds (`*.input_min` ... `*.output_max`, present when the tower was
  trained with `use_clipped_linears`) become 1-element tensors.

Types: norms, scalars and the position table F32; the patch kernel F16 in f16 files and F32
otherwise; every other matrix in the output type (q8_0 falls back to F16 for rows that are not a
multiple of 32). The format carries no RoPE base or pooling size: llama.cpp's loader fixes them to
the Gemma 4 values (100, 3), so a checkpoint with other values is refused rather than written as a
file llama.cpp would misread.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
from .convert import SafetensorsDir, _read_json, check_output_path, write_tensors
from .quantize import can_quantize

ARCH = "clip"
PROJECTOR = "gemma4v"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}   # gguf.LlamaFileType
ROPE_THETA = 100.0          # fixed by the format: llama.cpp's gemma4v loader sets it, no key says it
POOLING = 3                 # likewise (pooling_kernel_size)
IMAGE_SIZE = 224            # written as llama.cpp writes it; unused (images keep their aspect)
ACTIVATION = "gelu_pytorch_tanh"

HF_PREFIX = "model.encoder."       # DiffusionGemma: the Gemma 4 tower lives in the encoder
# GGUF name -> HF name (after HF_PREFIX), model-wide then per layer (`{i}`)
GLOBAL_TENSORS = {
    "v.patch_embd.weight": "vision_tower.patch_embedder.input_proj.weight",
    "v.position_embd.weight": "vision_tower.patch_embedder.position_embedding_table",
    "v.std_bias": "vision_tower.std_bias",                 # standardize only
    "v.std_scale": "vision_tower.std_scale",
    "mm.input_projection.weight": "embed_vision.embedding_projection.weight",
}
_L = "vision_tower.encoder.layers.{i}."
LAYER_TENSORS = {
    "v.blk.{i}.ln1.weight": _L + "input_layernorm.weight",
    "v.blk.{i}.attn_q.weight": _L + "self_attn.q_proj.linear.weight",
    "v.blk.{i}.attn_k.weight": _L + "self_attn.k_proj.linear.weight",
    "v.blk.{i}.attn_v.weight": _L + "self_attn.v_proj.linear.weight",
    "v.blk.{i}.attn_out.weight": _L + "self_attn.o_proj.linear.weight",
    "v.blk.{i}.attn_q_norm.weight": _L + "self_attn.q_norm.weight",
    "v.blk.{i}.attn_k_norm.weight": _L + "self_attn.k_norm.weight",
    "v.blk.{i}.attn_post_norm.weight": _L + "post_attention_layernorm.weight",
    "v.blk.{i}.ln2.weight": _L + "pre_feedforward_layernorm.weight",
    "v.blk.{i}.ffn_gate.weight": _L + "mlp.gate_proj.linear.weight",
    "v.blk.{i}.ffn_up.weight": _L + "mlp.up_proj.linear.weight",
    "v.blk.{i}.ffn_down.weight": _L + "mlp.down_proj.linear.weight",
    "v.blk.{i}.ffn_post_norm.weight": _L + "post_feedforward_layernorm.weight",
}
CLIPPED = ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_gate", "ffn_up", "ffn_down")
CLAMPS = ("input_min", "input_max", "output_min", "output_max")


@dataclass
class VisionHParams:
    """What the mmproj needs from an HF `config.json` (its `vision_config` and the text width)."""
    n_layer: int
    hidden: int
    ff: int
    n_head: int
    head_dim: int
    patch_size: int
    n_pos: int               # position_embedding_size: rows of each position table
    text_hidden: int         # clip.vision.projection_dim
    eps: float = 1e-6
    standardize: bool = False
    clipped: bool = False

    @classmethod
    def from_hf(cls, cfg: dict, path: Path | None = None) -> "VisionHParams":
        vision = cfg.get("vision_config")
        if not isinstance(vision, dict):
            raise InputError("config.json has no vision_config: this checkpoint has no vision tower",
                             path=path, fix="convert without --mmproj")
        text = cfg.get("text_config", cfg)
        rope = vision.get("rope_parameters") or {}
        fixed = {   # what the format cannot express: llama.cpp's loader assumes these
            "pooling_kernel_size": (vision.get("pooling_kernel_size", POOLING), POOLING),
            "rope_theta": (float(rope.get("rope_theta", ROPE_THETA)), ROPE_THETA),
            "rope_type": (rope.get("rope_type", "axial"), "axial"),
            "hidden_activation": (vision.get("hidden_activation", ACTIVATION), ACTIVATION),
            "num_key_value_heads": (vision.get("num_key_value_heads", vision.get("num_attention_heads")),
                                    vision.get("num_attention_heads")),
            "head_dim": (vision.get("head_dim", vision["hidden_size"] // vision["num_attention_heads"]),
                         vision["hidden_size"] // vision["num_attention_heads"]),
        }
        for key, (got, want) in fixed.items():
            if got != want:
                raise InputError(f"vision_config.{key} is {got!r}; an mmproj file cannot express that "
                                 f"(its loaders assume {want!r})", path=path,
                                 fix="this vision tower cannot be written as a Gemma 4 mmproj")
        return cls(
            n_layer=int(vision["num_hidden_layers"]), hidden=int(vision["hidden_size"]),
            ff=int(vision["intermediate_size"]), n_head=int(vision["num_attention_heads"]),
            head_dim=int(vision["hidden_size"]) // int(vision["num_attention_heads"]), patch_size=int(vision.get("patch_size", 16)),
            n_pos=int(vision.get("position_embedding_size", 10240)),
            text_hidden=int(text["hidden_size"]), eps=float(vision.get("rms_norm_eps", 1e-6)),
            standardize=bool(vision.get("standardize", False)),
            clipped=bool(vision.get("use_clipped_linears", False)))


def tensor_plan(hp: VisionHParams) -> list[tuple[str, str, tuple[int, ...]]]:
    """(GGUF name, HF name, HF shape) in writing order."""
    H, F, p, hd = hp.hidden, hp.ff, hp.patch_size, hp.head_dim
    q = hp.n_head * hd
    plan = [("v.patch_embd.weight", GLOBAL_TENSORS["v.patch_embd.weight"], (H, p * p * 3)),
            ("v.position_embd.weight", GLOBAL_TENSORS["v.position_embd.weight"], (2, hp.n_pos, H))]
    shapes = {"ln1": (H,), "attn_q": (q, H), "attn_k": (q, H), "attn_v": (q, H), "attn_out": (H, q),
              "attn_q_norm": (hd,), "attn_k_norm": (hd,), "attn_post_norm": (H,), "ln2": (H,),
              "ffn_gate": (F, H), "ffn_up": (F, H), "ffn_down": (H, F), "ffn_post_norm": (H,)}
    for i in range(hp.n_layer):
        for gname, hname in LAYER_TENSORS.items():
            kind = gname.split(".")[3]
            plan.append((gname.format(i=i), hname.format(i=i), shapes[kind]))
            if hp.clipped and kind in CLIPPED:
                module = hname.format(i=i).removesuffix(".linear.weight")
                for c in CLAMPS:
                    plan.append((f"v.blk.{i}.{kind}.{c}", f"{module}.{c}", ()))
    if hp.standardize:
        plan += [(g, GLOBAL_TENSORS[g], (H,)) for g in ("v.std_bias", "v.std_scale")]
    plan.append(("mm.input_projection.weight", GLOBAL_TENSORS["mm.input_projection.weight"],
                 (hp.text_hidden, H)))
    return [(g, HF_PREFIX + h, s) for g, h, s in plan]


def gguf_shape(gname: str, hf_shape: tuple[int, ...], patch_size: int) -> tuple[int, ...]:
    """The torch-order shape stored in the file: the patch kernel [H, 3, p, p], scalars [1]."""
    if gname == "v.patch_embd.weight":
        return (hf_shape[0], 3, patch_size, patch_size)
    return hf_shape or (1,)


def to_gguf(gname: str, data: np.ndarray, patch_size: int) -> np.ndarray:
    """HF values -> the stored tensor (see the module docstring)."""
    if gname == "v.patch_embd.weight":
        H = data.shape[0]
        return np.ascontiguousarray(data.reshape(H, patch_size, patch_size, 3).transpose(0, 3, 1, 2))
    return data.reshape(-1) if data.ndim == 0 else data


def patch_kernel_to_linear(kernel):
    """The stored patch kernel [H, 3, p, p] -> the linear patch projection [H, p*p*3] (torch or
    numpy); the inverse of `to_gguf`."""
    H = kernel.shape[0]
    return kernel.permute(0, 2, 3, 1).reshape(H, -1) if hasattr(kernel, "permute") \
        else kernel.transpose(0, 2, 3, 1).reshape(H, -1)


def tensor_type(gname: str, shape: tuple[int, ...], outtype: str) -> str:
    if outtype == "f32" or len(shape) == 1 or gname == "v.position_embd.weight":
        return "F32"
    if gname == "v.patch_embd.weight":
        return "F16" if outtype == "f16" else "F32"
    if outtype in ("f16", "bf16"):
        return outtype.upper()
    return "Q8_0" if can_quantize("Q8_0", shape[-1]) else "F16"


def write_mmproj(out_path: str | os.PathLike, hp: VisionHParams, get_tensor: Callable[[str], np.ndarray],
                 outtype: str = "f32", *, name: str = "DiffusionGemma", overwrite: bool = False) -> Path:
    """Write the mmproj file; `get_tensor(hf_name)` gives each HF tensor (float), one at a time."""
    import gguf

    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise InputError(f"an mmproj file cannot be written as {outtype!r}",
                         fix=f"use --outtype {' / '.join(OUTTYPES)} with --mmproj")
    out_path = check_output_path(out_path, overwrite)
    plan = tensor_plan(hp)
    specs = []
    for gname, _, hf_shape in plan:
        shape = gguf_shape(gname, hf_shape, hp.patch_size)
        specs.append((gname, shape, tensor_type(gname, shape, outtype)))

    w = gguf.GGUFWriter(path=None, arch=ARCH)
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_file_type(FILE_TYPE[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_vision_projector_type(PROJECTOR)
    w.add_vision_projection_dim(hp.text_hidden)
    w.add_vision_image_size(IMAGE_SIZE)
    w.add_vision_patch_size(hp.patch_size)
    w.add_vision_embedding_length(hp.hidden)
    w.add_vision_feed_forward_length(hp.ff)
    w.add_vision_block_count(hp.n_layer)
    w.add_vision_head_count(hp.n_head)
    w.add_vision_attention_layernorm_eps(hp.eps)
    # the Gemma 4 processor does not normalise (do_normalize=False): identity mean and std
    w.add_vision_image_mean([0.0, 0.0, 0.0])
    w.add_vision_image_std([1.0, 1.0, 1.0])

    def tensors():
        for gname, hf_name, hf_shape in plan:
            data = np.asarray(get_tensor(hf_name), np.float32)
            if tuple(data.shape) != tuple(hf_shape):
                raise InputError(f"tensor {hf_name!r} has shape {list(data.shape)} but config.json "
                                 f"implies {list(hf_shape)}", fix="config.json does not belong to these weights")
            yield to_gguf(gname, data, hp.patch_size)

    write_tensors(w, out_path, specs, tensors())
    return out_path


def convert_mmproj(hf_dir: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "f32", *,
                   overwrite: bool = False, name: str | None = None) -> Path:
    """Write the vision tower of the HF DiffusionGemma directory `hf_dir` as an mmproj file."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise InputError("not a directory" if hf_dir.exists() else "no such directory", path=hf_dir,
                         fix="pass the Hugging Face model directory (with config.json)")
    cfg = _read_json(hf_dir / "config.json")
    if cfg.get("model_type") != "diffusion_gemma":
        raise InputError(f"model_type is {cfg.get('model_type')!r}, not 'diffusion_gemma'",
                         path=hf_dir / "config.json", fix="diffcli converts DiffusionGemma checkpoints only")
    try:
        hp = VisionHParams.from_hf(cfg, hf_dir / "config.json")
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"config.json's vision_config lacks or has a bad value for {exc}",
                         path=hf_dir / "config.json", fix="use the config.json that came with the checkpoint") from None
    st = SafetensorsDir(hf_dir)
    plan = tensor_plan(hp)
    wanted = {h for _, h, _ in plan}
    tower = [n for n in st.names() if n.startswith((HF_PREFIX + "vision_tower.", HF_PREFIX + "embed_vision."))]
    if not tower:
        raise InputError("the safetensors files hold no vision tower (model.encoder.vision_tower.*)",
                         path=hf_dir, fix="convert without --mmproj, or download the full checkpoint")
    unknown = sorted(set(tower) - wanted)
    if unknown:
        raise InputError(f"{len(unknown)} unexpected vision tensors, e.g. {unknown[0]!r}", path=hf_dir,
                         fix="config.json's vision_config does not describe these weights")
    missing = sorted(wanted - set(st.names()))
    if missing:
        raise InputError(f"{len(missing)} vision tensors are missing, e.g. {missing[0]!r}", path=hf_dir,
                         fix="the checkpoint is incomplete (check every safetensors shard is present)")
    for _, h, shape in plan:           # fail before writing anything
        if st.shape(h) != tuple(shape):
            raise InputError(f"tensor {h!r} has shape {list(st.shape(h))} but config.json implies "
                             f"{list(shape)}", path=hf_dir, fix="config.json does not belong to these weights")
    return write_mmproj(out_path, hp, st, outtype, overwrite=overwrite,
                        name=name or hf_dir.resolve().name)
