"""DiffusionGemma: one weight set run two ways (spec §B).

- `encode` / `commit` (the encoder): causal over the prompt and every committed canvas; appends
  each layer's K/V to a KVCache (cache.py).
- `denoise` (the decoder): one step over the canvas, bidirectional, reading the cache and never
  writing it; adds self-conditioning from the previous step's tempered logits.
- `denoise_fused`: the same step ending in the fused vocabulary head of kernels/vocab.py, which
  also returns the sampler's statistics and the next step's self-conditioning input (used by
  generation where `use_fused_head`: a Triton head).

Both passes share every weight except the per-layer output scalar. How a layer differs from
Gemma 4: attention scale 1.0; V = rms(K projection) without weight, and global layers have no
V projection at all (V is the raw K projection); a dense MLP and routed experts run side by side
on the same residual and are summed, each with its own norms; the whole layer output (residual
included) is multiplied by a scalar.

Numerics: norms, RoPE, the router, softmaxes and the logit softcap run in float32; matmuls take
the activation dtype (float32 on CPU, bfloat16 on accelerators by default) and accumulate in
float32; the LM head's output is cast to float32 before the softcap, as in transformers.

Legend: C canvas, P prefix (tokens in the cache), T tokens in this pass, L keys attended,
H hidden, V vocab, F dense width, E experts, A active experts, Nq query heads, Nkv KV heads,
D head dim.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..compute import graphs, ops
from ..compute.backend import (_triton_available, backend_for, cpu_kernels, default_dtype,
                               return_freed_memory, triton_interpret)
from ..gguf.qtensor import QTensor
from .cache import KVCache
from .config import ModelConfig
from .images import ImageSpan, check_spans, chunk_bounds, image_blocks, in_chunk, place
from .layers import attention, rms, rms_rope, softcap_
from .weights import LayerWeights, Weights


class DiffusionGemma:
    """`device` is the head's (embedding, self-conditioning, logits); `layer_devices[i]` holds
    layer i's activations, norms and KV cache (see placement.py). `dtypes` maps a device to its
    activation dtype; `dtype` is the head's."""

    def __init__(self, config: ModelConfig, weights: Weights, device: torch.device,
                 dtype: torch.dtype, cache_embedding: bool,
                 layer_devices: list[torch.device] | None = None,
                 dtypes: dict[torch.device, torch.dtype] | None = None):
        self.config, self.w, self.device, self.dtype = config, weights, device, dtype
        self.layer_devices = list(layer_devices or [device] * config.n_layer)
        self.dtypes = dict(dtypes or {})
        self.dtypes.setdefault(device, dtype)
        self.cache_embedding = cache_embedding
        self.prefill_chunk = 1024
        self.fused_head = True          # generation may use the fused head (see use_fused_head)
        self.cuda_graphs = graphs.enabled_by_env()   # replay the step as a graph (graphs.py)
        self._step_graph: graphs.StepGraph | None = None
        self._on_one_gpu: bool | None = None    # every layer and weight on `device` (CUDA)
        self._embed_dense: torch.Tensor | None = None
        cfg = config
        # Inverse RoPE frequencies per layer type (pairs (j, j + D/2), rotate-half style).
        # Global layers: "proportional" RoPE, recovered from rope_freqs: the frequency is divided
        # by the stored factor, so 1e30 entries leave those pairs (almost exactly) unrotated,
        # as llama.cpp does; the exponent's denominator is the full head dim.
        self.inv_freq = {
            "sliding": self._inv_freq(cfg.rope_theta_swa, cfg.head_dim_swa),
            "full": self._inv_freq(cfg.rope_theta, cfg.head_dim) / weights.rope_freqs,
        }

    def _inv_freq(self, theta: float, dim: int) -> torch.Tensor:
        exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=self.device) / dim
        return 1.0 / (theta ** exponent)                               # [D/2]

    # -- public API ---------------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        cfg = self.config
        empty = [torch.empty(cfg.n_head_kv[i], 0, cfg.layer_head_dim(i), device=dev,
                             dtype=self.dtype_on(dev)) for i, dev in enumerate(self.layer_devices)]
        return KVCache(empty, list(empty), list(cfg.swa_pattern), cfg.sliding_window)

    @torch.inference_mode()
    def encode(self, prompt_ids: torch.Tensor, images: Sequence[ImageSpan] = ()) -> KVCache:
        """Prefill: run the prompt through the encoder into a fresh cache. `images`: soft tokens
        standing at spans of the prompt (model/images.py)."""
        return self.commit(self.new_cache(), prompt_ids, **({"images": images} if images else {}))

    @torch.inference_mode()
    def commit(self, cache: KVCache, block_ids: torch.Tensor,
               images: Sequence[ImageSpan] = ()) -> KVCache:
        """Append tokens (a finished canvas) at positions P..P+T-1 through the encoder, in place.

        Long inputs run in chunks of `prefill_chunk` tokens: the encoder is causal, so this is
        exact, and it bounds the attention scores and MoE activations of a long prompt. An image
        block is never cut by a chunk boundary (it attends to itself both ways)."""
        if self._step_graph is not None:
            self._step_graph.drop()     # its cache is stale now: free the graph's memory early
        ids = self._ids(block_ids)
        spans = check_spans(images, ids.numel(), self.config.n_embd)
        for lo, hi in chunk_bounds(ids.numel(), self.prefill_chunk, spans):
            self._encode_chunk(cache, ids[lo:hi], in_chunk(spans, lo, hi))
        if self.device.type == "cpu":
            return_freed_memory()
        return cache

    def _encode_chunk(self, cache: KVCache, ids: torch.Tensor,
                      images: Sequence[ImageSpan] = ()) -> None:
        T, P, W = ids.numel(), cache.length, self.config.sliding_window
        pos = torch.arange(P, P + T, device=self.device)                # [T]
        x = self.embed(ids) * math.sqrt(self.config.n_embd)            # [T, H]
        x = place(x, images)                                            # soft tokens, unscaled
        rope = self._rope(pos)
        blocks = image_blocks(T, images, self.device)                    # [T] or None
        # Causal masks (True = may attend), OR "same image block". Cached keys sit at positions
        # P-len..P-1 and are never in a block of this chunk.
        masks = {}
        for kind, cached in (("full", P), ("sliding", min(P, W - 1))):
            kpos = torch.arange(P - cached, P + T, device=self.device)  # [L]
            mask = kpos[None, :] <= pos[:, None]                        # [T, L]
            if kind == "sliding":
                mask &= kpos[None, :] > pos[:, None] - W
            if blocks is not None:
                mask[:, cached:] |= (blocks[:, None] == blocks[None, :]) & (blocks[:, None] >= 0)
            masks[kind] = mask
        last = self.config.n_layer - 1
        where = _PerDevice(rope, masks)
        for i, lw in enumerate(self.w.layers):
            kind = self.config.layer_types[i]
            x, rope, masks = self._to_layer(i, x, where)
            q, k, v = self._qkv(i, lw, x, rope[kind])
            k_all = torch.cat([cache.keys[i], k], dim=1)                # [Nkv, L, D]
            v_all = torch.cat([cache.values[i], v], dim=1)
            cache.append(i, k, v)
            if i == last:
                break    # only the K/V are needed downstream: skip the last layer's FFN
            x = self._layer(lw, x, q, k_all, v_all, masks[kind], lw.enc_scale)
        cache.length = P + T

    @torch.inference_mode()
    def denoise(self, cache: KVCache, canvas_ids: torch.Tensor,
                sc_logits: torch.Tensor | None = None, *,
                sc_soft: torch.Tensor | None = None) -> torch.Tensor:
        """One denoising step: canvas ids [C] (+ previous step's tempered logits [C, V]) ->
        softcapped float32 logits [C, V]. Reads the cache, never writes it.

        `sc_soft` [C, H] replaces `sc_logits` with the soft embedding already made from them,
        softmax(sc_logits).to(E.dtype) @ E before the sqrt(H) scale (VocabOut.soft of the
        previous step's fused head); the two are mutually exclusive."""
        x, E = self._decode(cache, canvas_ids, sc_logits, sc_soft)
        if E is None and self.cache_embedding:
            E = self._dense_embedding()
        if E is not None:
            logits = (x.to(E.device, E.dtype) @ E.t()).to(self.device).float()   # [C, V]
        elif self.w.embed.device == x.device:
            logits = ops.qlinear_float(x, self.w.embed)
        else:
            logits = self._lin(x, self.w.embed).float()
        return softcap_(logits, self.config.final_logit_softcap)

    @torch.inference_mode()
    def denoise_fused(self, cache: KVCache, canvas_ids: torch.Tensor, temperature: float,
                      sc_soft: torch.Tensor | None = None, *, tempered_logits: bool = True):
        """`denoise` with the fused vocabulary head (kernels/vocab.py): one step, then in one go
        the softcapped logits, their argmax, logsumexp and entropy at `temperature`, and the soft
        embedding the next step's self-conditioning takes (`sc_soft`). Returns a VocabOut on the
        head's device: logits [C, V] fp32 (divided by `temperature` when `tempered_logits`),
        argmax/lse/entropy [C] of logits / temperature, soft [C, H] fp32 (where E lives).
        Needs a Triton-capable head (`use_fused_head`)."""
        x, E = self._decode(cache, canvas_ids, None, sc_soft)
        if self.w.embed.device.type == "cpu" and backend_for("cpu") == "native":
            from ..compute import vocab as cpu_vocab      # CpuVocabOut: probs instead of logits
            if E is None:
                E = self._dense_embedding() if self.cache_embedding else self.w.embed
            return cpu_vocab.vocab_head(x, E, self.config.final_logit_softcap, float(temperature))
        from ..kernels.vocab import VocabOut, vocab_head
        if E is None:
            E = self._dense_embedding()                                # [V, H]
        out = vocab_head(x.to(E.device, E.dtype), E, self.config.final_logit_softcap,
                         float(temperature), write_logits=True, tempered_logits=tempered_logits)
        if E.device == self.device:
            return out
        move = lambda t: t.to(self.device)
        return VocabOut(move(out.logits), move(out.argmax), move(out.lse), move(out.entropy),
                        out.soft)

    def _decode(self, cache: KVCache, canvas_ids: torch.Tensor, sc_logits: torch.Tensor | None,
                sc_soft: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder pass up to the head: the final normed hidden state [C, H] on the head's
        device, and the dense embedding if self-conditioning already fetched it (else None).
        Steps with self-conditioning replay a CUDA graph where `step_graph` allows one."""
        if sc_logits is not None and sc_soft is not None:
            raise ValueError("pass sc_logits or sc_soft, not both")
        ids = self._ids(canvas_ids)
        E = None
        if sc_logits is not None and not self.cache_embedding and self._embed_blocks_native():
            # straight from the embedding's blocks (native kernel): no dense [V, H] copy
            from ..compute import vocab as cpu_vocab
            sc = sc_logits.to(self.w.embed.device)
            if self.dtype == torch.bfloat16:   # softmax straight to bf16 in one native pass
                probs = cpu_vocab.softmax_bf16(sc)                                   # [C, V]
            else:
                probs = torch.softmax(sc.float(), dim=-1)                            # [C, V]
            sc_soft = cpu_vocab.soft_embedding(probs.to(self.dtype), self.w.embed)    # [C, H]
        elif sc_logits is not None:
            E = self._dense_embedding()                                # [V, H]
            probs = torch.softmax(sc_logits.to(E.device).float(), dim=-1)   # [C, V]
            sc_soft = probs.to(E.dtype) @ E                            # [C, H]
        graph = self.step_graph if sc_soft is not None else None
        if graph is not None:
            return graph(cache, ids, sc_soft), E
        return self._decode_body(cache, ids, sc_soft), E

    def _decode_body(self, cache: KVCache, ids: torch.Tensor,
                     sc_soft: torch.Tensor | None) -> torch.Tensor:
        """`_decode` from checked device ids [C] and the soft embedding [C, H] (or None): the
        part a CUDA graph captures, so nothing in it may wait for the host (no .item(), no
        data-dependent shapes; tests/test_graphs.py checks the ops it dispatches)."""
        C, P, H = ids.numel(), cache.length, self.config.n_embd
        pos = torch.arange(P, P + C, device=self.device)                # [C]
        e = self.embed(ids) * math.sqrt(H)                             # [C, H]
        if sc_soft is None:
            x = rms(e, eps=self._eps)    # zero soft embedding -> the SC MLP outputs exactly zero
        else:
            soft = sc_soft.to(self.device, self.dtype) * math.sqrt(H)  # [C, H]
            n = rms(soft, self.w.sc_pre_norm, self._eps)
            x = rms(e + self._mlp(n, self.w.sc_gate, self.w.sc_up, self.w.sc_down), eps=self._eps)
        where = _PerDevice(self._rope(pos), {})
        for i, lw in enumerate(self.w.layers):
            x, rope, _ = self._to_layer(i, x, where)
            q, k, v = self._qkv(i, lw, x, rope[self.config.layer_types[i]])
            k_all = torch.cat([cache.keys[i], k], dim=1)                # [Nkv, L, D]
            v_all = torch.cat([cache.values[i], v], dim=1)
            # No mask: every canvas query sees every cached key of its layer (sliding layers hold
            # the last W-1) and the whole canvas, whatever its own position.
            x = self._layer(lw, x, q, k_all, v_all, None, lw.dec_scale)
        return rms(x.to(self.device, self.dtype), self.w.output_norm, self._eps)

    @property
    def step_graph(self) -> graphs.StepGraph | None:
        """The CUDA-graph runner of `_decode_body`, or None where steps run eagerly: graphs off
        (`cuda_graphs`, DIFFCLI_CUDA_GRAPHS=0), or not every weight and layer on one CUDA device
        with the Triton backend (the torch/native paths and split placements wait on the host)."""
        if not self.cuda_graphs:
            return None
        if self._step_graph is None:
            if not self._graphable():
                return None
            self._step_graph = graphs.StepGraph(self._decode_body,
                                                graphs.CudaCapture(self.device))
        return self._step_graph

    def _graphable(self) -> bool:
        dev = self.device
        if dev.type != "cuda" or backend_for("cuda") != "triton" or not _triton_available():
            return False
        if self._on_one_gpu is None:        # placement is fixed at load: scan the weights once
            self._on_one_gpu = all(d == dev for d in self.layer_devices) and \
                all(t.device == dev for _, t in self.w.tensors())
        return self._on_one_gpu

    def denoise_uncached(self, prefix_ids: torch.Tensor, canvas_ids: torch.Tensor,
                         sc_logits: torch.Tensor | None = None, *,
                         sc_soft: torch.Tensor | None = None,
                         images: Sequence[ImageSpan] = ()) -> torch.Tensor:
        """`--diffusion-kv-cache off`: re-encode the whole prefix, then one denoising step.
        Same logits as encode + denoise; costs a full prefix pass per step."""
        return self.denoise(self.encode(prefix_ids, images), canvas_ids, sc_logits, sc_soft=sc_soft)

    def denoise_fused_uncached(self, prefix_ids: torch.Tensor, canvas_ids: torch.Tensor,
                               temperature: float, sc_soft: torch.Tensor | None = None, *,
                               images: Sequence[ImageSpan] = (), **kw):
        """`denoise_fused` with the prefix re-encoded (as `denoise_uncached`)."""
        return self.denoise_fused(self.encode(prefix_ids, images), canvas_ids, temperature,
                                  sc_soft, **kw)

    @property
    def cpu_kernels(self) -> str:
        """What multiplies the CPU-resident weights, for the load line (backend.cpu_kernels)."""
        qtypes = {t.qtype for _, t in self.w.tensors() if isinstance(t, QTensor) and t.device.type == "cpu"}
        return cpu_kernels(self.dtype_on(torch.device("cpu")), qtypes)

    @property
    def use_fused_head(self) -> bool:
        """Whether generation should run the fused vocabulary head (`denoise_fused`): allowed
        (`fused_head`, default True) and the embedding, where the head runs, sits on a CUDA
        device whose backend is triton, or on the CPU with the triton backend forced and
        TRITON_INTERPRET=1 (the tests)."""
        if not self.fused_head:
            return False
        dev = self.w.embed.device
        if dev.type == "cpu" and backend_for("cpu") == "native" and self.dtype == torch.bfloat16:
            from ..compute import vocab as cpu_vocab      # the native CPU head (bf16 mode only)
            return cpu_vocab.available()
        if backend_for(dev.type) != "triton" or not _triton_available():
            return False
        return dev.type == "cuda" or (dev.type == "cpu" and triton_interpret())

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows [T, H] (unscaled), dequantizing only the rows asked for."""
        if self._embed_dense is not None:
            return self._embed_dense[ids.to(self._embed_dense.device)].to(self.device, self.dtype)
        E = self.w.embed
        rows = E.blocks()[ids.to(E.device)]                            # [T, row bytes]
        sub = QTensor(rows.reshape(-1), E.qtype, (ids.numel(), E.shape[-1]), E.name)
        return ops.dequantize(sub, self.dtype, self.device)

    # -- internals ----------------------------------------------------------------------------
    @property
    def _eps(self) -> float:
        return self.config.rms_eps

    def _ids(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        # checked only where it costs no device sync (ids arrive from the CPU-side sampler/tokenizer)
        if ids.device.type == "cpu" and ids.numel() and (
                int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token id out of range [0, {self.config.vocab_size})")
        return ids.to(self.device)

    def _embed_blocks_native(self) -> bool:
        """Whether the native library multiplies by the embedding's own CPU blocks (head and
        self-conditioning without a dense copy)."""
        from ..compute import vocab as cpu_vocab
        return cpu_vocab.blocks_usable(self.w.embed, self.dtype)

    def _dense_embedding(self) -> torch.Tensor:
        """E [V, H] in the activation dtype, for the SC soft embedding (probs @ E) and the head.

        Memory trade-off: V*H elements (262144 x 2816: 1.5 GB in bf16, 3 GB in fp32). With
        `cache_embedding` the copy is kept for the model's lifetime (saves a full dequantization
        per step; the default on accelerators); otherwise it is rebuilt on every step that has
        self-conditioning and freed after it (the CPU default).
        """
        if self._embed_dense is not None:
            return self._embed_dense
        # built where the embedding was placed (an -ot may keep it off the head's device)
        where = self.w.embed.device
        E = ops.dequantize(self.w.embed, self.dtype_on(where), where)
        if self.cache_embedding:
            self._embed_dense = E
        return E

    def _rope(self, pos: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for kind, inv in self.inv_freq.items():
            a = pos[:, None].float() * inv[None, :]                    # [T, D/2]
            a = torch.cat([a, a], dim=-1)                              # [T, D]
            out[kind] = (a.cos()[:, None, :], a.sin()[:, None, :])     # [T, 1, D]
        return out

    def _qkv(self, i: int, lw: LayerWeights, x: torch.Tensor, rope) -> tuple[torch.Tensor, ...]:
        """Normed, roped q [T, Nq, D] and this pass's k, v [Nkv, T, D] for layer i."""
        cfg, (cos, sin) = self.config, rope
        T, D = x.shape[0], cfg.layer_head_dim(i)
        h = rms(x, lw.attn_norm, self._eps)
        q = self._lin(h, lw.wq).view(T, cfg.n_head, D)
        k_raw = self._lin(h, lw.wk).view(T, cfg.n_head_kv[i], D)
        v_raw = self._lin(h, lw.wv).view(T, cfg.n_head_kv[i], D) if lw.wv is not None else k_raw
        q = rms_rope(q, lw.q_norm, self._eps, cos, sin)
        k = rms_rope(k_raw, lw.k_norm, self._eps, cos, sin)
        v = rms(v_raw, eps=self._eps)
        return q, k.transpose(0, 1), v.transpose(0, 1)

    def _layer(self, lw: LayerWeights, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, mask: torch.Tensor | None, scalar: float) -> torch.Tensor:
        """Rest of one layer given its q [T, Nq, D] and the keys/values it sees [Nkv, L, D]."""
        a = attention(q, k, v, mask)                                   # [T, Nq*D]
        x = rms(self._lin(a, lw.wo), lw.post_attn_norm, self._eps, residual=x)
        dense = rms(self._mlp(rms(x, lw.ffn_norm, self._eps), lw.ffn_gate, lw.ffn_up, lw.ffn_down),
                    lw.post_ffn_norm_1, self._eps)                     # [T, H]
        moe = rms(self._experts(lw, x), lw.post_ffn_norm_2, self._eps)   # [T, H]
        # (x + rms(dense + moe)) * scalar
        return rms(dense, lw.post_ffn_norm, self._eps, plus=moe, residual=x, scale=scalar)

    def _experts(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """Routed experts. The router reads the raw residual x, not the normed expert input."""
        H, A = self.config.n_embd, self.config.n_expert_used
        r = rms(x.float(), eps=self._eps) * lw.router_scale * H ** -0.5   # [T, H]
        probs = torch.softmax(r @ lw.router.t(), dim=-1)               # [T, E]
        weights, ids = torch.topk(probs, A, dim=-1)                    # [T, A]
        weights = weights / weights.sum(-1, keepdim=True)              # renormalise, then scale
        weights = weights * lw.exp_scale[ids]
        xe = rms(x, lw.pre_ffn_norm_2, self._eps)                      # [T, H]
        where = lw.exp_gate_up.device
        if where == x.device:
            return ops.moe_experts(xe, lw.exp_gate_up, lw.exp_down, ids, weights)
        # experts kept elsewhere (--n-cpu-moe, -ot): only the [T, H] input and output cross
        out = ops.moe_experts(xe.to(where, self.dtype_on(where)), lw.exp_gate_up, lw.exp_down,
                              ids.to(where), weights.to(where))
        return out.to(x.device, x.dtype)

    # -- placement ----------------------------------------------------------------------------
    def dtype_on(self, device: torch.device) -> torch.dtype:
        """Activation dtype on a device: as given to load(), else backend.default_dtype."""
        if device not in self.dtypes:
            self.dtypes[device] = default_dtype(device)
        return self.dtypes[device]

    def _lin(self, x: torch.Tensor, w: QTensor | torch.Tensor) -> torch.Tensor:
        """ops.qlinear where the weight lives: x crosses to it and the product comes back."""
        if w.device == x.device:
            return ops.qlinear(x, w)
        return ops.qlinear(x.to(w.device, self.dtype_on(w.device)), w).to(x.device, x.dtype)

    def _mlp(self, x: torch.Tensor, gate: QTensor, up: QTensor, down: QTensor) -> torch.Tensor:
        return self._lin(F.gelu(self._lin(x, gate), approximate="tanh") * self._lin(x, up), down)

    def _to_layer(self, i: int, x: torch.Tensor, where: "_PerDevice"):
        """The hidden state, RoPE tables and masks on layer i's device (moved at a boundary)."""
        dev = self.layer_devices[i]
        if x.device != dev:
            x = x.to(dev, self.dtype_on(dev))
        return (x,) + where.on(dev)


class _PerDevice:
    """A pass's RoPE tables and masks, copied to each device the layers use, once per pass."""

    def __init__(self, rope: dict, masks: dict):
        self.copies = {}
        self.rope, self.masks = rope, masks

    def on(self, dev: torch.device) -> tuple[dict, dict]:
        if dev not in self.copies:
            move = lambda d: {k: (tuple(t.to(dev) for t in v) if isinstance(v, tuple) else v.to(dev))
                              for k, v in d.items()}
            self.copies[dev] = (move(self.rope), move(self.masks))
        return self.copies[dev]
