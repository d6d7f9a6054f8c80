"""CPU speed of one denoising step, side by side: transformers vs diffcli (torch and native paths).

Builds a small DiffusionGemma in transformers (hidden 512, 8 layers, 16 experts, top-4, vocab 32k,
canvas 256 by default), saves it, converts it to F32 / Q8_0 / Q4_K_M GGUF with diffcli, and times
one decoder step over the canvas with a prompt in the cache and self-conditioning logits (every
step after a canvas's first has them) in each contender:

- transformers 5.23.0, eager fp32 (the oracle) and eager bf16, from the saved checkpoint;
- diffcli, torch path (dequantize, then matmul), per GGUF type and activation dtype;
- diffcli, native path (kernels/native C++ library), per GGUF type and activation dtype
  (f32: fp32 FMAs; bf16: bf16 dot products with fp32 accumulation where the CPU has AVX512-BF16).

Every contender runs in its own subprocess, so its peak RSS (VmHWM from /proc/self/status, or
ru_maxrss) is its own. Each also saves its logits so the table can show max |logit difference|
against transformers and the native path's against the torch path (a sanity check: fast and wrong
is not fast). Every contender is fed transformers' step-1 logits as its self-conditioning input, so
the timed steps compute the same thing (with random weights the MoE router is near a tie, and a
1e-4 change of its input can flip an expert choice and move logits by ~1).

    python scripts/bench_cpu.py                  # table
    python scripts/bench_cpu.py --json           # one JSON object
    python scripts/bench_cpu.py --steps 10 --threads 2 --types f32,q4_k_m --dtypes bf16
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = dict(hidden_size=512, num_hidden_layers=8, num_experts=16, top_k_experts=4, vocab_size=32000,
             canvas_length=256, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
             global_head_dim=128, num_global_key_value_heads=2, intermediate_size=768,
             moe_intermediate_size=256, sliding_window=512)
SC_TEMPERATURE = 0.8


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kB on Linux


def inputs(prompt_len: int, canvas: int, vocab: int):
    """BOS + random prompt, random canvas; ids stay clear of the image/boi/eoi ids at the top of
    the vocabulary, which transformers treats specially."""
    import torch
    gen = torch.Generator().manual_seed(0)
    high = vocab - 16
    prompt = torch.cat([torch.tensor([2]), torch.randint(10, high, (prompt_len - 1,), generator=gen)])
    return prompt, torch.randint(10, high, (canvas,), generator=gen)


def timed(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def worker(a) -> dict:
    """One contender in this process; returns its measurements."""
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    prompt, canvas = inputs(a.prompt_len, MODEL["canvas_length"], MODEL["vocab_size"])
    t0 = time.perf_counter()
    if a.worker == "transformers":
        from transformers import DiffusionGemmaForBlockDiffusion
        dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(a.model, attn_implementation="eager",
                                                                dtype=dtype).eval()
        with torch.inference_mode():
            out = model(input_ids=prompt[None], decoder_input_ids=canvas[None])
        cache, sc = out.past_key_values, out.logits[0].float() / SC_TEMPERATURE
        if a.sc and a.dtype == "f32":
            np.save(a.sc, sc.numpy())
        elif a.sc and Path(a.sc).is_file():
            sc = torch.from_numpy(np.load(a.sc))

        def step():
            with torch.inference_mode():
                return model(past_key_values=cache, decoder_input_ids=canvas[None],
                             self_conditioning_logits=sc[None]).logits[0]
        info = {}
    else:
        import diffcli
        from diffcli.compute import native
        from diffcli.compute.backend import set_backend

        if a.worker == "native" and not native.available():
            return {"error": "native library not built (python -m diffcli.native build)"}
        set_backend(a.worker)
        model = diffcli.load(a.model, dtype=torch.bfloat16 if a.dtype == "bf16" else torch.float32)
        cache = model.encode(prompt)
        sc = model.denoise(cache, canvas) / SC_TEMPERATURE
        if a.sc and Path(a.sc).is_file():
            sc = torch.from_numpy(np.load(a.sc))

        def step():
            return model.denoise(cache, canvas, sc_logits=sc)
        info = {"simd": native.simd()} if a.worker == "native" else {}
    prepare_s = time.perf_counter() - t0
    logits = step()
    timed(step, a.warmup)
    ms = timed(step, a.steps)
    if a.logits:
        np.save(a.logits, logits.float().numpy())
    return {"ms_median": statistics.median(ms), "ms_min": min(ms), "ms_all": ms,
            "prepare_s": prepare_s, "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads(),
            **info}


def run_contender(a, kind: str, dtype: str, model: Path, logits: Path, sc: Path) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--model", str(model),
           "--logits", str(logits), "--sc", str(sc), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--threads", str(a.threads), "--prompt-len", str(a.prompt_len), "--dtype", dtype]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    env.pop("DIFFCLI_BACKEND", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(work: Path, types: list[str], log) -> tuple[Path, dict[str, Path]]:
    from diffcli import convert
    from diffcli.testing import build_tiny_hf_model, save_tiny_checkpoint

    t = time.perf_counter()
    hf = build_tiny_hf_model(seed=0, **MODEL)
    n_params = sum(p.numel() for n, p in hf.named_parameters() if "vision" not in n)
    save_tiny_checkpoint(hf, work / "hf")
    del hf
    ggufs = {ot: convert(work / "hf", work / f"bench-{ot}.gguf", ot, overwrite=True) for ot in types}
    log(f"model: {n_params / 1e6:.1f} M text parameters, {', '.join(types)} GGUFs written "
        f"in {time.perf_counter() - t:.1f} s")
    return work / "hf", ggufs


def max_diff(a: Path, b: Path) -> float | None:
    import numpy as np
    if not (a.is_file() and b.is_file()):
        return None
    return float(np.abs(np.load(a).astype(np.float64) - np.load(b)).max())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed denoising steps per contender")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    p.add_argument("--threads", type=int, default=2, help="torch (and native OpenMP) threads")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens in the cache")
    p.add_argument("--types", default="f32,q8_0,q4_k_m", help="GGUF types to convert to")
    p.add_argument("--backends", default="torch,native", help="diffcli backends to time")
    p.add_argument("--dtypes", default="f32,bf16", help="activation dtypes to time (f32, bf16)")
    p.add_argument("--work", help="folder for the checkpoint and GGUFs (default: a temp folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--logits", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="f32", help=argparse.SUPPRESS)
    p.add_argument("--sc", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="diffcli-bench-")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    types = [t.strip().lower() for t in a.types.split(",") if t.strip()]
    hf_dir, ggufs = prepare(work, types, log)
    rows = []
    ref = work / "logits-transformers-FP32-f32.npy"
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    contenders = [("transformers", "FP32", "f32", hf_dir)]
    contenders += [("transformers", "BF16", "bf16", hf_dir)] if "bf16" in dtypes else []
    contenders += [(b, ot.upper(), d, path) for d in dtypes for ot, path in ggufs.items()
                   for b in a.backends.split(",")]
    for kind, wtype, dtype, path in contenders:
        name = "transformers" if kind == "transformers" else f"diffcli {kind}"
        log(f"timing {name} ({wtype}, {dtype}) ...")
        logits = work / f"logits-{kind}-{wtype}-{dtype}.npy"
        r = run_contender(a, kind, dtype, path, logits, work / "sc-logits.npy")
        torch_logits = work / f"logits-torch-{wtype}-{dtype}.npy"
        r.update(contender=name, weights=wtype, dtype=dtype,
                 dlogit_vs_hf=None if (kind, dtype) == ("transformers", "f32") else max_diff(logits, ref),
                 dlogit_vs_torch=max_diff(logits, torch_logits) if kind == "native" else None)
        rows.append(r)
    base = rows[0].get("ms_median")
    for r in rows:
        r["speedup_vs_transformers"] = base / r["ms_median"] if base and r.get("ms_median") else None
    result = {"model": MODEL, "prompt_len": a.prompt_len, "threads": a.threads, "steps": a.steps,
              "cpu_count": os.cpu_count(), "rows": rows}
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"one denoising step, canvas {MODEL['canvas_length']}, prompt {a.prompt_len} in cache, "
              f"self-conditioning on; {a.threads} threads; median of {a.steps} steps")
        print("max|dlogit|: against transformers, and (native rows) against the torch path on the same "
              "GGUF; all contenders get transformers' step-1 logits as self-conditioning input")
        print(f"{'contender':<20}{'weights':<9}{'act':<6}{'ms/step':>10}{'min':>9}{'x HF':>7}"
              f"{'peak RSS MiB':>14}{'vs HF':>10}{'vs torch':>10}")
        for r in rows:
            if "error" in r:
                print(f"{r['contender']:<20}{r['weights']:<9}{r['dtype']:<6}  {r['error']}")
                continue
            d1, d2 = ("" if r[k] is None else f"{r[k]:.1e}" for k in ("dlogit_vs_hf", "dlogit_vs_torch"))
            print(f"{r['contender']:<20}{r['weights']:<9}{r['dtype']:<6}{r['ms_median']:>10.1f}{r['ms_min']:>9.1f}"
                  f"{r['speedup_vs_transformers']:>7.2f}{r['peak_rss_mib']:>14.0f}{d1:>10}{d2:>10}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
