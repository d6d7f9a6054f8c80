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

`--real-shapes` measures the real model's shapes instead: a 6-layer file with the real per-layer
shapes, the full 262,144 vocabulary and the Q4_K_M type mix (scripts/synth_gguf.py, written once
into a cache folder, ~3.8 GB), and reports in one run the ms of a self-conditioned denoising step
split by stage (attention projections, attention, dense MLP, MoE, head, self-conditioning,
sampler), prefill tok/s over a 2k-token prompt, and peak RSS against the file size. With
`--llama-cli PATH` it also runs a user-built `llama-diffusion-cli` (llama.cpp PR #24423) on the
same file with the same flags and prints the ratios (per-step and prefill times of the peer are
taken from wall-time differences of runs with two step counts and two prompt lengths, so they
need nothing from its log format).

    python scripts/bench_cpu.py --real-shapes --threads 2
    python scripts/bench_cpu.py --real-shapes --llama-cli ~/llama.cpp/build/bin/llama-diffusion-cli
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
VARIANTS = ("default", "dense-embedding", "unfused", "no-amx", "int8", "no-int8")   # --runs DTYPE/VARIANT


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
        # int8 products apply to bf16 activations only (native.int8 is the bf16 mode's switch)
        info = {"simd": native.simd(), "int8": native.int8() and a.dtype == "bf16"} if a.worker == "native" else {}
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


# --- --real-shapes ---------------------------------------------------------------------------

STAGES = ("attn_proj", "attention", "dense_mlp", "moe", "head", "self_cond", "sampler", "other")
STAGE_TITLES = {"attn_proj": "attention projections", "attention": "attention", "dense_mlp": "dense MLP",
                "moe": "MoE (router + experts)", "head": "head (logits, vocab statistics)",
                "self_cond": "self-conditioning", "sampler": "sampler (draw, accept, renoise)",
                "other": "other (norms, RoPE, residual)", "embed_dequant": "embedding dequantization"}


def rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class StageTimer:
    """Exclusive wall time per stage: wrapped callables push their stage on a stack, and time spent
    in a nested wrapped call counts for the inner stage only."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self.stack: list[list] = []          # [stage, start, time taken by nested stages]

    def wrap(self, fn, stage):
        """fn timed as `stage` (a name, or a function of fn's arguments returning one or None:
        None leaves the time with the caller's stage)."""
        def wrapped(*args, **kw):
            name = stage(*args, **kw) if callable(stage) else stage
            if name is None:
                return fn(*args, **kw)
            frame = [name, time.perf_counter(), 0.0]
            self.stack.append(frame)
            try:
                return fn(*args, **kw)
            finally:
                self.stack.pop()
                took = time.perf_counter() - frame[1]
                self.total[name] = self.total.get(name, 0.0) + took - frame[2]
                if self.stack:
                    self.stack[-1][2] += took
        return wrapped

    def snapshot(self) -> dict[str, float]:
        return dict(self.total)


def instrument(model, timer: StageTimer) -> None:
    """Wrap the model's stages (instance attributes shadow the methods; the module-level attention
    function is replaced in diffusion_gemma's namespace)."""
    from diffcli.model import diffusion_gemma as dg
    from diffcli.compute import vocab as cpu_vocab

    wo = {id(lw.wo) for lw in model.w.layers}
    sc_gate = model.w.sc_gate
    model._qkv = timer.wrap(model._qkv, "attn_proj")
    model._lin = timer.wrap(model._lin, lambda x, w: "attn_proj" if id(w) in wo else None)
    model._mlp = timer.wrap(model._mlp, lambda x, gate, up, down: "self_cond" if gate is sc_gate
                            else "dense_mlp")
    model._experts = timer.wrap(model._experts, "moe")
    model._decode_body = timer.wrap(model._decode_body, "other")
    model._decode = timer.wrap(model._decode, "self_cond")       # its own part: softmax(sc) @ E
    model._dense_embedding = timer.wrap(model._dense_embedding, "embed_dequant")
    model.denoise = timer.wrap(model.denoise, "head")
    model.denoise_fused = timer.wrap(model.denoise_fused, "head")
    model.encode = timer.wrap(model.encode, "prefill")
    dg.attention = timer.wrap(dg.attention, "attention")
    for name, stage in getattr(cpu_vocab, "BENCH_STAGES", {}).items():
        setattr(cpu_vocab, name, timer.wrap(getattr(cpu_vocab, name), stage))


def step_flops(model, prompt_len: int) -> dict[str, float]:
    """Multiply-adds x 2 of one self-conditioned step per stage (the matmuls only)."""
    cfg, w = model.config, model.w
    C, H, V = cfg.canvas_length, cfg.n_embd, cfg.vocab_size

    def lin(qt):
        return 2.0 * C * qt.shape[0] * qt.shape[1]

    out = dict.fromkeys(("attn_proj", "attention", "dense_mlp", "moe", "head", "self_cond"), 0.0)
    for i, lw in enumerate(w.layers):
        out["attn_proj"] += sum(lin(t) for t in (lw.wq, lw.wk, lw.wv, lw.wo) if t is not None)
        sliding = cfg.layer_types[i] == "sliding"
        keys = (min(prompt_len, cfg.sliding_window - 1) if sliding else prompt_len) + C
        out["attention"] += 2 * 2.0 * C * keys * cfg.n_head * cfg.layer_head_dim(i)
        out["dense_mlp"] += lin(lw.ffn_gate) + lin(lw.ffn_up) + lin(lw.ffn_down)
        E, F2, K = lw.exp_gate_up.shape
        out["moe"] += 2.0 * C * cfg.n_expert_used * (F2 * K + K * (F2 // 2))
    out["head"] = 2.0 * C * V * H
    out["self_cond"] = 2.0 * C * V * H + lin(w.sc_gate) + lin(w.sc_up) + lin(w.sc_down)
    return out


def real_worker(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    import diffcli
    from diffcli.compute import native
    from diffcli.generation.loop import stream
    from diffcli.generation.events import Done, StepEvent
    from diffcli.generation.sampler import SamplerConfig

    t0 = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[a.dtype]
    # dense-embedding: the head and self-conditioning on a dense copy of E, as before issue 14
    # (kept for the model's life in bf16, rebuilt every step in f32)
    dense = a.variant == "dense-embedding"
    model = diffcli.load(a.model, dtype=dtype, cache_embedding=(dtype == torch.bfloat16) if dense else None)
    if dense:
        model._embed_blocks_native = lambda: False
    if a.variant == "unfused":
        model.fused_head = False        # the unfused path: [C, V] fp32 logits, torch statistics
    load_s = time.perf_counter() - t0
    cfg = model.config
    timer = StageTimer()
    instrument(model, timer)
    gen = torch.Generator().manual_seed(0)
    high = cfg.vocab_size - 16
    prompt = torch.cat([torch.tensor([2]), torch.randint(10, high, (a.prompt_len - 1,), generator=gen)])
    # fault the weights in (mmap) before anything is timed: a short prompt touches every layer
    model.encode(prompt[:64])
    rss_warm = rss_mib()
    steps = a.warmup + a.steps + 1      # the first step of a canvas has no self-conditioning
    sampler = SamplerConfig(max_steps=steps, confidence=0.0)   # confidence 0: never stops early
    per_step, marks, prefill_ms = [], [timer.snapshot()], None
    for ev in stream(model, prompt, max_new_tokens=cfg.canvas_length, sampler=sampler, seed=0):
        if isinstance(ev, StepEvent):
            now = timer.snapshot()
            parts = {k: (now.get(k, 0.0) - marks[-1].get(k, 0.0)) * 1e3 for k in now}
            parts.pop("prefill", None)
            parts["sampler"] = ev.elapsed_ms - sum(parts.values())
            per_step.append((ev.elapsed_ms, parts))
            marks.append(now)
        elif isinstance(ev, Done):
            prefill_ms = ev.stats.prefill_ms
    timed = per_step[1 + a.warmup:]
    ms = [t for t, _ in timed]
    stages = {k: statistics.median(p.get(k, 0.0) for _, p in timed) for k in set().union(*(p for _, p in timed))}
    flops = step_flops(model, a.prompt_len)
    return {"ms_median": statistics.median(ms), "ms_min": min(ms), "ms_all": ms, "stages_ms": stages,
            "stage_gflop": {k: v / 1e9 for k, v in flops.items()},
            "prefill_ms": prefill_ms, "prefill_tok_s": a.prompt_len / (prefill_ms / 1e3),
            "load_s": load_s, "rss_after_warmup_mib": rss_warm, "peak_rss_mib": peak_rss_mib(),
            "simd": native.simd(), "bf16_dot": native.has_bf16(), "amx": native.amx(),
            "int8": native.int8() and dtype == torch.bfloat16, "threads": torch.get_num_threads(),
            "fused_head": bool(model.use_fused_head)}


def cache_dir(a) -> Path:
    if a.cache_dir:
        return Path(a.cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffcli-bench"


def real_file(a, log) -> Path:
    """The synthetic file, written once (with tokenizer merges, so llama.cpp accepts it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import synth_gguf
    folder = cache_dir(a)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"real-{a.layers}L-q4_k_m-v{synth_gguf.FORMAT_VERSION}.gguf"
    if not path.is_file():
        log(f"writing {path} (once) ...")
        part = path.with_name(path.name + ".part")
        synth_gguf.synthesize(str(part), "Q4_K_M", a.layers, merges=True, log=log)
        part.replace(path)
    return path


def run_peer(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child run; raises on failure."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = err.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {' | '.join(lines[-3:])}")
    errors = [ln for ln in lines if " E " in ln[:24]]      # its log marks errors "<time> E ..."
    if errors:                                            # exit code 0, nothing generated
        raise RuntimeError(f"{cmd[0]} reported: {errors[-1].split(' E ', 1)[1].strip()}")
    return wall, usage.ru_maxrss / 1024


def peer_differences(walls: dict[str, list[float]], steps: int, prompt_len: int) -> dict:
    """Step time and prefill from the peer's wall times (the fastest of each configuration's
    runs): (hi - lo) / steps and long - lo. A difference that is not positive, as when a cold page
    cache or memory pressure slows one run more than the extra work costs, gives an error entry
    instead of a figure."""
    w_lo, w_hi, w_long = (min(walls[k]) for k in ("lo", "hi", "long"))
    out = {"walls_s": walls}
    step_ms, prefill_s = (w_hi - w_lo) / steps * 1e3, w_long - w_lo
    if step_ms <= 0 or prefill_s <= 0:
        out["error"] = (f"its wall times do not give a step time and a prefill time (fastest runs: "
                        f"{w_lo:.1f} s with 2 steps, {w_hi:.1f} s with {2 + steps}, {w_long:.1f} s with "
                        f"the long prompt): the runs were slowed by something else (page cache, memory); "
                        f"rerun with more --peer-runs, or with the file's pages in memory")
        return out
    out.update(ms_per_step=step_ms, prefill_s=prefill_s, prefill_tok_s=prompt_len / prefill_s)
    return out


def llama_peer(a, path: Path, log) -> dict:
    """llama-diffusion-cli on the same file: step time from runs with 2 and 2+k steps, prefill from
    runs with a short and a long prompt (the differences cancel load and warm-up); each run
    --peer-runs times, the fastest taken."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import synth_gguf
    short = synth_gguf.prompt_text(8)
    long = synth_gguf.prompt_text(a.prompt_len)

    def cmd(prompt, steps):
        return [a.llama_cli, "-m", str(path), "-p", prompt, "-n", "256", "-t", str(a.threads),
                "--diffusion-eb-max-steps", str(steps), "--diffusion-eb-confidence", "0",
                "-s", "0", "-c", str(a.prompt_len + 1024),
                # it needs [prompt | canvas] in one micro-batch (else it stops with an error)
                "-b", str(a.prompt_len + 1024), "-ub", str(a.prompt_len + 1024)]

    lo, hi = 2, 2 + a.steps
    runs = {"lo": (cmd(short, lo), f"{lo} steps, short prompt"), "hi": (cmd(short, hi), f"{hi} steps, short prompt"),
            "long": (cmd(long, lo), f"{lo} steps, {a.prompt_len}-token prompt")}
    walls, rss = {k: [] for k in runs}, 0.0
    for i in range(a.peer_runs):
        for k, (c, what) in runs.items():
            log(f"llama-diffusion-cli: {what} (run {i + 1} of {a.peer_runs}) ...")
            wall, peak = run_peer(c)
            walls[k].append(wall)
            rss = max(rss, peak)
    out = peer_differences(walls, a.steps, a.prompt_len)
    out["peak_rss_mib"] = rss
    return out


def warm_page_cache(path: Path, log) -> float | None:
    """Read the file once, so that every contender's first touch of its pages (both map the file)
    finds them in the page cache instead of on disk: without it the first run's prefill reads the
    experts it routes to from disk (a 6-layer prefill measured 70 tok/s cold, 275 warm). Skipped
    when the file does not fit in the memory the kernel says is available. Returns the seconds."""
    from diffcli.gguf import reader
    size, avail = path.stat().st_size, reader.available_ram()
    if avail is not None and size > avail * 0.9:
        log(f"not reading {path.name} into the page cache first: {size / 2**30:.1f} GiB, "
            f"{avail / 2**30:.1f} GiB available; the first runs may read from disk")
        return None
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass
    return time.perf_counter() - t


def real_main(a) -> int:
    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if a.prompt_len is None:
        a.prompt_len = 2048
    path = real_file(a, log)
    file_mib = path.stat().st_size / 2**20
    warm_s = warm_page_cache(path, log)
    if warm_s is not None:
        log(f"read {path.name} into the page cache in {warm_s:.1f} s")
    results = {}
    runs = [(r.split("/")[0].strip(), (r.split("/") + ["default"])[1].strip())
            for r in a.runs.split(",") if r.strip()]
    for dtype, variant in runs:
        if variant not in VARIANTS:
            raise SystemExit(f"bench_cpu: --runs {dtype}/{variant}: no such variant; use one of "
                             f"{', '.join(VARIANTS)}")
    for dtype, variant in runs:
        log(f"timing diffcli ({dtype}, {variant}) on {path.name} ...")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "real", "--model", str(path),
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads),
               "--prompt-len", str(a.prompt_len), "--dtype", dtype, "--variant", variant]
        dtype = dtype if variant == "default" else f"{dtype}/{variant}"
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
        env.pop("DIFFCLI_BACKEND", None)
        env.pop("DIFFCLI_NATIVE_INT8", None)
        if variant == "no-amx":
            env["DIFFCLI_NATIVE_AMX"] = "0"       # the AVX512-BF16 kernels on an AMX machine
        elif variant == "int8":
            env["DIFFCLI_NATIVE_INT8"] = "1"      # int8 products where the weight types allow
        elif variant == "no-int8":
            env["DIFFCLI_NATIVE_INT8"] = "0"      # bf16 products where int8 would be the default
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            results[dtype] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        else:
            results[dtype] = json.loads(proc.stdout.strip().splitlines()[-1])
    peer = None
    if a.llama_cli:
        try:
            peer = llama_peer(a, path, log)
        except (OSError, RuntimeError) as exc:
            peer = {"error": str(exc)}
    out = {"file": str(path), "file_mib": file_mib, "page_cache_read_s": warm_s, "layers": a.layers,
           "prompt_len": a.prompt_len,
           "threads": a.threads, "steps": a.steps, "diffcli": results, "llama_cli": peer}
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"real shapes: {path.name} ({file_mib / 1024:.2f} GiB, {a.layers} layers, vocab 262144), "
          f"prompt {a.prompt_len} tokens in the cache, {a.threads} threads, median of {a.steps} "
          f"self-conditioned steps")
    for dtype, r in results.items():
        if "error" in r:
            print(f"diffcli {dtype}: {r['error']}")
            continue
        print(f"\ndiffcli {dtype} ({r['simd']}, bf16 dot products: {r['bf16_dot']}, AMX: {r.get('amx')}, fused vocab head: "
              f"{r['fused_head']}): {r['ms_median']:.0f} ms/step (min {r['ms_min']:.0f})")
        print(f"  {'stage':<34}{'ms':>9}{'GFLOP':>9}{'GFLOP/s':>9}")
        for k in STAGES + ("embed_dequant",):
            if k not in r["stages_ms"]:
                continue
            ms, gf = r["stages_ms"][k], r["stage_gflop"].get(k)
            rate = f"{gf / (ms / 1e3):9.0f}" if gf and ms > 0 else ""
            print(f"  {STAGE_TITLES[k]:<34}{ms:>9.1f}{(f'{gf:9.1f}' if gf else ''):>9}{rate}")
        total_gf = sum(r["stage_gflop"].values())
        print(f"  {'step':<34}{r['ms_median']:>9.1f}{total_gf:>9.1f}{total_gf / (r['ms_median'] / 1e3):9.0f}")
        print(f"  prefill: {a.prompt_len} tokens in {r['prefill_ms'] / 1e3:.2f} s = {r['prefill_tok_s']:.1f} tok/s")
        print(f"  peak RSS {r['peak_rss_mib']:.0f} MiB = file + {(r['peak_rss_mib'] - file_mib) / 1024:.2f} GiB "
              f"(after warm-up {r['rss_after_warmup_mib']:.0f} MiB)")
    if peer is not None:
        if "error" in peer:
            print(f"\nllama-diffusion-cli: {peer['error']}")
        else:
            print(f"\nllama-diffusion-cli: {peer['ms_per_step']:.0f} ms/step, prefill "
                  f"{peer['prefill_tok_s']:.1f} tok/s, peak RSS {peer['peak_rss_mib']:.0f} MiB")
            for dtype, r in results.items():
                if "error" not in r:
                    print(f"  ratio (diffcli {dtype}): step {peer['ms_per_step'] / r['ms_median']:.2f}x, "
                          f"prefill {r['prefill_tok_s'] / peer['prefill_tok_s']:.2f}x")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed denoising steps per contender")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    p.add_argument("--threads", type=int, default=2, help="torch (and native OpenMP) threads")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="tokens in the cache (default 64; --real-shapes: 2048, the prefill measured)")
    p.add_argument("--types", default="f32,q8_0,q4_k_m", help="GGUF types to convert to")
    p.add_argument("--backends", default="torch,native", help="diffcli backends to time")
    p.add_argument("--dtypes", default=None,
                   help="activation dtypes to time (f32, bf16; default f32,bf16)")
    p.add_argument("--work", help="folder for the checkpoint and GGUFs (default: a temp folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--logits", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="f32", help=argparse.SUPPRESS)
    p.add_argument("--sc", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    p.add_argument("--runs", default="f32,f32/dense-embedding,bf16,bf16/unfused",
                   help="--real-shapes: diffcli runs side by side, DTYPE[/VARIANT] (default: what diffcli "
                        "runs; dense-embedding: head and self-conditioning on a dense copy of E, as before; "
                        "unfused: torch vocabulary side with fp32 [C, V] buffers; no-amx: DIFFCLI_NATIVE_AMX=0; int8: "
                        "DIFFCLI_NATIVE_INT8=1; no-int8: DIFFCLI_NATIVE_INT8=0)")
    p.add_argument("--real-shapes", action="store_true",
                   help="benchmark the real model's shapes (6-layer synthetic file, vocab 262k)")
    p.add_argument("--layers", type=int, default=6, help="--real-shapes: layers of the synthetic file")
    p.add_argument("--cache-dir", help="--real-shapes: where the synthetic file is kept "
                   "(default $XDG_CACHE_HOME/diffcli-bench or ~/.cache/diffcli-bench)")
    p.add_argument("--llama-cli", help="--real-shapes: a llama-diffusion-cli binary to compare with")
    p.add_argument("--peer-runs", type=int, default=1,
                   help="--llama-cli: runs of each of its three configurations; the fastest is taken")
    a = p.parse_args(argv)
    if a.peer_runs < 1:
        p.error("--peer-runs must be at least 1")
    if a.worker == "real":
        print(json.dumps(real_worker(a)))
        return 0
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    if a.real_shapes:
        return real_main(a)
    if a.prompt_len is None:
        a.prompt_len = 64
    if a.dtypes is None:
        a.dtypes = "f32,bf16"

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
