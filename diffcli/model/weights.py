"""GGUF tensor names -> model weights (spec §A.4, §A.5), validated up front and loaded lazily.

Big matrices stay quantized: each is a QTensor whose bytes are a zero-copy view of the file's
mmap on CPU, or one raw-byte copy on an accelerator. Nothing here dequantizes a matrix; the only
tensors materialised as floats are the 1-D norm weights, the scalars, the per-expert scales and
the router (F32 in every real file; [E, H] = 360k floats for the real model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compute.ops import RUNNABLE_TYPES
from ..errors import InputError
from ..gguf.qtensor import QTensor
from ..gguf.reader import GGUFFile
from .config import ModelConfig

# The tensor types a model may use: every type compute.ops runs (a fused kernel where one takes
# the type, dequantize -> matmul elsewhere). `problems` checks files against it for both `load`
# and `diffcli inspect`, so the two cannot disagree on what runs.
SUPPORTED_QTYPES = RUNNABLE_TYPES

# attribute -> GGUF name. Model-wide tensors first, then per layer (`{i}` = layer index).
GLOBAL_NAMES = {
    "embed": "token_embd.weight",               # [V, H], also the tied LM head
    "output_norm": "output_norm.weight",
    "rope_freqs": "rope_freqs.weight",          # global layers only: 1.0 = rotated pair, 1e30 = not
    "sc_pre_norm": "self_cond_pre_norm.weight",
    "sc_gate": "self_cond_gate.weight",
    "sc_up": "self_cond_up.weight",
    "sc_down": "self_cond_down.weight",
}
LAYER_NAMES = {
    "attn_norm": "blk.{i}.attn_norm.weight",
    "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight",              # sliding layers only; global layers use v = k
    "wo": "blk.{i}.attn_output.weight",
    "q_norm": "blk.{i}.attn_q_norm.weight",
    "k_norm": "blk.{i}.attn_k_norm.weight",
    "post_attn_norm": "blk.{i}.post_attention_norm.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "ffn_gate": "blk.{i}.ffn_gate.weight",
    "ffn_up": "blk.{i}.ffn_up.weight",
    "ffn_down": "blk.{i}.ffn_down.weight",
    "post_ffn_norm_1": "blk.{i}.post_ffw_norm_1.weight",
    "pre_ffn_norm_2": "blk.{i}.pre_ffw_norm_2.weight",
    "router": "blk.{i}.ffn_gate_inp.weight",
    "router_scale": "blk.{i}.ffn_gate_inp.scale",
    "exp_gate_up": "blk.{i}.ffn_gate_up_exps.weight",   # fused: rows [0, Fe) gate, [Fe, 2Fe) up
    "exp_down": "blk.{i}.ffn_down_exps.weight",
    "exp_scale": "blk.{i}.ffn_down_exps.scale",
    "post_ffn_norm_2": "blk.{i}.post_ffw_norm_2.weight",
    "post_ffn_norm": "blk.{i}.post_ffw_norm.weight",
    "dec_scale": "blk.{i}.layer_output_scale.weight",
    "enc_scale": "blk.{i}.enc_layer_output_scale.weight",
}
# Kept quantized (QTensor); every other tensor is small and becomes a float32 tensor.
QUANTIZED = frozenset({"embed", "sc_gate", "sc_up", "sc_down", "wq", "wk", "wv", "wo",
                       "ffn_gate", "ffn_up", "ffn_down", "exp_gate_up", "exp_down"})


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wq: QTensor
    wk: QTensor
    wv: QTensor | None
    wo: QTensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    ffn_gate: QTensor
    ffn_up: QTensor
    ffn_down: QTensor
    post_ffn_norm_1: torch.Tensor
    pre_ffn_norm_2: torch.Tensor
    router: torch.Tensor
    router_scale: torch.Tensor
    exp_gate_up: QTensor
    exp_down: QTensor
    exp_scale: torch.Tensor
    post_ffn_norm_2: torch.Tensor
    post_ffn_norm: torch.Tensor
    dec_scale: float
    enc_scale: float


@dataclass
class Weights:
    embed: QTensor
    output_norm: torch.Tensor
    rope_freqs: torch.Tensor
    sc_pre_norm: torch.Tensor
    sc_gate: QTensor
    sc_up: QTensor
    sc_down: QTensor
    layers: list[LayerWeights]

    def tensors(self):
        """Every (attribute path, QTensor | Tensor) held, for memory accounting."""
        for k, v in vars(self).items():
            if k != "layers":
                yield k, v
        for i, lw in enumerate(self.layers):
            for k, v in vars(lw).items():
                if isinstance(v, (QTensor, torch.Tensor)):
                    yield f"layers.{i}.{k}", v


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF name -> torch-order shape the config implies, for every tensor the model reads."""
    H, V, F, Fe, E, Nq = (cfg.n_embd, cfg.vocab_size, cfg.n_ff, cfg.n_ff_exp, cfg.n_expert,
                          cfg.n_head)
    shapes = {
        "token_embd.weight": (V, H), "output_norm.weight": (H,),
        "rope_freqs.weight": (cfg.head_dim // 2,), "self_cond_pre_norm.weight": (H,),
        "self_cond_gate.weight": (F, H), "self_cond_up.weight": (F, H),
        "self_cond_down.weight": (H, F),
    }
    for i in range(cfg.n_layer):
        D, Nkv = cfg.layer_head_dim(i), cfg.n_head_kv[i]
        per = {
            "attn_norm": (H,), "wq": (Nq * D, H), "wk": (Nkv * D, H), "wv": (Nkv * D, H),
            "wo": (H, Nq * D), "q_norm": (D,), "k_norm": (D,), "post_attn_norm": (H,),
            "ffn_norm": (H,), "ffn_gate": (F, H), "ffn_up": (F, H), "ffn_down": (H, F),
            "post_ffn_norm_1": (H,), "pre_ffn_norm_2": (H,), "router": (E, H),
            "router_scale": (H,), "exp_gate_up": (E, 2 * Fe, H), "exp_down": (E, H, Fe),
            "exp_scale": (E,), "post_ffn_norm_2": (H,), "post_ffn_norm": (H,),
            "dec_scale": (1,), "enc_scale": (1,),
        }
        if not cfg.is_sliding(i):
            del per["wv"]
        for attr, shape in per.items():
            shapes[LAYER_NAMES[attr].format(i=i)] = shape
    return shapes


def problems(f: GGUFFile, cfg: ModelConfig) -> list[InputError]:
    """Why the model cannot run this file (empty: it runs), one error per kind of problem with
    the tensors the model reads: missing, of a type diffcli cannot run, of a shape other than
    the metadata implies. Each names its first tensor and counts the rest. `validate` (load)
    raises the first; `diffcli inspect` lists them all."""
    missing, types, shapes = [], {}, []
    for name, shape in expected_shapes(cfg).items():
        if name not in f:
            missing.append(name)
            continue
        info = f.info(name)
        if info.qtype not in RUNNABLE_TYPES:
            types.setdefault(name, info.qtype)
        got = tuple(info.shape)
        if got != shape and not (len(shape) == 1 and got == (1,) + shape):
            shapes.append((name, list(got), list(shape)))

    def more(n: int, what: str) -> str:
        return f" (and {n} more {what})" if n else ""

    out = []
    if missing:
        out.append(InputError(
            f"tensor {missing[0]!r} is missing{more(len(missing) - 1, 'tensors')}", path=f.path,
            fix="the file is incomplete or not a diffusion-gemma model; convert it again"))
    if types:
        (name, qtype), kinds = next(iter(types.items())), sorted(set(types.values()))
        out.append(InputError(
            f"tensor {name!r} has type {qtype}, which diffcli cannot run"
            f"{more(len(types) - 1, 'tensors of type ' + '/'.join(kinds))} "
            f"(supported: {', '.join(sorted(RUNNABLE_TYPES))})", path=f.path,
            fix="re-quantize the model to Q4_K_M, Q8_0, BF16 or F16"))
    if shapes:
        name, got, want = shapes[0]
        out.append(InputError(
            f"tensor {name!r} has shape {got}, the metadata implies {want}"
            f"{more(len(shapes) - 1, 'tensors of the wrong shape')}", path=f.path,
            fix="the file's metadata and tensors disagree; convert it again"))
    return out


def validate(f: GGUFFile, cfg: ModelConfig) -> None:
    """Every tensor present, with the shape the metadata implies and a type we can run."""
    found = problems(f, cfg)
    if found:
        raise found[0]


def load_weights(f: GGUFFile, cfg: ModelConfig, device: torch.device, plan=None,
                 copy: bool = False) -> Weights:
    """Every weight on `device`, or where `plan` (a placement.Plan) puts it: quantized matrices
    on their own device, the small float tensors on their layer's (the head's for model-wide
    ones). copy: CPU-placed matrices are copied out of the mmap into process memory (--no-mmap),
    so the model no longer reads the file's pages after loading."""
    validate(f, cfg)

    def where(name: str, layer: int | None) -> torch.device:
        if plan is None:
            return device
        return plan.head if layer is None else plan.layers[layer]

    def get(attr: str, name: str, layer: int | None = None):
        qt = f.tensor(name)
        if attr in QUANTIZED:
            dev = device if plan is None else plan.tensors[name]
            if dev.type == "cpu":
                return QTensor(qt.raw.clone(), qt.qtype, qt.shape, qt.name) if copy else qt
            return qt.to(dev)
        t = qt.dequantize(torch.float32).reshape(-1).to(where(name, layer))
        return t.clone() if copy and t.device.type == "cpu" else t

    glob = {attr: get(attr, name) for attr, name in GLOBAL_NAMES.items()}
    layers = []
    for i in range(cfg.n_layer):
        lw = {}
        for attr, tmpl in LAYER_NAMES.items():
            name = tmpl.format(i=i)
            if attr == "wv" and not cfg.is_sliding(i):
                lw[attr] = None
            elif attr in ("dec_scale", "enc_scale"):
                lw[attr] = float(f.tensor(name).dequantize(torch.float32).reshape(-1)[0])
            elif attr == "router":
                lw[attr] = f.tensor(name).dequantize(torch.float32).to(where(name, i))   # [E, H]
            else:
                lw[attr] = get(attr, name, i)
        layers.append(LayerWeights(**lw))
    return Weights(layers=layers, **glob)
