#!/usr/bin/env python
"""Speed and accuracy of diffcli's GPU path, side by side with the torch path, in one run.

    python scripts/bench.py                          # CUDA: full-shape synthetic Q4_K_M model
    python scripts/bench.py --model m.gguf --json out.json --csv out.csv
    python scripts/bench.py --kernels-only --sweep   # kernels at real shapes, tile sweep
    python scripts/bench.py --tiny                   # CPU: tiny shapes (Triton interpreter)

Sections (each a table; --json/--csv write every row):
- kernel: fused qmatmul per real projection shape and type, and the grouped MoE, each against
  the torch path (dequantize, then matmul) for accuracy (max abs and relative error vs an fp32
  matmul on the same dequantized weights) and time (median of CUDA-event timings); "dense" is a
  bf16 matmul on already-dequantized weights, GB/s counts the quantized bytes read once.
  "vocab head" is the fused head of kernels/vocab.py (softcapped logits, argmax, lse, entropy and
  the self-conditioning soft embedding) against the unfused torch sequence vocab_head_torch; its
  errors are those of soft (max_abs_err, rel_err) and of the other outputs (named columns), GB/s
  counts E read twice (one read per pass).
- model: load time, ms per denoising step (with self-conditioning), prefill tokens/s for a 4096-token
  prompt, tokens/s at a fixed 16 and 48 steps per canvas (confidence 0 so no canvas stops early;
  256 emitted tokens per canvas), peak GPU memory. The `head` column says which vocabulary head
  ran: "fused" (kernels/vocab.py via model.denoise_fused: what generation uses on CUDA with the
  triton backend) or "unfused" (model.denoise's torch head, then the sampler's softmax); where
  the fused head is on, the fused step and an "(unfused head)" generate row are added. The
  `graphs` column says whether self-conditioned steps replayed a CUDA graph (diffcli/compute/graphs.py);
  where graphs are possible, steps and generation are also timed with them off.
- share: each kernel's share of one denoising step's GPU time (torch.profiler).

Without CUDA the same code runs at tiny shapes (kernels under TRITON_INTERPRET=1, the model on the
CPU backends), so the script is exercised everywhere; its CPU numbers mean nothing for speed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

import numpy as np  # noqa: E402

import diffcli  # noqa: E402
from diffcli.compute import ops
from diffcli.gguf import quants  # noqa: E402
from diffcli.compute.backend import set_backend  # noqa: E402
from diffcli.gguf.qtensor import QTensor  # noqa: E402
from diffcli.kernels.moe import moe_triton  # noqa: E402
from diffcli.kernels.qmatmul import qmatmul  # noqa: E402
from diffcli.kernels.vocab import vocab_head, vocab_head_torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synth_gguf import SCALES, F16_FIELDS, synthesize  # noqa: E402

# (label, N, K, qtype): every projection shape of spec §B.5 with the types of both real files
REAL_SHAPES = [
    ("attn_q swa", 4096, 2816, "Q4_K"), ("attn_q full", 8192, 2816, "Q4_K"),
    ("attn_k swa", 2048, 2816, "Q4_K"), ("attn_v swa", 2048, 2816, "Q6_K"),
    ("attn_out swa", 2816, 4096, "Q4_K"), ("attn_out full", 2816, 8192, "Q4_K"),
    ("ffn_gate/up", 2112, 2816, "Q4_K"), ("ffn_down", 2816, 2112, "Q5_0"),
    ("ffn_down", 2816, 2112, "Q8_0"), ("attn_q swa", 4096, 2816, "Q8_0"),
    ("ffn_gate/up", 2112, 2816, "Q8_0"), ("lm_head", 262144, 2816, "Q6_K"),
]
TINY_SHAPES = [("proj", 64, 256, "Q4_K"), ("proj", 64, 256, "Q6_K"),
               ("down", 64, 160, "Q5_0"), ("down", 64, 160, "Q8_0")]


def rand_qtensor(qtype: str, shape: tuple[int, ...], device, gen: torch.Generator) -> QTensor:
    """Random valid blocks made on the device (so full-size tensors cost no host time)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    per, bsize = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    nblk = int(np.prod(shape)) // per
    raw = torch.randint(0, 256, (nblk, bsize), dtype=torch.uint8, device=device, generator=gen)
    lo, hi = SCALES[qtype]
    for off in F16_FIELDS[qtype]:
        d = (torch.rand(nblk, device=device, generator=gen) * (hi - lo) + lo).half()
        raw[:, off:off + 2] = d.view(torch.uint8).view(nblk, 2)
    return QTensor(raw.reshape(-1), qtype, tuple(shape), qtype)


def timeit(fn, reps: int) -> float:
    """Median ms of `fn` (CUDA events after a warm-up; wall clock on CPU)."""
    fn()
    times = []
    for _ in range(reps):
        if CUDA:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    y, ref = y.float(), ref.float()
    assert torch.isfinite(y).all(), "non-finite output"
    return (y - ref).abs().max().item(), ((y - ref).norm() / ref.norm()).item()


def bench_qmatmul(shapes, T: int, dtype, device, reps: int, sweep: bool) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for label, N, K, qtype in shapes:
        qt = rand_qtensor(qtype, (N, K), device, gen)
        x = torch.randn(T, K, device=device, generator=gen).to(dtype)
        w = quants.dequantize_torch(qt.raw, qtype).view(N, K)            # fp32 reference weight
        ref = x.float() @ w.t()
        y = qmatmul(x, qt)
        amax, rel = errors(y, ref)
        wd = w.to(dtype)
        t_fused = timeit(lambda: qmatmul(x, qt), reps)
        t_torch = timeit(lambda: x @ quants.dequantize_torch(qt.raw, qtype).to(dtype).view(N, K).t(),
                         reps)
        t_dense = timeit(lambda: x @ wd.t(), reps)
        row = dict(section="kernel", name=f"qmatmul {label}", qtype=qtype, shape=f"{T}x{K}->{N}",
                   max_abs_err=amax, rel_err=rel, fused_ms=t_fused, torch_ms=t_torch,
                   dense_ms=t_dense, speedup_vs_torch=t_torch / t_fused,
                   fused_GBps=qt.nbytes / t_fused / 1e6)
        if sweep:
            best = (t_fused, "default")
            for bm, bn, nw, ns in ((64, 64, 4, 2), (64, 32, 8, 2), (128, 64, 8, 2), (128, 32, 4, 2),
                                   (256, 32, 8, 2), (128, 32, 8, 3), (128, 32, 8, 4), (64, 64, 4, 4)):
                if bm > T:
                    continue
                cfg = f"BM={bm} BN={bn} warps={nw} stages={ns}"
                try:
                    t = timeit(lambda: qmatmul(x, qt, block_m=bm, block_n=bn, num_warps=nw,
                                               num_stages=ns), reps)
                except Exception as exc:    # e.g. OutOfResources (shared memory) for big tiles
                    print(f"  skip {cfg}: {type(exc).__name__}", flush=True)
                    continue
                best = min(best, (t, cfg))
            row.update(best_ms=best[0], best_cfg=best[1])
        rows.append(row)
        print(row, flush=True)
        del qt, w, wd, ref
    return rows


def check_small_t(device, dtype) -> list[dict]:
    """Accuracy only, at the odd row counts the other tile configs serve (T = 1, 7, 33, 100)."""
    gen = torch.Generator(device=device).manual_seed(2)
    rows = []
    for qtype, N, K in (("Q4_K", 96, 512), ("Q6_K", 96, 512), ("Q5_0", 96, 352), ("Q8_0", 96, 352)):
        qt = rand_qtensor(qtype, (N, K), device, gen)
        w = quants.dequantize_torch(qt.raw, qtype).view(N, K)
        for T in (1, 7, 33, 100):
            x = torch.randn(T, K, device=device, generator=gen).to(dtype)
            amax, rel = errors(qmatmul(x, qt), x.float() @ w.t())
            rows.append(dict(section="small", name="qmatmul", qtype=qtype, shape=f"{T}x{K}->{N}",
                             max_abs_err=amax, rel_err=rel))
    for T in (1, 7):
        gu = rand_qtensor("Q4_K", (8, 128, 256), device, gen)
        dn = rand_qtensor("Q5_0", (8, 256, 64), device, gen)
        x = torch.randn(T, 256, device=device, generator=gen).to(dtype)
        w, ids = torch.topk(torch.rand(T, 8, device=device, generator=gen), 2, dim=-1)
        ref = ops.moe_torch(x.float(), quants.dequantize_torch(gu.raw, "Q4_K").view(8, 128, 256),
                            quants.dequantize_torch(dn.raw, "Q5_0").view(8, 256, 64), ids, w)
        amax, rel = errors(moe_triton(x, gu, dn, ids, w), ref)
        rows.append(dict(section="small", name="moe", qtype="Q4_K/Q5_0", shape=f"{T}x256 top2/8",
                         max_abs_err=amax, rel_err=rel))
    return rows


def sweep_moe(x, gu, dn, ids, w, reps: int) -> dict:
    """Best (BM, gate/up (BN, warps), down (BN, warps)) by total time, each kernel swept apart."""
    out = {}
    for which in ("gate_up", "down"):
        best = (float("inf"), None)
        for bm, ns in ((32, 2), (64, 2), (64, 3)):
            for cfg in ((32, 8), (64, 4), (64, 8)):
                kw = {"block_m": bm, f"{which}_cfg": cfg, "num_stages": ns}
                try:
                    t = timeit(lambda: moe_triton(x, gu, dn, ids, w, **kw), reps)
                except Exception as exc:
                    print(f"  skip {kw}: {type(exc).__name__}", flush=True)
                    continue
                best = min(best, (t, f"BM={bm} BN={cfg[0]} warps={cfg[1]} stages={ns}"))
        out[f"best_{which}_ms"], out[f"best_{which}_cfg"] = best
    return out


def bench_moe(T, A, E, K, F, types, dtype, device, reps: int, sweep: bool = False) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(1)
    rows = []
    for gu_t, dn_t in types:
        gu = rand_qtensor(gu_t, (E, 2 * F, K), device, gen)
        dn = rand_qtensor(dn_t, (E, K, F), device, gen)
        x = torch.randn(T, K, device=device, generator=gen).to(dtype)
        probs = torch.softmax(torch.randn(T, E, device=device, generator=gen), -1)
        w, ids = torch.topk(probs, A, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        set_backend("torch")
        try:
            t_torch = timeit(lambda: ops.moe_experts(x, gu, dn, ids, w), max(2, reps // 5))
            ref = ops.moe_torch(x.float(), gu, dn, ids, w)
        finally:
            set_backend(None)
        y = moe_triton(x, gu, dn, ids, w)
        amax, rel = errors(y, ref)
        t_fused = timeit(lambda: moe_triton(x, gu, dn, ids, w), reps)
        rows.append(dict(section="kernel", name="moe", qtype=f"{gu_t}/{dn_t}",
                         shape=f"{T}x{K} top{A}/{E} F={F}", max_abs_err=amax, rel_err=rel,
                         fused_ms=t_fused, torch_ms=t_torch, speedup_vs_torch=t_torch / t_fused,
                         fused_GBps=(gu.nbytes + dn.nbytes) / t_fused / 1e6))
        if sweep and (gu_t, dn_t) == types[0]:       # the main pair only: each config compiles
            rows[-1].update(sweep_moe(x, gu, dn, ids, w, reps))
        print(rows[-1], flush=True)
        del gu, dn
    return rows


def bench_attention(T: int, Nq: int, L: int, layers, dtype, device, reps: int) -> list[dict]:
    """layers.attention's SDPA with grouped KV heads passed as they are (enable_gqa) and with the
    KV heads expanded to the query heads (what layers.attention does on CUDA above head dim 256),
    per (head dim, KV heads) of `layers`; errors against a float32 math-kernel reference."""
    from diffcli.model.layers import sdpa
    rows = []
    gen = torch.Generator(device=device).manual_seed(4)
    for D, Nkv in layers:
        q = (torch.randn(T, Nq, D, device=device, generator=gen) * 0.05).to(dtype)
        k = (torch.randn(Nkv, L, D, device=device, generator=gen) * 0.05).to(dtype)
        v = torch.randn(Nkv, L, D, device=device, generator=gen).to(dtype)
        ref = sdpa(q.float(), k.float(), v.float(), None, expand_kv=True)
        for expand in (False, True):
            out = sdpa(q, k, v, None, expand_kv=expand)
            amax, rel = errors(out, ref)
            rows.append(dict(section="kernel", name="attention " + ("expanded kv" if expand
                                                                    else "enable_gqa"),
                             qtype=str(dtype).replace("torch.", ""),
                             shape=f"T={T} Nq={Nq} Nkv={Nkv} D={D} L={L}", max_abs_err=amax,
                             rel_err=rel, fused_ms=timeit(lambda: sdpa(q, k, v, None,
                                                                       expand_kv=expand), reps)))
            print(rows[-1], flush=True)
    return rows


def bench_vocab(C: int, H: int, V: int, dtype, device, reps: int, sweep: bool = False,
                tau: float = 0.8, cap: float = 30.0) -> list[dict]:
    """Fused vocabulary head vs the unfused torch sequence (matmul, .float(), softcap, /tau,
    softmax, argmax, logsumexp, entropy, probs.to(E.dtype) @ E) at one shape."""
    gen = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(C, H, device=device, generator=gen).to(dtype)
    E = (torch.randn(V, H, device=device, generator=gen) * (3.0 / H ** 0.5)).to(dtype)  # std 3
    out = vocab_head(x, E, cap, tau)
    ref = vocab_head_torch(x, E, cap, tau)
    amax, rel = errors(out.soft, ref.soft)
    t_fused = timeit(lambda: vocab_head(x, E, cap, tau), reps)
    t_bare = timeit(lambda: vocab_head(x, E, cap, tau, write_logits=False), reps)
    t_torch = timeit(lambda: vocab_head_torch(x, E, cap, tau), reps)
    row = dict(section="kernel", name="vocab head", qtype=str(dtype).replace("torch.", ""),
               shape=f"{C}x{H}->{V}", max_abs_err=amax, rel_err=rel, fused_ms=t_fused,
               torch_ms=t_torch, speedup_vs_torch=t_torch / t_fused,
               fused_GBps=2 * E.numel() * E.element_size() / t_fused / 1e6,
               fused_nologits_ms=t_bare,
               logits_err=(out.logits - ref.logits).abs().max().item(),
               lse_err=(out.lse - ref.lse).abs().max().item(),
               entropy_err=(out.entropy - ref.entropy).abs().max().item(),
               argmax_agree=(out.argmax == ref.argmax).float().mean().item())
    del out, ref
    if sweep:
        best = (t_fused, "default")
        for bm, bv, bk, bh, nw, ns in ((128, 128, 64, 128, 8, 3), (128, 64, 64, 128, 4, 3),
                                       (128, 64, 64, 64, 8, 3), (128, 128, 64, 128, 8, 2),
                                       (64, 128, 64, 128, 4, 3), (128, 128, 32, 128, 8, 4),
                                       (128, 128, 64, 64, 8, 3), (128, 256, 64, 128, 8, 2)):
            cfg = f"BM={bm} BV={bv} BK={bk} BH={bh} warps={nw} stages={ns}"
            try:
                t = timeit(lambda: vocab_head(x, E, cap, tau, block_m=bm, block_v=bv, block_k=bk,
                                              block_h=bh, num_warps=nw, num_stages=ns), reps)
            except Exception as exc:    # e.g. OutOfResources (shared memory) for big tiles
                print(f"  skip {cfg}: {type(exc).__name__}", flush=True)
                continue
            best = min(best, (t, cfg))
        row.update(best_ms=best[0], best_cfg=best[1])
    print(row, flush=True)
    return [row]


def bench_model(path: str, device, prompt_len: int, canvases: int, reps: int,
                step_counts=(16, 48)) -> tuple[list[dict], object]:
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = diffcli.load(path, device=device)
    sync()
    rows = [dict(section="model", name="load", value=time.perf_counter() - t0, unit="s")]
    cfg = model.config
    C, V = cfg.canvas_length, cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, V, (prompt_len,), generator=gen)
    model.encode(prompt[:64])                                     # compile/warm the kernels
    sync()
    t0 = time.perf_counter()
    cache = model.encode(prompt)
    sync()
    dt = time.perf_counter() - t0
    rows.append(dict(section="model", name=f"prefill {prompt_len} tokens",
                     value=prompt_len / dt, unit="tok/s", ms=1e3 * dt))
    print(rows, flush=True)
    canvas = torch.randint(5, V, (C,), generator=gen)
    sc = model.denoise(cache, canvas)                             # first step: no self-cond
    ms_first = timeit(lambda: model.denoise(cache, canvas), reps)
    rows.append(dict(section="model", name="denoise step (no self-cond)", value=ms_first,
                     unit="ms", head="unfused", graphs="off"))
    # self-conditioned steps replay a CUDA graph where model.step_graph allows one: timed with
    # graphs off and on, side by side (the first graphed calls warm up and capture)
    graphable = model.step_graph is not None
    fused = model.use_fused_head          # generation runs the fused vocabulary head when set
    soft = model.denoise_fused(cache, canvas, 0.8).soft if fused else None
    for graphs in (("off", "on") if graphable else ("off",)):
        model.cuda_graphs = graphs == "on"
        ms_sc = timeit(lambda: model.denoise(cache, canvas, sc), reps)
        rows.append(dict(section="model", name="denoise step (self-cond)", value=ms_sc,
                         unit="ms", head="unfused", graphs=graphs))
        if fused:
            ms_fused = timeit(lambda: model.denoise_fused(cache, canvas, 0.8, soft), reps)
            rows.append(dict(section="model", name="denoise step (self-cond, fused head)",
                             value=ms_fused, unit="ms", head="fused", graphs=graphs))
    model.cuda_graphs = True
    diffcli.generate(model, prompt[:16], max_new_tokens=C, seed=0, mode="hf", eog_ids=[-1],
                     sampler=diffcli.SamplerConfig(max_steps=2, confidence=0.0))   # warm-up
    sync()
    # generation as it runs by default (fused head where model.use_fused_head, CUDA graphs where
    # model.step_graph), then with graphs off, then with the unfused torch head, for ratios
    variants = [("fused" if fused else "unfused", "on" if graphable else "off")]
    if graphable:
        variants.append((variants[0][0], "off"))
    if fused:
        variants.append(("unfused", variants[0][1]))
    for S in step_counts:
        for head, graphs in variants:
            model.fused_head, model.cuda_graphs = head == "fused", graphs == "on"
            sampler = diffcli.SamplerConfig(max_steps=S, confidence=0.0)
            try:
                done = diffcli.generate(model, prompt[:256], max_new_tokens=C * canvases,
                                        sampler=sampler, seed=0, mode="hf", eog_ids=[-1])
            finally:
                model.fused_head = model.cuda_graphs = True
            st = done.stats
            emitted = C * st.canvases              # fixed steps: every canvas emits C tokens
            gen_ms = st.total_ms - st.prefill_ms
            name = f"generate {S} steps/canvas"
            if (head, graphs) != variants[0]:
                name += f" ({head} head, graphs {graphs})"
            rows.append(dict(section="model", name=name, value=1e3 * emitted / gen_ms,
                             unit="tok/s", head=head, graphs=graphs, steps=st.steps,
                             ms_per_step=st.ms_per_step, commit_ms=st.commit_ms,
                             canvases=st.canvases))
    if CUDA:
        rows.append(dict(section="model", name="peak GPU memory",
                         value=torch.cuda.max_memory_allocated() / 2**30, unit="GiB"))
    return rows, (model, cache, canvas, sc)


def step_share(state, top: int = 12) -> list[dict]:
    """GPU time per kernel over one self-conditioned denoising step."""
    model, cache, canvas, sc = state
    model.cuda_graphs = False       # eager: every kernel launched on its own, as profiled before
    from torch.profiler import ProfilerActivity, profile
    model.denoise(cache, canvas, sc)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.denoise(cache, canvas, sc)
        torch.cuda.synchronize()
    ev = [(e.key, getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0),
           e.count) for e in prof.key_averages()]
    ev = [e for e in ev if e[1] > 0]
    total = sum(e[1] for e in ev)
    ev.sort(key=lambda e: -e[1])
    rows = [dict(section="share", name=k[:60], value=100 * t / total, unit="%", ms=t / 1e3,
                 calls=n) for k, t, n in ev[:top]]
    rows.append(dict(section="share", name="(all kernels)", value=100.0, unit="%", ms=total / 1e3))
    return rows


def print_table(rows: list[dict]) -> None:
    for section in dict.fromkeys(r["section"] for r in rows):
        rs = [r for r in rows if r["section"] == section]
        cols = [c for c in dict.fromkeys(k for r in rs for k in r) if c != "section"]
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)   # noqa: E731
        cells = [[fmt(r.get(c, "")) for c in cols] for r in rs]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        print(f"\n[{section}]")
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="GGUF to load (default: synthesize one in a temp dir)")
    ap.add_argument("--type", default="Q4_K_M", choices=["Q4_K_M", "Q8_0"])
    ap.add_argument("--layers", type=int, default=None, help="layers of the synthesized model")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the default without CUDA)")
    ap.add_argument("--kernels-only", action="store_true")
    ap.add_argument("--model-only", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="try qmatmul tile configs")
    ap.add_argument("--prompt", type=int, default=None, help="prefill length (default 4096)")
    ap.add_argument("--canvases", type=int, default=2,
                    help="canvases per generate run (2: one commit is included)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--json")
    ap.add_argument("--csv")
    args = ap.parse_args(argv)
    tiny = args.tiny or not CUDA
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.bfloat16 if CUDA else torch.float32
    reps = args.reps or (20 if CUDA else 2)
    rows: list[dict] = []
    env = dict(section="env", name="versions", torch=torch.__version__,
               triton=__import__("triton").__version__,
               device=torch.cuda.get_device_name() if CUDA else "cpu (interpreter)")
    rows.append(env)
    if not args.model_only:
        if tiny:
            rows += bench_qmatmul(TINY_SHAPES, 33, dtype, device, reps, args.sweep)
            rows += bench_moe(33, 2, 8, 256, 96, [("Q4_K", "Q5_0")], dtype, device, reps,
                              args.sweep)
            rows += bench_vocab(33, 96, 1000, dtype, device, reps)
            rows += bench_attention(33, 4, 40, [(16, 2), (32, 1)], dtype, device, reps)
        else:
            rows += check_small_t(device, dtype)
            print_table(rows)
            rows += bench_qmatmul(REAL_SHAPES, 256, dtype, device, reps, args.sweep)
            rows += bench_moe(256, 8, 128, 2816, 704, [("Q4_K", "Q5_0"), ("Q4_K", "Q8_0"),
                                                       ("Q8_0", "Q8_0")], dtype, device, reps,
                               args.sweep)
            rows += bench_vocab(256, 2816, 262144, dtype, device, reps, args.sweep)
            # sliding (D 256, 8 KV heads) and global (D 512, 2 KV heads) layers, a 4k prompt
            rows += bench_attention(256, 16, 4096 + 256, [(256, 8), (512, 2)], dtype, device,
                                    reps)
        print_table(rows)
    if not args.kernels_only:
        with tempfile.TemporaryDirectory() as tmp:
            path = args.model
            if path is None:
                path = os.path.join(tmp, "synthetic.gguf")
                synthesize(path, args.type, args.layers, tiny=tiny)
            prompt = args.prompt or (64 if tiny else 4096)
            model_rows, state = bench_model(path, device, prompt, args.canvases,
                                            reps if CUDA else 1, step_counts=(2,) if tiny else (16, 48))
            rows += model_rows
            if CUDA:
                rows += step_share(state)
            del state
        print_table([r for r in rows if r["section"] in ("model", "share")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.csv:
        import csv
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, keys)
            wr.writeheader()
            wr.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
