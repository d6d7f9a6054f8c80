"""The Gemma 4 vision tower of DiffusionGemma, read from an mmproj GGUF (gguf/mmproj.py): image
patches -> soft tokens in the text model's embedding space, as transformers 5.23.0's
`Gemma4VisionModel` + `DiffusionGemmaMultimodalEmbedder` compute them.

How it differs from a SigLIP ViT: pixels map to [-1, 1] inside the model (2 * (p - 0.5)); the
patch position is a learned (x, y) table lookup *plus* a 2-D RoPE on q and k (the first half of
each head rotates with the column, the second with the row, rotate-half style, base 100); q and k
have weighted RMSNorms, v an unweighted one; attention scale 1.0; each block has four RMSNorms
(before and after attention and MLP); no final norm. After the blocks, each pooling x pooling
square of patches is averaged into one soft token, scaled by sqrt(H), optionally standardised
((x - bias) * scale), RMS-normed without weight and projected to the text width. With
`use_clipped_linears` every linear clamps its input and output to stored bounds.

transformers pads the patches of an image to the budget and masks the padding; here only the
real patches run, which is the same computation.

Legend: N patches, H tower width, D head dim, Nh heads, F MLP width, S soft tokens, E text width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..compute import ops
from ..compute.backend import DTYPES, default_dtype
from ..errors import InputError
from ..gguf import mmproj as fmt
from ..gguf.qtensor import QTensor
from ..gguf.reader import GGUFFile, open_gguf
from .layers import attention, rms, rotate_half
from .weights import SUPPORTED_QTYPES


@dataclass
class VisionConfig:
    n_layer: int
    n_embd: int                  # H
    n_ff: int                    # F
    n_head: int
    n_head_kv: int
    head_dim: int                # D
    patch_size: int
    n_pos: int                   # rows of each (x, y) position table
    proj_dim: int                # E: the text model's hidden size
    eps: float = 1e-6
    pooling: int = fmt.POOLING
    rope_theta: float = fmt.ROPE_THETA
    standardize: bool = False
    clipped: bool = False
    image_mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    image_std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "VisionConfig":
        md = f.metadata
        if f.architecture != fmt.ARCH:
            raise InputError(f"not an mmproj file (architecture {f.architecture!r}, not 'clip')",
                             path=f.path, fix="pass the mmproj-*.gguf made with the model to --mmproj")
        if not md.get("clip.has_vision_encoder", False):
            raise InputError("this mmproj file has no vision encoder", path=f.path,
                             fix="pass the vision mmproj of the model to --mmproj")
        proj = md.get("clip.vision.projector_type", md.get("clip.projector_type"))
        if proj != fmt.PROJECTOR:
            raise InputError(f"the mmproj projector is {proj!r}; diffcli runs Gemma 4 vision "
                             f"({fmt.PROJECTOR!r}) mmproj files", path=f.path,
                             fix="pass the mmproj made from the DiffusionGemma (or Gemma 4) checkpoint")

        def key(name: str, default=None):
            full = f"clip.vision.{name}"
            if full not in md and default is None:
                raise InputError(f"metadata key {full!r} is missing", path=f.path,
                                 fix="the mmproj file is incomplete; convert it again")
            return md.get(full, default)

        for name in ("v.blk.0.attn_q_norm.weight", "v.blk.0.attn_k.weight", "v.position_embd.weight"):
            if name not in f:
                raise InputError(f"tensor {name!r} is missing", path=f.path,
                                 fix="the mmproj file is incomplete; convert it again")
        head_dim = f.info("v.blk.0.attn_q_norm.weight").shape[-1]
        mean, std = list(key("image_mean", [0.0] * 3)), list(key("image_std", [1.0] * 3))
        if len(mean) != 3 or len(std) != 3 or any(s == 0 for s in std):
            raise InputError("clip.vision.image_mean / image_std must be 3 values (std non-zero)",
                             path=f.path, fix="the mmproj file is damaged; convert it again")
        return cls(
            n_layer=int(key("block_count")), n_embd=int(key("embedding_length")),
            n_ff=int(key("feed_forward_length")), n_head=int(key("attention.head_count")),
            n_head_kv=f.info("v.blk.0.attn_k.weight").shape[0] // head_dim, head_dim=head_dim,
            patch_size=int(key("patch_size")), n_pos=f.info("v.position_embd.weight").shape[1],
            proj_dim=int(key("projection_dim")), eps=float(key("attention.layer_norm_epsilon", 1e-6)),
            standardize="v.std_bias" in f, clipped="v.blk.0.attn_q.input_min" in f,
            image_mean=[float(x) for x in mean], image_std=[float(x) for x in std])


def expected_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """GGUF name -> torch-order shape of every tensor the tower reads."""
    hp = fmt.VisionHParams(n_layer=cfg.n_layer, hidden=cfg.n_embd, ff=cfg.n_ff, n_head=cfg.n_head,
                           head_dim=cfg.head_dim, patch_size=cfg.patch_size, n_pos=cfg.n_pos,
                           text_hidden=cfg.proj_dim, eps=cfg.eps, standardize=cfg.standardize,
                           clipped=cfg.clipped)
    shapes = {g: fmt.gguf_shape(g, s, cfg.patch_size) for g, _, s in fmt.tensor_plan(hp)}
    kv = cfg.n_head_kv * cfg.head_dim
    for i in range(cfg.n_layer):
        shapes[f"v.blk.{i}.attn_k.weight"] = shapes[f"v.blk.{i}.attn_v.weight"] = (kv, cfg.n_embd)
    return shapes


def validate(f: GGUFFile, cfg: VisionConfig) -> None:
    shapes = expected_shapes(cfg)
    if cfg.n_head * cfg.head_dim != shapes["v.blk.0.attn_q.weight"][0] or cfg.n_head % cfg.n_head_kv:
        raise InputError("the mmproj's head count does not match its attention tensors", path=f.path,
                         fix="the mmproj file is damaged; convert it again")
    for name, shape in shapes.items():
        if name not in f:
            raise InputError(f"tensor {name!r} is missing", path=f.path,
                             fix="the mmproj file is incomplete; convert it again")
        info = f.info(name)
        if info.qtype not in SUPPORTED_QTYPES:
            raise InputError(f"tensor {name!r} has type {info.qtype}, which diffcli cannot run",
                             path=f.path, fix="convert the mmproj again (f16, bf16 or q8_0)")
        if tuple(info.shape) != tuple(shape):
            raise InputError(f"tensor {name!r} has shape {list(info.shape)}, the metadata implies "
                             f"{list(shape)}", path=f.path,
                             fix="the mmproj's metadata and tensors disagree; convert it again")
    # a Gemma 4 mmproj may also carry an audio encoder (`a.*`, `mm.a.*`): not ours to run
    unknown = sorted(n for n in set(f.tensor_names) - set(shapes) if not n.startswith(("a.", "mm.a.")))
    if unknown:
        raise InputError(f"the mmproj has {len(unknown)} tensors diffcli does not know, e.g. "
                         f"{unknown[0]!r}", path=f.path,
                         fix="this mmproj is for another vision tower; use the one made with the model")


@dataclass
class VisionLayer:
    ln1: torch.Tensor
    wq: QTensor
    wk: QTensor
    wv: QTensor
    wo: QTensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    attn_post_norm: torch.Tensor
    ln2: torch.Tensor
    gate: QTensor
    up: QTensor
    down: QTensor
    ffn_post_norm: torch.Tensor
    clamps: dict[str, tuple[float, float, float, float]]    # kind -> in_min, in_max, out_min, out_max


class VisionTower:
    """Soft tokens for images: `embed(pixels, grid)`."""

    def __init__(self, config: VisionConfig, f: GGUFFile, device: torch.device, dtype: torch.dtype):
        self.config, self.device, self.dtype, self.path = config, device, dtype, f.path
        cfg = config

        def floats(name: str) -> torch.Tensor:
            return f.tensor(name).dequantize(torch.float32).to(device)

        def matrix(name: str) -> QTensor:
            return f.tensor(name).to(device)

        kernel = f.tensor("v.patch_embd.weight").dequantize(torch.float32)     # [H, 3, p, p]
        self.patch = fmt.patch_kernel_to_linear(kernel).contiguous().to(device, dtype)   # [H, p*p*3]
        self.pos = floats("v.position_embd.weight")                             # [2, n_pos, H]
        self.std = (floats("v.std_bias"), floats("v.std_scale")) if cfg.standardize else None
        self.proj = matrix("mm.input_projection.weight")                        # [E, H]
        self.layers = []
        for i in range(cfg.n_layer):
            b = f"v.blk.{i}."
            clamps = {}
            if cfg.clipped:
                for kind in fmt.CLIPPED:
                    clamps[kind] = tuple(float(floats(f"{b}{kind}.{c}")[0]) for c in fmt.CLAMPS)
            self.layers.append(VisionLayer(
                ln1=floats(b + "ln1.weight"), wq=matrix(b + "attn_q.weight"), wk=matrix(b + "attn_k.weight"),
                wv=matrix(b + "attn_v.weight"), wo=matrix(b + "attn_out.weight"),
                q_norm=floats(b + "attn_q_norm.weight"), k_norm=floats(b + "attn_k_norm.weight"),
                attn_post_norm=floats(b + "attn_post_norm.weight"), ln2=floats(b + "ln2.weight"),
                gate=matrix(b + "ffn_gate.weight"), up=matrix(b + "ffn_up.weight"),
                down=matrix(b + "ffn_down.weight"), ffn_post_norm=floats(b + "ffn_post_norm.weight"),
                clamps=clamps))
        # axial RoPE: head_dim / 4 frequencies, shared by the x and y halves of each head
        half = cfg.head_dim // 2
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32,
                                                               device=device) / half))

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """pixels [N, p*p*3] in [0, 1] (patches in row-major order over a `grid` of rows x cols
        patches) -> soft tokens [S, E] float32, S = N / pooling**2."""
        cfg = self.config
        rows, cols = grid
        k = cfg.pooling
        N = rows * cols
        if pixels.shape != (N, cfg.patch_size ** 2 * 3) or rows % k or cols % k:
            raise ValueError(f"pixels {tuple(pixels.shape)} do not fit a {rows}x{cols} patch grid "
                             f"of {cfg.patch_size}px patches pooled by {k}")
        if rows > cfg.n_pos or cols > cfg.n_pos:
            raise InputError(f"the image is {cols}x{rows} patches; the vision tower's position "
                             f"table has {cfg.n_pos}", path=self.path, fix="use a smaller image budget")
        x = pixels.to(self.device, torch.float32)
        mean = torch.tensor(cfg.image_mean, device=self.device).repeat(cfg.patch_size ** 2)
        std = torch.tensor(cfg.image_std, device=self.device).repeat(cfg.patch_size ** 2)
        x = (x - mean) / std if cfg.image_mean != [0.0] * 3 or cfg.image_std != [1.0] * 3 else x
        x = (2 * (x - 0.5)).to(self.dtype)                                      # [N, p*p*3]
        idx = torch.arange(N, device=self.device)
        ys, xs = idx // cols, idx % cols                                        # [N] row, column
        h = x @ self.patch.t()                                                  # [N, H]
        h = h + (self.pos[0][xs] + self.pos[1][ys]).to(h.dtype)
        rope = self._rope(xs, ys)
        for lw in self.layers:
            h = self._layer(lw, h, rope)
        h = h.float().view(rows // k, k, cols // k, k, cfg.n_embd).mean(dim=(1, 3))   # [S', S'', H]
        h = h.reshape(-1, cfg.n_embd) * math.sqrt(cfg.n_embd)                  # [S, H] fp32
        if self.std is not None:
            h = (h - self.std[0]) * self.std[1]
        h = rms(h.to(self.dtype), eps=cfg.eps)                                  # embedder pre-norm
        return ops.qlinear(h, self.proj).float()                                # [S, E]

    def _rope(self, xs: torch.Tensor, ys: torch.Tensor):
        """cos, sin [N, 1, D]: the first D/2 dims rotate with the column, the last D/2 with the row."""
        ax = xs[:, None].float() * self.inv_freq                                # [N, D/4]
        ay = ys[:, None].float() * self.inv_freq
        angles = torch.cat([ax, ax, ay, ay], dim=-1)                            # [N, D]
        return angles.cos()[:, None, :], angles.sin()[:, None, :]

    @staticmethod
    def _rotate(x: torch.Tensor, rope) -> torch.Tensor:
        cos, sin = rope
        half = x.shape[-1] // 2
        xf = x.float()
        parts = [xf[..., :half], xf[..., half:]]
        c, s = (cos[..., :half], cos[..., half:]), (sin[..., :half], sin[..., half:])
        out = [p * c[j] + rotate_half(p) * s[j] for j, p in enumerate(parts)]
        return torch.cat(out, dim=-1).to(x.dtype)

    def _lin(self, x: torch.Tensor, w: QTensor, clamp) -> torch.Tensor:
        if clamp is None:
            return ops.qlinear(x, w)
        in_min, in_max, out_min, out_max = clamp
        return ops.qlinear(x.clamp(in_min, in_max), w).clamp(out_min, out_max)

    def _layer(self, lw: VisionLayer, x: torch.Tensor, rope) -> torch.Tensor:
        cfg, c = self.config, lw.clamps
        N, D, eps = x.shape[0], cfg.head_dim, cfg.eps
        h = rms(x, lw.ln1, eps)
        q = self._lin(h, lw.wq, c.get("attn_q")).view(N, cfg.n_head, D)
        k = self._lin(h, lw.wk, c.get("attn_k")).view(N, cfg.n_head_kv, D)
        v = self._lin(h, lw.wv, c.get("attn_v")).view(N, cfg.n_head_kv, D)
        q = self._rotate(rms(q, lw.q_norm, eps), rope)
        k = self._rotate(rms(k, lw.k_norm, eps), rope)
        v = rms(v, eps=eps)
        a = attention(q, k.transpose(0, 1), v.transpose(0, 1), None)             # [N, Nh*D]
        x = x + rms(self._lin(a, lw.wo, c.get("attn_out")), lw.attn_post_norm, eps)
        m = rms(x, lw.ln2, eps)
        m = F.gelu(self._lin(m, lw.gate, c.get("ffn_gate")), approximate="tanh") \
            * self._lin(m, lw.up, c.get("ffn_up"))
        return x + rms(self._lin(m, lw.down, c.get("ffn_down")), lw.ffn_post_norm, eps)


def load_vision(path: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype | str | None = None) -> VisionTower:
    """Open an mmproj GGUF and build the tower on `device` (dtype as `load`: a torch dtype or a
    name; default the device's activation dtype)."""
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else DTYPES.get(dtype)
    f = open_gguf(path)
    cfg = VisionConfig.from_gguf(f)
    validate(f, cfg)
    return VisionTower(cfg, f, device, dtype or default_dtype(device, text=False))


def check_pair(tower: VisionTower, model_config) -> None:
    """The tower must project into the text model's width."""
    if tower.config.proj_dim != model_config.n_embd:
        raise InputError(f"this mmproj projects images to width {tower.config.proj_dim}, but the "
                         f"model's hidden size is {model_config.n_embd}", path=tower.path,
                         fix="pass the mmproj made from the same checkpoint as the model")
