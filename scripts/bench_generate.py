#!/usr/bin/env python
"""diffcli generate vs transformers generate, side by side on the same tiny model, in one run.

Both run the same prompt, seed and sampler with early stopping disabled (confidence 1e-9), so
both execute exactly canvases x steps decoder passes; the table gives the median over --runs of
wall time per canvas and per step (whole call / steps: prefill and commits included), the ratio,
and whether the tokens were identical. A third row
times bare `model.denoise` calls (with self-conditioning), so the loop's own cost per step shows.

    python scripts/bench_generate.py                    # CPU, f32 tiny model
    python scripts/bench_generate.py --device cuda --outtype q8_0 --json
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import diffcli
from diffcli.testing import make_tiny_gguf


def timed(fn, sync) -> tuple[float, object]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return 1000.0 * (time.perf_counter() - t0), out


def interleaved_medians(fns: dict, runs: int, sync) -> tuple[dict, dict]:
    """Median ms of each function, runs interleaved so background load hits all of them alike."""
    times: dict = {k: [] for k in fns}
    outs: dict = {}
    for _ in range(runs):
        for name, fn in fns.items():
            ms, outs[name] = timed(fn, sync)
            times[name].append(ms)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", default="h64", choices=["h64", "h96", "h256"])
    ap.add_argument("--outtype", default="f32", help="GGUF tensor type for diffcli (f32, f16, bf16, q8_0)")
    ap.add_argument("--canvases", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per canvas")
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        path, hf = make_tiny_gguf(Path(tmp) / "tiny.gguf", outtype=args.outtype, variant=args.variant)
        model = diffcli.load(path, device=device)
    hf = hf.to(device)
    C, V = model.config.canvas_length, model.config.vocab_size
    prompt = [2] + [10 + i % (V - 20) for i in range(args.prompt_len - 1)]
    n_new = args.canvases * C
    steps = args.canvases * args.steps
    no_stop = dict(stability=1, confidence=1e-9)     # never confident: every canvas runs all steps
    sampler = diffcli.SamplerConfig(max_steps=args.steps, **no_stop)

    in_step: list[float] = []          # diffcli's own time inside steps (no prefill, no commits)

    def ours():
        done = diffcli.generate(model, prompt, max_new_tokens=n_new, sampler=sampler, seed=args.seed,
                                mode="hf", eog_ids=())
        in_step.append(done.stats.ms_per_step)
        return done

    def theirs():
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
            EntropyBoundSamplerConfig)
        torch.manual_seed(args.seed)
        with torch.no_grad():
            out = hf.generate(torch.tensor(prompt, device=device)[None], max_new_tokens=n_new,
                              max_denoising_steps=args.steps, stability_threshold=1,
                              confidence_threshold=1e-9, sampler_config=EntropyBoundSamplerConfig(0.1))
        return out.sequences[0, len(prompt):].tolist()

    cache = model.encode(torch.tensor(prompt, device=device))
    canvas = torch.randint(0, V, (C,), device=device)
    sc = torch.randn(C, V, device=device)

    def forwards():                                    # the decoder passes alone, same count
        for _ in range(args.steps):
            model.denoise(cache, canvas, sc)

    fns = {"theirs": theirs, "ours": ours, "forwards": forwards}
    interleaved_medians(fns, 1, sync)                  # warm-up (allocations, kernels)
    med, outs = interleaved_medians(fns, args.runs, sync)
    hf_ms, ours_ms, fwd_ms = med["theirs"], med["ours"], med["forwards"] / args.steps
    got, ref = outs["ours"], outs["theirs"]
    assert got.stats.steps == steps, got.stats.steps_per_canvas

    rows = [
        {"impl": "transformers generate", "ms_per_canvas": hf_ms / args.canvases,
         "ms_per_step": hf_ms / steps, "total_ms": hf_ms},
        {"impl": "diffcli generate", "ms_per_canvas": ours_ms / args.canvases,
         "ms_per_step": ours_ms / steps, "total_ms": ours_ms},
        {"impl": "diffcli denoise only", "ms_per_canvas": fwd_ms * args.steps,
         "ms_per_step": fwd_ms, "total_ms": fwd_ms * steps},
    ]
    meta = {"device": str(device), "variant": args.variant, "outtype": args.outtype,
            "canvases": args.canvases, "steps_per_canvas": args.steps, "runs": args.runs,
            "canvas_length": C, "vocab": V, "prompt_tokens": len(prompt),
            "speedup_vs_transformers": hf_ms / ours_ms, "identical_tokens": got.tokens == ref,
            "loop_ms_per_step": statistics.median(in_step[1:]) - fwd_ms}
    if args.json:
        json.dump({"meta": meta, "rows": rows}, sys.stdout, indent=1)
        print()
    elif args.csv:
        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    else:
        print(f"device {meta['device']}, tiny {args.variant} {args.outtype}, C={C}, V={V}, "
              f"{args.canvases} canvases x {args.steps} steps, median of {args.runs}")
        print(f"{'impl':<24}{'ms/canvas':>12}{'ms/step':>10}{'total ms':>11}")
        for r in rows:
            print(f"{r['impl']:<24}{r['ms_per_canvas']:>12.2f}{r['ms_per_step']:>10.2f}{r['total_ms']:>11.1f}")
        print(f"diffcli / transformers speed-up: {meta['speedup_vs_transformers']:.2f}x; "
              f"sampler+loop cost per step (in-step time - denoise): {meta['loop_ms_per_step']:.2f} ms; "
              f"identical tokens: {meta['identical_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
