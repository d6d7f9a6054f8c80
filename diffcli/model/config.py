"""ModelConfig: the architecture of a `diffusion-gemma` GGUF (spec §A.2), plus the sampler
defaults the file may carry (`diffusion.eb_*`, spec §C.1; real files carry none of them)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    from ..gguf.reader import GGUFFile

ARCH = "diffusion-gemma"

# Sampler defaults used when the GGUF has no `diffusion.eb_*` keys (spec §C.1).
EB_DEFAULTS = {
    "max_steps": 48, "t_min": 0.4, "t_max": 0.8, "entropy_bound": 0.1,
    "stability": 1, "confidence": 0.005,
}
_EB_KEYS = {
    "max_steps": "diffusion.eb_max_steps", "t_min": "diffusion.eb_t_min",
    "t_max": "diffusion.eb_t_max", "entropy_bound": "diffusion.eb_entropy_bound",
    "stability": "diffusion.eb_stability_threshold",
    "confidence": "diffusion.eb_confidence_threshold",
}


@dataclass
class ModelConfig:
    n_layer: int                      # 30
    n_embd: int                       # H = 2816
    n_ff: int                         # dense MLP and self-conditioning MLP width, 2112
    n_head: int                       # query heads, 16 on every layer
    n_head_kv: list[int]              # per layer: 8 sliding, 2 global
    head_dim: int                     # global layers, 512
    head_dim_swa: int                 # sliding layers, 256
    sliding_window: int               # W = 1024
    swa_pattern: list[bool]           # per layer, True = sliding
    rope_theta: float = 1_000_000.0   # global layers
    rope_theta_swa: float = 10_000.0  # sliding layers
    n_rot: int | None = None          # rotated frequency pairs on global layers (from rope_freqs)
    n_expert: int = 128
    n_expert_used: int = 8
    n_ff_exp: int = 704
    rms_eps: float = 1e-6
    final_logit_softcap: float = 30.0
    vocab_size: int = 262_144
    canvas_length: int = 256
    context_length: int = 262_144
    sampler_defaults: dict[str, float] = field(default_factory=lambda: dict(EB_DEFAULTS))
    # derived in __post_init__
    layer_types: list[str] = field(init=False)     # "sliding" | "full"

    def __post_init__(self):
        if isinstance(self.n_head_kv, int):
            self.n_head_kv = [self.n_head_kv] * self.n_layer
        if len(self.n_head_kv) != self.n_layer:
            raise InputError(f"head_count_kv lists {len(self.n_head_kv)} layers, block_count is "
                             f"{self.n_layer}", fix="it must list every layer; convert the model again")
        if len(self.swa_pattern) != self.n_layer:
            raise InputError(f"sliding_window_pattern lists {len(self.swa_pattern)} layers, "
                             f"block_count is {self.n_layer}",
                             fix="it must list every layer; convert the model again")
        self.layer_types = ["sliding" if s else "full" for s in self.swa_pattern]
        if self.n_rot is None:
            self.n_rot = int(self.head_dim * 0.25) // 2   # "proportional" rope, factor 0.25
        for i, kv in enumerate(self.n_head_kv):
            if kv < 1 or self.n_head % kv:
                raise InputError(f"layer {i}: {self.n_head} query heads are not divisible by "
                                 f"{kv} KV heads", fix="head_count must be a multiple of every "
                                 "head_count_kv entry; convert the model again")

    def is_sliding(self, layer: int) -> bool:
        return self.swa_pattern[layer]

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim_swa if self.swa_pattern[layer] else self.head_dim

    @classmethod
    def from_gguf(cls, f: "GGUFFile") -> "ModelConfig":
        """The config of a diffusion-gemma file. Every key is checked (type and range) and every
        problem is an InputError naming the key, its value and what it must be."""
        md = f.metadata
        arch = md.get("general.architecture")
        if arch != ARCH:
            raise InputError(f"architecture is {arch!r}, not {ARCH!r}", path=f.path,
                             fix="this is a vision tower (mmproj): pass it to --mmproj, the model to -m"
                             if arch == "clip" else
                             "diffcli runs DiffusionGemma GGUF files only (convert with `diffcli convert`)")
        keys = _Keys(f)
        n_layer = keys.int("block_count", hi=MAX_LAYERS)
        n_head = keys.int("attention.head_count", hi=MAX_HEADS)
        kv = keys.get("attention.head_count_kv")
        if isinstance(kv, list):
            n_head_kv = [keys.item("attention.head_count_kv", kv, i, lo=1, hi=n_head) for i in range(len(kv))]
            if len(n_head_kv) != n_layer:
                keys.bad("attention.head_count_kv", f"a list of {len(kv)} values",
                         f"one per layer (block_count is {n_layer})")
        else:
            n_head_kv = [keys.int("attention.head_count_kv", hi=n_head)] * n_layer
        for i, k in enumerate(n_head_kv):
            if n_head % k:
                keys.bad("attention.head_count_kv", f"{k} at layer {i}",
                         f"a divisor of attention.head_count ({n_head})")
        pattern = keys.get("attention.sliding_window_pattern")
        if not isinstance(pattern, list) or len(pattern) != n_layer or any(
                type(x) is not bool and x not in (0, 1) for x in pattern):
            keys.bad("attention.sliding_window_pattern", _short(pattern),
                     f"a per-layer bool array of {n_layer} values (block_count)")
        head_dim = keys.int("attention.key_length", hi=MAX_DIM, even=True)
        head_dim_swa = keys.int("attention.key_length_swa", hi=MAX_DIM, even=True)
        n_expert = keys.int("expert_count", hi=MAX_EXPERTS)
        n_expert_used = keys.int("expert_used_count", hi=n_expert, hi_name="expert_count")
        context = keys.int("context_length", 262_144, hi=MAX_CONTEXT)
        canvas = md.get("diffusion.canvas_length")
        if canvas is None:
            raise InputError("metadata key 'diffusion.canvas_length' is missing", path=f.path,
                             fix="this is not a block-diffusion model file; convert it again")
        canvas = keys.check_int("diffusion.canvas_length", canvas, 1, context, "context_length")
        n_rot = None
        if "rope_freqs.weight" in f:
            info = f.info("rope_freqs.weight")
            if info.shape not in ((head_dim // 2,), (1, head_dim // 2)) or info.qtype not in (
                    "F32", "F16", "BF16"):
                raise InputError(f"tensor 'rope_freqs.weight' is {info.qtype} {list(info.shape)}, "
                                 f"expected F32 [{head_dim // 2}] (half of attention.key_length)",
                                 path=f.path, fix="convert the model again")
            freqs = f.tensor("rope_freqs.weight").dequantize()
            n_rot = int((freqs == 1.0).sum())
        tokens = md.get("tokenizer.ggml.tokens")
        if "token_embd.weight" in f:
            shape = f.info("token_embd.weight").shape
            vocab = shape[0] if len(shape) == 2 else 0
            if not 1 <= vocab <= MAX_VOCAB:
                raise InputError(f"tensor 'token_embd.weight' has shape {list(shape)}, expected "
                                 "[vocabulary, embedding_length]", path=f.path,
                                 fix="convert the model again")
            if isinstance(tokens, list) and tokens and len(tokens) != vocab:
                raise InputError(f"tokenizer.ggml.tokens has {len(tokens):,} tokens, but "
                                 f"token_embd.weight has {vocab:,} rows", path=f.path,
                                 fix="the vocabulary and the embedding must match; convert the model again")
        else:
            vocab = len(tokens) if isinstance(tokens, list) and tokens else 262_144
        sampler = dict(EB_DEFAULTS)
        for name, k in _EB_KEYS.items():
            if k in md:
                try:   # the PR runner reads these as strings; be tolerant of the stored type
                    sampler[name] = type(EB_DEFAULTS[name])(float(md[k]))
                except (TypeError, ValueError, OverflowError):
                    raise InputError(f"metadata key {k!r} has a bad value {_short(md[k])}", path=f.path,
                                     fix="fix or remove that key (gguf-set-metadata)") from None
        return cls(
            n_layer=n_layer,
            n_embd=keys.int("embedding_length", hi=MAX_DIM),
            n_ff=keys.int("feed_forward_length", hi=MAX_DIM),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_swa=head_dim_swa,
            sliding_window=keys.int("attention.sliding_window", hi=MAX_CONTEXT),
            swa_pattern=[bool(x) for x in pattern],
            rope_theta=keys.float("rope.freq_base", 1_000_000.0),
            rope_theta_swa=keys.float("rope.freq_base_swa", 10_000.0),
            n_rot=n_rot,
            n_expert=n_expert,
            n_expert_used=n_expert_used,
            n_ff_exp=keys.int("expert_feed_forward_length", hi=MAX_DIM),
            rms_eps=keys.float("attention.layer_norm_rms_epsilon", 1e-6),
            final_logit_softcap=keys.float("final_logit_softcapping", 30.0),
            vocab_size=int(vocab),
            canvas_length=canvas,
            context_length=context,
            sampler_defaults=sampler,
        )


# Upper bounds that keep every size the config implies a sane integer (the real model: 30
# layers, 16 heads, dims <= 2816, 128 experts, 262,144 tokens of vocabulary and context).
MAX_LAYERS = 512                # llama.cpp's LLAMA_MAX_LAYERS
MAX_HEADS = 1 << 12
MAX_DIM = 1 << 20
MAX_EXPERTS = 1 << 12
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 24


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _Keys:
    """Typed, range-checked reads of `diffusion-gemma.*` keys."""

    def __init__(self, f: "GGUFFile"):
        self.f, self.md = f, f.metadata

    def bad(self, name: str, value: str, must: str):
        raise InputError(f"metadata key {name!r} is {value}; it must be {must}", path=self.f.path,
                         fix="fix that key (gguf-set-metadata) or convert the model again")

    def get(self, name: str, default: Any = None) -> Any:
        full = f"{ARCH}.{name}"
        if full in self.md:
            return self.md[full]
        if default is None:
            raise InputError(f"metadata key {full!r} is missing", path=self.f.path,
                             fix="the file is incomplete; convert it again")
        return default

    def check_int(self, full: str, value: Any, lo: int, hi: int, hi_name: str | None = None,
                  even: bool = False) -> int:
        if type(value) is not int:
            self.bad(full, _short(value), "an integer")
        bound = f"{hi:,}" if hi_name is None else f"{hi_name} ({hi:,})"
        if not lo <= value <= hi:
            self.bad(full, f"{value:,}", f"from {lo} to {bound}" if hi >= lo else
                     f"at least {lo} and at most {bound}")
        if even and value % 2:
            self.bad(full, f"{value:,}", "even (rotary embeddings turn pairs of dimensions)")
        return value

    def int(self, name: str, default: int | None = None, *, lo: int = 1, hi: int,
            hi_name: str | None = None, even: bool = False) -> int:
        return self.check_int(f"{ARCH}.{name}", self.get(name, default), lo, hi, hi_name, even)

    def item(self, name: str, values: list, i: int, *, lo: int, hi: int) -> int:
        v = values[i]
        if type(v) is not int or not lo <= v <= hi:
            self.bad(f"{ARCH}.{name}", f"{_short(v)} at index {i}", f"an integer from {lo} to {hi:,}")
        return v

    def float(self, name: str, default: float) -> float:
        v = self.get(name, default)
        if type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
            self.bad(f"{ARCH}.{name}", _short(v), "a finite number above 0")
        return float(v)
