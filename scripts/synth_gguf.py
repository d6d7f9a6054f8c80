#!/usr/bin/env python
"""Synthesize a diffusion-gemma GGUF with the real tensor names, shapes and quant types (spec §A)
and random but valid blocks, for benchmarks and load tests. Nothing is downloaded.

    python scripts/synth_gguf.py out.gguf                       # full 26B-A4B, Q4_K_M mix (~16.8 GB)
    python scripts/synth_gguf.py out.gguf --type Q8_0           # Q8_0 variant (~26.9 GB)
    python scripts/synth_gguf.py out.gguf --layers 6            # real per-layer shapes, 6 layers
    python scripts/synth_gguf.py out.gguf --tiny                # tiny shapes for CPU smoke runs

The data is streamed: each quant type gets a pool of valid blocks (random bytes, small finite f16
scales) and every tensor is written as a run of pool blocks from a random start, so writing costs
about what the disk does and memory stays at a few tens of MB. Values are uniform noise of about
the magnitude of real weights (|w| <~ 0.05), so activations stay finite; the text is gibberish.

Q4_K_M type mix (spec §A.4): Q4_K by default; `token_embd` Q6_K; `*down*` tensors fall back from
K-quants (their in-features 2112/704 are not multiples of 256) to Q5_0, or Q8_0 on the layers
llama-quantize gives more bits (first and last eighth, every third between); `attn_v` Q6_K on the
same pattern over the sliding layers; norms, scalars, router and rope_freqs F32.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

ARCH = "diffusion-gemma"
# Bumped when what a given command line writes changes (benchmarks key their cached file on it).
FORMAT_VERSION = 2
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class Dims:
    n_layer: int = 30
    H: int = 2816            # hidden
    F: int = 2112            # dense and self-conditioning MLP width
    Fe: int = 704            # expert width
    E: int = 128             # experts
    A: int = 8               # active experts
    Nq: int = 16             # query heads
    hd: int = 512            # global head dim
    hd_swa: int = 256        # sliding head dim
    nkv: int = 2             # global KV heads
    nkv_swa: int = 8         # sliding KV heads
    V: int = 262_144         # vocab
    W: int = 1024            # sliding window
    period: int = 6          # layer i is global when (i+1) % period == 0
    canvas: int = 256

    def sliding(self, i: int) -> bool:
        return (i + 1) % self.period != 0


# Every K a K-quant meets is a multiple of 256 (H, Nq*hd_swa, Nq*hd); F and Fe are not, as in the
# real model, so the down projections take the 32-value fallback types.
TINY = Dims(n_layer=2, H=256, F=160, Fe=96, E=8, A=2, Nq=4, hd=128, hd_swa=64, nkv=1, nkv_swa=2,
            V=512, W=64, period=2, canvas=32)

# (low, high) of the uniform f16 scale fields per type, chosen so |w| stays around 0.01-0.05
SCALES = {"Q8_0": (5e-5, 3e-4), "Q5_0": (5e-4, 3e-3), "Q4_K": (1e-5, 5e-5), "Q6_K": (1e-6, 6e-6)}
F16_FIELDS = {"Q8_0": (0,), "Q5_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


def more_bits(i: int, n: int) -> bool:
    """llama-quantize's rule for the layers that get the larger type (spec §A.4)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_plan(d: Dims, qtype: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, torch-order shape, ggml type) for every tensor of the file, in writing order."""
    q4 = qtype == "Q4_K_M"

    def t(main: str) -> str:
        return main if q4 else "Q8_0"

    plan = [("token_embd.weight", (d.V, d.H), t("Q6_K")),
            ("output_norm.weight", (d.H,), "F32"),
            ("rope_freqs.weight", (d.hd // 2,), "F32"),
            ("self_cond_pre_norm.weight", (d.H,), "F32"),
            ("self_cond_gate.weight", (d.F, d.H), t("Q4_K")),
            ("self_cond_up.weight", (d.F, d.H), t("Q4_K")),
            ("self_cond_down.weight", (d.H, d.F), t("Q5_0"))]
    n_sliding = sum(d.sliding(i) for i in range(d.n_layer))
    v_index = 0
    for i in range(d.n_layer):
        sl = d.sliding(i)
        hd, nkv = (d.hd_swa, d.nkv_swa) if sl else (d.hd, d.nkv)
        down = t("Q8_0" if more_bits(i, d.n_layer) else "Q5_0")
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (d.H,), "F32"),
                 (p + "attn_q.weight", (d.Nq * hd, d.H), t("Q4_K")),
                 (p + "attn_k.weight", (nkv * hd, d.H), t("Q4_K"))]
        if sl:
            plan.append((p + "attn_v.weight", (nkv * hd, d.H),
                         t("Q6_K" if more_bits(v_index, n_sliding) else "Q4_K")))
            v_index += 1
        plan += [(p + "attn_output.weight", (d.H, d.Nq * hd), t("Q4_K")),
                 (p + "attn_q_norm.weight", (hd,), "F32"),
                 (p + "attn_k_norm.weight", (hd,), "F32"),
                 (p + "post_attention_norm.weight", (d.H,), "F32"),
                 (p + "ffn_norm.weight", (d.H,), "F32"),
                 (p + "ffn_gate.weight", (d.F, d.H), t("Q4_K")),
                 (p + "ffn_up.weight", (d.F, d.H), t("Q4_K")),
                 (p + "ffn_down.weight", (d.H, d.F), down),
                 (p + "post_ffw_norm_1.weight", (d.H,), "F32"),
                 (p + "pre_ffw_norm_2.weight", (d.H,), "F32"),
                 (p + "ffn_gate_inp.weight", (d.E, d.H), "F32"),
                 (p + "ffn_gate_inp.scale", (d.H,), "F32"),
                 (p + "ffn_gate_up_exps.weight", (d.E, 2 * d.Fe, d.H), t("Q4_K")),
                 (p + "ffn_down_exps.weight", (d.E, d.H, d.Fe), down),
                 (p + "ffn_down_exps.scale", (d.E,), "F32"),
                 (p + "post_ffw_norm_2.weight", (d.H,), "F32"),
                 (p + "post_ffw_norm.weight", (d.H,), "F32"),
                 (p + "layer_output_scale.weight", (1,), "F32"),
                 (p + "enc_layer_output_scale.weight", (1,), "F32")]
    return plan


def nbytes(shape: tuple[int, ...], qtype: str) -> int:
    per, bsize = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return int(np.prod(shape)) // per * bsize


def block_pool(qtype: str, rng: np.random.Generator, nblocks: int = 1 << 16) -> np.ndarray:
    """[nblocks, block bytes] of valid blocks: random bytes, then the f16 scales overwritten."""
    _, bsize = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    pool = rng.integers(0, 256, size=(nblocks, bsize), dtype=np.uint8)
    lo, hi = SCALES[qtype]
    for off in F16_FIELDS[qtype]:
        pool[:, off:off + 2] = rng.uniform(lo, hi, nblocks).astype(np.float16).view(np.uint8) \
            .reshape(nblocks, 2)
    return pool


def f32_values(name: str, shape: tuple[int, ...], d: Dims, rng: np.random.Generator) -> np.ndarray:
    n = int(np.prod(shape))
    if name == "rope_freqs.weight":     # 'proportional' rope: n_rot pairs rotated, the rest not
        n_rot = int(d.hd * 0.25) // 2
        return np.array([1.0] * n_rot + [1e30] * (n - n_rot), dtype=np.float32)
    if name.endswith("ffn_gate_inp.weight"):
        return rng.normal(0, 0.02, n).astype(np.float32).reshape(shape)
    if name.endswith("output_scale.weight"):
        return rng.uniform(0.5, 1.0, n).astype(np.float32)
    return rng.uniform(0.8, 1.2, n).astype(np.float32).reshape(shape)   # norm weights, scales


def word_pieces(n: int) -> list[str]:
    """n pieces "▁a".."▁z", "▁aa".., "▁aaa".. in length-then-alphabetical order: every piece's
    prefix one letter shorter comes before it, so each has exactly one merge making it."""
    out, level = [], ["\u2581"]
    while len(out) < n:
        level = [w + c for w in level for c in LETTERS]
        out += level[:n - len(out)]
    return out


def prompt_text(n_words: int) -> str:
    """A text of n_words words that a file written with merges=True tokenizes to one piece each
    (three-letter words, each after a space)."""
    words = [p[1:] for p in word_pieces(26 + 26 * 26 + 26 ** 3)[26 + 26 * 26:]]
    return "".join(" " + words[(i * 7919) % len(words)] for i in range(n_words))


def add_metadata(w: GGUFWriter, d: Dims, qtype: str, merges: bool = False) -> None:
    a = ARCH
    w.add_string("general.type", "model")
    w.add_string("general.name", f"synthetic diffusion-gemma ({d.n_layer} layers, {qtype})")
    w.add_uint32("general.file_type", 15 if qtype == "Q4_K_M" else 7)
    w.add_uint32("general.quantization_version", 2)
    sl = [d.sliding(i) for i in range(d.n_layer)]
    u32 = {"block_count": d.n_layer, "context_length": 262_144, "embedding_length": d.H,
           "feed_forward_length": d.F, "attention.head_count": d.Nq, "expert_count": d.E,
           "expert_used_count": d.A, "attention.key_length": d.hd, "attention.value_length": d.hd,
           "attention.sliding_window": d.W, "attention.shared_kv_layers": 0,
           "embedding_length_per_layer_input": 0, "attention.key_length_swa": d.hd_swa,
           "attention.value_length_swa": d.hd_swa, "expert_feed_forward_length": d.Fe,
           "rope.dimension_count": d.hd, "rope.dimension_count_swa": d.hd_swa}
    for k, v in u32.items():
        w.add_uint32(f"{a}.{k}", v)
    w.add_array(f"{a}.attention.head_count_kv", [d.nkv_swa if s else d.nkv for s in sl])
    w.add_array(f"{a}.attention.sliding_window_pattern", sl)
    w.add_float32(f"{a}.rope.freq_base", 1_000_000.0)
    w.add_float32(f"{a}.rope.freq_base_swa", 10_000.0)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.final_logit_softcapping", 30.0)
    w.add_bool(f"{a}.attention.causal", False)
    w.add_uint32("diffusion.canvas_length", d.canvas)
    # a minimal tokenizer: the special tokens where the real vocabulary has them, byte tokens,
    # then unique filler pieces; no merges
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    pieces = special + [f"<0x{b:02X}>" for b in range(256)]
    merge_list = []
    if merges:
        # real vocabulary entries and the merges that build them (llama.cpp refuses a BPE file
        # without merges): "▁" and the letters, then "▁a".."▁zzzz" (one merge each)
        words = word_pieces(d.V - len(pieces) - 1 - len(LETTERS))
        pieces += ["\u2581"] + list(LETTERS) + words
        merge_list = [f"{p[:-1]} {p[-1]}" for p in words]
    pieces += [f"tok{i}" for i in range(len(pieces), d.V)]
    types = [3] * len(special) + [6] * 256 + [1] * (d.V - len(special) - 256)
    w.add_tokenizer_model("gemma4")
    w.add_token_list(pieces[:d.V])
    if merge_list:
        w.add_token_merges(merge_list)
    w.add_token_types(types[:d.V])
    w.add_token_scores([0.0] * d.V)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_uint32("tokenizer.ggml.mask_token_id", 4)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)


def synthesize(path: str, qtype: str = "Q4_K_M", layers: int | None = None, tiny: bool = False,
               seed: int = 0, log=print, merges: bool = False) -> int:
    """Write the file; returns its tensor-data size in bytes. merges: a BPE vocabulary of real
    pieces with the merges that build them (see add_metadata), as llama.cpp needs."""
    d = Dims(**vars(TINY)) if tiny else Dims()
    if layers is not None:
        d.n_layer = layers
    rng = np.random.default_rng(seed)
    plan = tensor_plan(d, qtype)
    w = GGUFWriter(path, ARCH)
    add_metadata(w, d, qtype, merges)
    for name, shape, t in plan:
        if t == "F32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, t))
        else:
            per, _ = GGML_QUANT_SIZES[GGMLQuantizationType[t]]
            byte_shape = shape[:-1] + (shape[-1] // per * GGML_QUANT_SIZES[GGMLQuantizationType[t]][1],)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes(shape, t),
                              raw_dtype=GGMLQuantizationType[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    pools = {t: block_pool(t, rng) for t in {t for _, _, t in plan if t != "F32"}}
    total, t0 = 0, time.time()
    for name, shape, t in plan:
        w.write_padding(fout, fout.tell())
        size = nbytes(shape, t)
        if t == "F32":
            f32_values(name, shape, d, rng).tofile(fout)
        else:
            pool = pools[t]
            left = size // pool.shape[1]                  # blocks still to write
            start = int(rng.integers(0, pool.shape[0]))
            while left:
                n = min(left, pool.shape[0] - start)
                pool[start:start + n].tofile(fout)
                left -= n
                start = 0
        w.write_padding(fout, size)
        total += size
    w.close()
    log(f"{path}: {len(plan)} tensors, {total / 1e9:.2f} GB of tensor data, "
        f"{d.n_layer} layers, {qtype}, {time.time() - t0:.1f} s")
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="GGUF file to write")
    ap.add_argument("--type", default="Q4_K_M", choices=["Q4_K_M", "Q8_0"])
    ap.add_argument("--layers", type=int, default=None, help="number of layers (default 30)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merges", action="store_true",
                    help="a BPE vocabulary with merges (llama.cpp refuses a file without them)")
    args = ap.parse_args(argv)
    synthesize(args.out, args.type, args.layers, args.tiny, args.seed, merges=args.merges)
    return 0


if __name__ == "__main__":
    sys.exit(main())
