"""ModelConfig: the architecture of a `diffusion-gemma` GGUF (spec §A.2), plus the sampler
defaults the file may carry (`diffusion.eb_*`, spec §C.1; real files carry none of them)."""
from __future__ import annotations

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
        assert len(self.n_head_kv) == self.n_layer, "head_count_kv must list every layer"
        assert len(self.swa_pattern) == self.n_layer, "sliding_window_pattern must list every layer"
        self.layer_types = ["sliding" if s else "full" for s in self.swa_pattern]
        if self.n_rot is None:
            self.n_rot = int(self.head_dim * 0.25) // 2   # "proportional" rope, factor 0.25
        for i, kv in enumerate(self.n_head_kv):
            assert self.n_head % kv == 0, f"layer {i}: {self.n_head} heads not divisible by {kv} KV heads"

    def is_sliding(self, layer: int) -> bool:
        return self.swa_pattern[layer]

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim_swa if self.swa_pattern[layer] else self.head_dim

    @classmethod
    def from_gguf(cls, f: "GGUFFile") -> "ModelConfig":
        md = f.metadata
        arch = md.get("general.architecture")
        if arch != ARCH:
            raise InputError(f"architecture is {arch!r}, not {ARCH!r}", path=f.path,
                             fix="this is a vision tower (mmproj): pass it to --mmproj, the model to -m"
                             if arch == "clip" else
                             "diffcli runs DiffusionGemma GGUF files only (convert with `diffcli convert`)")

        def key(name: str, default: Any = None) -> Any:
            full = f"{ARCH}.{name}"
            if full in md:
                return md[full]
            if default is None:
                raise InputError(f"metadata key {full!r} is missing", path=f.path,
                                 fix="the file is incomplete; convert it again")
            return default

        n_layer = int(key("block_count"))
        pattern = key("attention.sliding_window_pattern")
        if isinstance(pattern, (int, bool)):
            raise InputError("attention.sliding_window_pattern must be a per-layer bool array",
                             path=f.path, fix="convert the model again")
        n_rot = None
        if "rope_freqs.weight" in f:
            freqs = f.tensor("rope_freqs.weight").dequantize()
            n_rot = int((freqs == 1.0).sum())
        if "token_embd.weight" in f:
            vocab = f.info("token_embd.weight").shape[0]
        else:
            vocab = len(md.get("tokenizer.ggml.tokens", [])) or 262_144
        sampler = dict(EB_DEFAULTS)
        for name, k in _EB_KEYS.items():
            if k in md:
                try:   # the PR runner reads these as strings; be tolerant of the stored type
                    sampler[name] = type(EB_DEFAULTS[name])(float(md[k]))
                except (TypeError, ValueError):
                    raise InputError(f"metadata key {k!r} has a bad value {md[k]!r}", path=f.path,
                                     fix="fix or remove that key (gguf-set-metadata)") from None
        canvas = md.get("diffusion.canvas_length")
        if canvas is None:
            raise InputError("metadata key 'diffusion.canvas_length' is missing", path=f.path,
                             fix="this is not a block-diffusion model file; convert it again")
        return cls(
            n_layer=n_layer,
            n_embd=int(key("embedding_length")),
            n_ff=int(key("feed_forward_length")),
            n_head=int(key("attention.head_count")),
            n_head_kv=[int(x) for x in key("attention.head_count_kv")]
            if isinstance(key("attention.head_count_kv"), list) else int(key("attention.head_count_kv")),
            head_dim=int(key("attention.key_length")),
            head_dim_swa=int(key("attention.key_length_swa")),
            sliding_window=int(key("attention.sliding_window")),
            swa_pattern=[bool(x) for x in pattern],
            rope_theta=float(key("rope.freq_base", 1_000_000.0)),
            rope_theta_swa=float(key("rope.freq_base_swa", 10_000.0)),
            n_rot=n_rot,
            n_expert=int(key("expert_count")),
            n_expert_used=int(key("expert_used_count")),
            n_ff_exp=int(key("expert_feed_forward_length")),
            rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            final_logit_softcap=float(key("final_logit_softcapping", 30.0)),
            vocab_size=int(vocab),
            canvas_length=int(canvas),
            context_length=int(key("context_length", 262_144)),
            sampler_defaults=sampler,
        )
