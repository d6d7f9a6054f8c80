#!/usr/bin/env python
"""One call on a GPU, everything measured (issue 17): run through scripts/gpu_check.sh.

    OUT=out/gpu scripts/gpu_check.sh                 # a fresh H100/H200: ~7 minutes
    python scripts/gpu_check.py --out DIR --budget 450 --only env,sweep

Sections, in order, each with its share of the time budget; one that overruns stops between
items, and whatever was measured is written (JSON and markdown after every section):
- env: versions, device, the two ceilings (device-to-device copy GB/s, 8192^3 bf16 matmul TFLOP/s).
- background, started at once and run beside each other: the gpu-marked tests (pytest -m gpu), the
  full-shape synthetic Q4_K_M file (synth_gguf.py, ~16.8 GB in --tmp), and workers that compile
  every kernel the sweep times (Triton's on-disk cache is shared), so the timed sections mostly
  find their kernels compiled. Timing starts only after the tests and the compilers are done.
- numerics: every grouped variant's relative error next to today's bf16 kernel, one small shape
  per weight type (runs on the CPU too: `python scripts/gpu_check.py --only numerics`), and the
  float64 simulation of the activation-quantization choices at K = 2816 (Gaussian and
  heavy-tailed activations; round-to-nearest bf16 weights and outputs as on a GPU).
- kernels: bench.py's kernel rows at real shapes (today's fused qmatmul and MoE against the torch
  path, the fused vocabulary head, the two attention forms).
- sweep: the grouped kernels of kernels/mmq.py (every variant, a few tile configs each) against
  today's kernel at the real expert and projection shapes of the Q4_K_M and Q8_0 files, T = 256
  (one canvas); time is GPU time of CUDA-graph replays over enough weight copies to defeat L2.
  Per shape it keeps the fastest variant whose relative error (against fp32) is within 1.5x of
  today's kernel's and that beats today's by more than 3%: choices.json, the table
  kernels/select.py reads (copy it to kernels/choices.json to make it the default).
- model: bench.py's model rows on the synthetic file (load, 4k prefill, the step eager and with
  CUDA graphs, fused head on and off, generate at 16 and 48 steps per canvas, peak memory), then
  the same step and a 16-step generation with the sweep's choices, and how far the logits moved.
- profile: one self-conditioned step, eager: top kernels by GPU time, kernel launches, GPU time
  against wall time (with the choices too when there are any).

Files under --out ($OUT): gpu_check.json (every row), gpu_check.md (the tables), choices.json,
log.txt (gpu_check.sh tees the console), tests.txt, background.txt.
Without CUDA the same code runs at tiny shapes under TRITON_INTERPRET=1 (to exercise the script;
its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench  # noqa: E402  (sets TRITON_INTERPRET=1 without CUDA, before any kernel import)
from bench import CUDA, errors, rand_qtensor  # noqa: E402

from diffcli.gguf import quants  # noqa: E402
from diffcli.kernels import mmq, select  # noqa: E402
from diffcli.kernels.moe import moe_triton  # noqa: E402
from diffcli.kernels.moe_mmq import moe_grouped  # noqa: E402
from diffcli.kernels.qmatmul import qmatmul  # noqa: E402

SECTIONS = ("env", "numerics", "tests", "kernels", "sweep", "model", "profile")
# share of the budget per timed section (env and the background waits take what they need)
SHARE = {"kernels": 0.12, "sweep": 0.30, "model": 0.38, "profile": 0.06}
GPU_TEST_FILES = ["tests/test_mmq_triton.py", "tests/test_qmatmul_triton.py",
                  "tests/test_moe_triton.py", "tests/test_vocab_triton.py", "tests/test_quants.py",
                  "tests/test_graphs.py", "tests/test_model.py", "tests/test_placement.py",
                  "tests/test_cli.py"]
MAIN_VARIANTS = ("mmq", "repack")                       # swept over every tile config
OTHER_VARIANTS = ("mmq+repack", "exact", "mmq1")        # default config only
DENSE_CFGS = [dict(BM=64, BN=64, GPI=4, warps=4, stages=2), dict(BM=128, BN=64, GPI=4, warps=8, stages=2),
              dict(BM=64, BN=128, GPI=4, warps=8, stages=2), dict(BM=128, BN=128, GPI=2, warps=8, stages=2),
              dict(BM=64, BN=64, GPI=8, warps=4, stages=3), dict(BM=32, BN=64, GPI=4, warps=4, stages=2)]
MOE_CFGS = [dict(BM=16, BN=64, GPI=4, warps=4, stages=2, down_BN=64, down_warps=4),
            dict(BM=16, BN=128, GPI=4, warps=4, stages=2, down_BN=128, down_warps=4),
            dict(BM=32, BN=64, GPI=4, warps=4, stages=2, down_BN=64, down_warps=4),
            dict(BM=64, BN=64, GPI=4, warps=8, stages=2, down_BN=64, down_warps=8),
            dict(BM=16, BN=64, GPI=8, warps=4, stages=3, down_BN=128, down_warps=8)]
# the real shapes (spec §B.5), by bytes read per step: experts (gate/up, down), then projections
MOE_SHAPES = [("Q4_K", "Q5_0"), ("Q4_K", "Q8_0"), ("Q8_0", "Q8_0")]
DENSE_SHAPES = [("Q4_K", 2112, 2816), ("Q4_K", 4096, 2816), ("Q4_K", 2816, 4096),
                ("Q4_K", 2048, 2816), ("Q8_0", 2816, 2112), ("Q5_0", 2816, 2112),
                ("Q4_K", 8192, 2816), ("Q4_K", 2816, 8192), ("Q6_K", 2048, 2816),
                ("Q4_K", 1024, 2816), ("Q8_0", 2112, 2816), ("Q8_0", 4096, 2816)]
TINY_DENSE = [("Q4_K", 64, 256), ("Q6_K", 64, 256), ("Q5_0", 64, 160), ("Q8_0", 64, 160)]
TINY_MOE = dict(T=9, A=2, E=4, K=256, F=64)
REAL_MOE = dict(T=256, A=8, E=128, K=2816, F=704)
L2_DEFEAT_BYTES = 256 << 20        # rotate weight copies until each timing pass reads this much


class Report:
    """Rows and notes; written to JSON and markdown whenever a section ends (and at exit)."""

    def __init__(self, out: str):
        self.out, self.rows, self.notes, self.t0 = out, [], [], time.time()
        self.choices: dict = {}
        self.lock = threading.Lock()

    def add(self, section: str, **row):
        row = {"section": section, **row}
        with self.lock:
            self.rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        return row

    def note(self, text: str):
        with self.lock:
            self.notes.append(f"[{time.time() - self.t0:6.1f}s] {text}")
        print("NOTE", text, flush=True)

    def write(self):
        with self.lock:
            rows, notes, choices = list(self.rows), list(self.notes), dict(self.choices)
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump({"rows": rows, "notes": notes, "choices": choices,
                       "elapsed_s": time.time() - self.t0}, f, indent=1, default=str)
        with open(os.path.join(self.out, "gpu_check.md"), "w") as f:
            f.write(markdown(rows, notes, time.time() - self.t0))
        env = next((r for r in rows if r["section"] == "env" and r.get("name") == "versions"), {})
        with open(os.path.join(self.out, "choices.json"), "w") as f:
            json.dump({"about": "kernels/select.py's table, measured by scripts/gpu_check.py",
                       "device": env.get("device"), "torch": env.get("torch"),
                       "triton": env.get("triton"), "choices": choices}, f, indent=1)


def markdown(rows, notes, elapsed) -> str:
    lines = [f"# gpu_check ({elapsed:.0f} s)", ""]
    for section in dict.fromkeys(r["section"] for r in rows):
        rs = [r for r in rows if r["section"] == section]
        cols = [c for c in dict.fromkeys(k for r in rs for k in r) if c != "section"]
        fmt = lambda v: (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", "/")  # noqa
        lines += [f"## {section}", "", "| " + " | ".join(cols) + " |",
                  "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rs]
        lines.append("")
    if notes:
        lines += ["## notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


class Clock:
    def __init__(self, budget: float):
        self.start, self.budget = time.time(), budget

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def section(self, name: str) -> float:
        """Deadline (absolute) for a section: its share of the budget, within what is left."""
        return time.time() + max(0.0, min(self.left(), SHARE.get(name, 0.1) * self.budget))


# -- timing ---------------------------------------------------------------------------------------

def gpu_ms(fns, reps: int) -> float:
    """Median GPU ms of one call, calls cycling over `fns` (one per weight copy): a CUDA graph
    of one pass over all of them, replayed; eager events when capture fails; wall clock on CPU."""
    if not CUDA:
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        return 1e3 * (time.perf_counter() - t0) / len(fns)
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for fn in fns:                  # once on the side stream before capture
                fn()
            with torch.cuda.graph(g, stream=s):
                for fn in fns:
                    fn()
        torch.cuda.current_stream().wait_stream(s)
        run = g.replay
    except Exception:
        def run():
            for fn in fns:
                fn()
    run()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times) / len(fns)


def copies_of(qt, n: int):
    from diffcli.gguf.qtensor import QTensor
    return [qt] + [QTensor(qt.raw.clone(), qt.qtype, qt.shape, qt.name) for _ in range(n - 1)]


# -- the sweep plan (shared with the compile workers) ----------------------------------------------

def sweep_plan(tiny: bool) -> list[dict]:
    """Items in priority order: the experts first (they are ~90% of the bytes), then projections."""
    moe, dense = [], []
    moe_shapes = MOE_SHAPES[:2] if tiny else MOE_SHAPES
    dense_shapes = TINY_DENSE if tiny else DENSE_SHAPES
    plan = moe
    for gu, dn in moe_shapes:
        plan.append(dict(op="moe", types=(gu, dn), variant="bf16", cfg={}))
        for v in MAIN_VARIANTS:
            for cfg in (MOE_CFGS[:1] if tiny else MOE_CFGS):
                plan.append(dict(op="moe", types=(gu, dn), variant=v, cfg=cfg))
        for v in OTHER_VARIANTS:
            plan.append(dict(op="moe", types=(gu, dn), variant=v, cfg={}))
    plan = dense
    for qtype, N, K in dense_shapes:
        plan.append(dict(op="qmatmul", types=(qtype, N, K), variant="bf16", cfg={}))
        for v in MAIN_VARIANTS:
            for cfg in (DENSE_CFGS[:1] if tiny else DENSE_CFGS):
                plan.append(dict(op="qmatmul", types=(qtype, N, K), variant=v, cfg=cfg))
        for v in OTHER_VARIANTS:
            plan.append(dict(op="qmatmul", types=(qtype, N, K), variant=v, cfg={}))
    return dense + moe if tiny else moe + dense         # tiny: the quick ones first (CPU runs)


class Inputs:
    """Random weights and activations per shape, made on the device once (seeded)."""

    def __init__(self, device, dtype, tiny: bool):
        self.device, self.dtype, self.tiny, self.cache = device, dtype, tiny, {}

    def dense(self, qtype, N, K):
        key = ("qmatmul", qtype, N, K)
        if key not in self.cache:
            self.cache.clear()                       # one shape at a time: memory
            gen = torch.Generator(device=self.device).manual_seed(zlib.crc32(str(key).encode()))
            qt = rand_qtensor(qtype, (N, K), self.device, gen)
            T = 33 if self.tiny else 256
            x = torch.randn(T, K, device=self.device, generator=gen).to(self.dtype)
            self.cache[key] = (qt, x)
        return self.cache[key]

    def moe(self, gu_t, dn_t):
        key = ("moe", gu_t, dn_t)
        if key not in self.cache:
            self.cache.clear()
            d = TINY_MOE if self.tiny else REAL_MOE
            gen = torch.Generator(device=self.device).manual_seed(zlib.crc32(str(key).encode()))
            gu = rand_qtensor(gu_t, (d["E"], 2 * d["F"], d["K"]), self.device, gen)
            dn = rand_qtensor(dn_t, (d["E"], d["K"], d["F"]), self.device, gen)
            x = torch.randn(d["T"], d["K"], device=self.device, generator=gen).to(self.dtype)
            probs = torch.softmax(torch.randn(d["T"], d["E"], device=self.device, generator=gen), -1)
            w, ids = torch.topk(probs, d["A"], dim=-1)
            self.cache[key] = (gu, dn, x, ids, w / w.sum(-1, keepdim=True))
        return self.cache[key]


def call_of(item, inputs: Inputs, qt_override=None):
    """A no-argument callable running one plan item (and its weights' copy `qt_override`)."""
    v, cfg = item["variant"], item["cfg"]
    if item["op"] == "qmatmul":
        qt, x = inputs.dense(*item["types"])
        qt = qt_override or qt
        if v == "bf16":
            return lambda: qmatmul(x, qt)
        return lambda: mmq.grouped_matmul(x, qt, v, **cfg)
    gu, dn, x, ids, w = inputs.moe(*item["types"])
    if qt_override:
        gu, dn = qt_override
    if v == "bf16":
        return lambda: moe_triton(x, gu, dn, ids, w)
    return lambda: moe_grouped(x, gu, dn, ids, w, v, **cfg)


def compile_worker(shard: int, nshards: int, tiny: bool) -> int:
    """Run every shard-th plan item once (compiles it into Triton's on-disk cache)."""
    device = torch.device("cuda" if CUDA else "cpu")
    inputs = Inputs(device, torch.bfloat16 if CUDA else torch.float32, tiny)
    plan = sweep_plan(tiny)
    # what the model section runs besides: today's kernels at the warm-up (64) and prefill (4096)
    # rows, and the vocabulary head at the canvas shape
    plan += [dict(op="qmatmul", types=t, variant="bf16", cfg={}, T=T)
             for t in (TINY_DENSE if tiny else DENSE_SHAPES) for T in (64, 4096)]
    plan += [dict(op="moe", types=t, variant="bf16", cfg={}, T=T)
             for t in (MOE_SHAPES[:2]) for T in (64, 4096)]
    plan.append(dict(op="vocab", types=("bf16",), variant="bf16", cfg={}))
    # group by shape so each worker makes few inputs
    items = sorted(enumerate(plan), key=lambda p: (str(p[1]["types"]), p[0]))[shard::nshards]
    t0 = time.time()
    for _, item in items:
        try:
            if item["op"] == "vocab":
                C, H, V = (33, 96, 1000) if tiny else (256, 2816, 262144)
                bench.bench_vocab(C, H, V, inputs.dtype, device, 1)
            elif "T" in item and item["op"] == "qmatmul":   # the model's prefill / warm-up tiles
                qt, x = inputs.dense(*item["types"])
                qmatmul(x[:1].expand(item["T"], -1).contiguous(), qt)
            elif "T" in item:
                gu, dn, x, ids, w = inputs.moe(*item["types"])
                reps = -(-item["T"] // x.shape[0])
                moe_triton(x.repeat(reps, 1)[:item["T"]], gu, dn, ids.repeat(reps, 1)[:item["T"]],
                           w.repeat(reps, 1)[:item["T"]])
            else:
                call_of(item, inputs)()
        except Exception as exc:                         # the timed run reports it
            print(f"compile shard {shard}: {item['op']} {item['types']} {item['variant']}: "
                  f"{type(exc).__name__}: {str(exc)[:200]}", flush=True)
    if CUDA:
        torch.cuda.synchronize()
    print(f"compile shard {shard}: {len(items)} items in {time.time() - t0:.1f} s", flush=True)
    return 0


# -- sections ----------------------------------------------------------------------------------------

def section_env(rep: Report, device):
    import triton
    env = dict(name="versions", torch=torch.__version__, triton=triton.__version__,
               python=sys.version.split()[0],
               device=torch.cuda.get_device_name() if CUDA else "cpu (interpreter)")
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        env.update(sms=p.multi_processor_count, memory_GiB=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}")
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as exc:
            env["driver"] = f"nvidia-smi: {exc}"
    rep.add("env", **env)
    if not CUDA:
        return
    n = 1 << 30                                                   # 2 GiB bf16 copy
    a = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = gpu_ms([lambda: b.copy_(a)], 10)
    rep.add("env", name="ceiling: device copy", value=2 * a.nbytes / ms / 1e6, unit="GB/s",
            ms=ms, note="bytes read + written")
    del a, b
    m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    o = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = gpu_ms([lambda: m @ o], 10)
    rep.add("env", name="ceiling: bf16 matmul 8192^3", value=2 * 8192 ** 3 / ms / 1e9,
            unit="TFLOP/s", ms=ms, note="random data")
    del m, o
    torch.cuda.empty_cache()


def start_background(args, rep: Report, want_tests: bool, want_synth: bool, want_compile: bool):
    procs = {}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(os.path.join(args.out, "background.txt"), "w")
    if want_synth:
        path = os.path.join(args.tmp, "synthetic-q4_k_m.gguf")
        cmd = [sys.executable, os.path.join(HERE, "synth_gguf.py"), path] + \
            (["--tiny"] if args.tiny else [])
        procs["synth"] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           cwd=ROOT), time.time(), path)
    if want_tests:
        files = [f for f in GPU_TEST_FILES if os.path.exists(os.path.join(ROOT, f))]
        # -P: not the checkout's own diffcli/ (no kernels/ inside) ahead of the package view
        cmd = [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "pytest",
               "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", *files]
        procs["tests"] = (subprocess.Popen(cmd, stdout=open(os.path.join(args.out, "tests.txt"), "w"),
                                           stderr=subprocess.STDOUT, env=env, cwd=ROOT),
                          time.time(), None)
    if want_compile and args.workers > 0:
        for i in range(args.workers):
            cmd = [sys.executable, os.path.abspath(__file__), "--compile-shard",
                   f"{i}/{args.workers}"] + (["--tiny"] if args.tiny else [])
            procs[f"compile{i}"] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                     env=env, cwd=ROOT), time.time(), None)
    rep.note(f"background started: {', '.join(procs) or 'nothing'}")
    return procs


def wait_for(procs, names, deadline: float, rep: Report):
    for name in names:
        if name not in procs:
            continue
        p, t0, _ = procs[name]
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
            rep.note(f"{name} finished in {time.time() - t0:.0f} s (exit {p.returncode})")
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rep.note(f"{name} stopped at its time limit ({time.time() - t0:.0f} s)")


def summarize_tests(rep: Report, out: str):
    path = os.path.join(out, "tests.txt")
    if not os.path.exists(path):
        return
    text = open(path, errors="replace").read()
    counts = {k: 0 for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    failed = []
    for line in text.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):           # -rfE summary: what went wrong
            failed.append(line[:200])
        elif "::" in line:                                   # -v: "path::test[...] PASSED [ 9%]"
            for k in counts:
                if f" {k}" in line:
                    counts[k] += 1
                    break
    tail = [ln for ln in text.splitlines()
            if ln.startswith("=") and any(w in ln for w in ("passed", "failed", "error"))]
    rep.add("tests", name="pytest -m gpu", passed=counts["PASSED"], failed=counts["FAILED"],
            errors=counts["ERROR"], skipped=counts["SKIPPED"],
            summary=tail[-1].strip("= ") if tail else "no summary line (stopped?)")
    for line in failed[:20]:
        rep.add("tests", name=line)


def section_numerics(rep: Report, device):
    """Errors against float64: the kernels at one shape per type, and a float64 simulation."""
    gen = torch.Generator(device=device).manual_seed(17)
    for qtype, N, K in (("Q4_K", 64, 2816), ("Q6_K", 64, 2816), ("Q5_0", 64, 2112),
                        ("Q8_0", 64, 2112)):
        qt = rand_qtensor(qtype, (N, K), device, gen)
        x = torch.randn(16, K, device=device, generator=gen).to(torch.bfloat16)
        ref = x.double() @ quants.dequantize_torch(qt.raw, qtype).view(N, K).double().t()
        today = errors(qmatmul(x, qt), ref)[1]
        row = dict(name=f"{qtype} 16x{K}->{N}", bf16_today=today)
        for v in mmq.VARIANTS:
            e = errors(mmq.grouped_matmul(x, qt, v), ref)[1]
            row[v] = e
            row[f"{v}/today"] = e / today
        rep.add("numerics", **row)
    # float64 simulation: x @ w with w Gaussian, bf16 rounding to nearest even as on a GPU
    g = torch.Generator().manual_seed(18)
    T, K, N = 64, 2816, 512
    for dist in ("gaussian", "heavy-tailed"):
        x = torch.randn(T, K, generator=g, dtype=torch.float64)
        if dist == "heavy-tailed":                     # like gelu(g) * u: a product of Gaussians
            x = x * torch.randn(T, K, generator=g, dtype=torch.float64).abs() ** 2
        x = x.to(torch.bfloat16).double()
        w = torch.randn(N, K, generator=g, dtype=torch.float64) * 0.02
        ref = x @ w.t()
        rel = lambda y: ((y.to(torch.bfloat16).double() - ref).norm() / ref.norm()).item()  # noqa
        today = rel(x @ w.to(torch.bfloat16).double().t())
        grp = x.view(T, K // 32, 32)
        d = grp.abs().amax(-1, keepdim=True) / 127
        q1 = torch.round(grp / d)
        q2 = torch.round((grp / d - q1) * 254)
        row = dict(name=f"float64 simulation, {dist} x, K={K}", bf16_today=today,
                   mmq1=rel((q1 * d).view(T, K) @ w.t()),
                   mmq=rel(((q1 + q2 / 254) * d).view(T, K) @ w.t()), exact=rel(ref))
        for v in ("mmq1", "mmq", "exact"):
            row[f"{v}/today"] = row[v] / today
        rep.add("numerics", **row)


def section_kernels(rep: Report, device, dtype, deadline: float, tiny: bool, reps: int):
    """bench.py's kernel rows (today's kernels against the torch path), within the deadline."""
    steps = []
    if tiny:
        steps = [lambda: bench.bench_qmatmul(bench.TINY_SHAPES, 33, dtype, device, reps, False),
                 lambda: bench.bench_moe(33, 2, 8, 256, 96, [("Q4_K", "Q5_0")], dtype, device, reps),
                 lambda: bench.bench_vocab(33, 96, 1000, dtype, device, reps),
                 lambda: bench.bench_attention(33, 4, 40, [(16, 2), (32, 1)], dtype, device, reps)]
    else:
        steps = [lambda: bench.bench_moe(256, 8, 128, 2816, 704, [("Q4_K", "Q5_0"), ("Q4_K", "Q8_0")],
                                         dtype, device, reps),
                 lambda: bench.bench_attention(256, 16, 4096 + 256, [(256, 8), (512, 2)], dtype,
                                               device, reps),
                 lambda: bench.bench_vocab(256, 2816, 262144, dtype, device, reps),
                 lambda: bench.bench_qmatmul(bench.REAL_SHAPES[:8], 256, dtype, device, reps, False)]
    for step in steps:
        if time.time() > deadline:
            rep.note("kernels: stopped at its time limit")
            break
        try:
            for row in step():
                rep.add("kernels", **{k: v for k, v in row.items() if k != "section"})
        except Exception as exc:
            rep.note(f"kernels: {type(exc).__name__}: {str(exc)[:300]}")
        if CUDA:
            torch.cuda.empty_cache()


def reference_of(item, inputs: Inputs):
    """fp32 result on the exactly dequantized weights (x as given)."""
    if item["op"] == "qmatmul":
        qt, x = inputs.dense(*item["types"])
        N, K = qt.shape
        return x.float() @ quants.dequantize_torch(qt.raw, qt.qtype).view(N, K).t()
    from diffcli.compute import ops
    from diffcli.compute.backend import set_backend
    gu, dn, x, ids, w = inputs.moe(*item["types"])
    set_backend("torch")
    try:
        return ops.moe_torch(x.float(), gu, dn, ids, w)
    finally:
        set_backend(None)


def weight_bytes(item, inputs: Inputs) -> int:
    if item["op"] == "qmatmul":
        return inputs.dense(*item["types"])[0].nbytes
    gu, dn = inputs.moe(*item["types"])[:2]
    return gu.nbytes + dn.nbytes


def section_sweep(rep: Report, device, dtype, deadline: float, tiny: bool, reps: int,
                  limit: int | None):
    inputs = Inputs(device, dtype, tiny)
    plan = sweep_plan(tiny)[:limit]
    best: dict[str, dict] = {}
    shape_ref, shape_copies = {}, {}
    for item in plan:
        if time.time() > deadline:
            rep.note(f"sweep: stopped at its time limit before {item['op']} {item['types']}")
            break
        shape = (item["op"], item["types"])
        if item["op"] == "qmatmul":
            qt, x = inputs.dense(*item["types"])
            key = select.qmatmul_key(qt.qtype, *qt.shape, x.shape[0])
        else:
            gu, dn, x, ids, w = inputs.moe(*item["types"])
            key = select.moe_key(gu.qtype, dn.qtype, gu.shape[0], gu.shape[2], gu.shape[1] // 2,
                                 ids.numel())
        try:
            if shape not in shape_ref:
                shape_ref.clear()
                shape_copies.clear()
                shape_ref[shape] = reference_of(item, inputs)
                n = 1 if not CUDA else max(1, min(16, math.ceil(L2_DEFEAT_BYTES
                                                                / weight_bytes(item, inputs))))
                if item["op"] == "qmatmul":
                    shape_copies[shape] = copies_of(inputs.dense(*item["types"])[0], n)
                else:
                    shape_copies[shape] = [(gu, dn)]
            ref = shape_ref[shape]
            y = call_of(item, inputs)()
            amax, relerr = errors(y, ref)
            fns = [call_of(item, inputs, c) for c in shape_copies[shape]]
            ms = gpu_ms(fns, reps)
        except Exception as exc:
            rep.add("sweep", key=key, variant=item["variant"], cfg=cfg_str(item["cfg"]),
                    error=f"{type(exc).__name__}: {str(exc)[:200]}")
            continue
        gb = weight_bytes(item, inputs) / ms / 1e6
        row = rep.add("sweep", key=key, variant=item["variant"], cfg=cfg_str(item["cfg"]), ms=ms,
                      weight_GBps=gb, rel_err=relerr, max_abs_err=amax)
        entry = best.setdefault(key, {"today": None, "runs": []})
        if item["variant"] == "bf16":
            entry["today"] = row
        else:
            entry["runs"].append((row, item))
    choices = {}
    for key, entry in best.items():
        today = entry["today"]
        if today is None:
            continue
        ok = [(r, it) for r, it in entry["runs"] if r["rel_err"] <= 1.5 * today["rel_err"]]
        summary = dict(key=key, today_ms=today["ms"], today_rel_err=today["rel_err"])
        if ok:
            r, it = min(ok, key=lambda p: p[0]["ms"])
            summary.update(best_variant=r["variant"], best_cfg=r["cfg"], best_ms=r["ms"],
                           best_rel_err=r["rel_err"], speedup=today["ms"] / r["ms"])
            if r["ms"] < 0.97 * today["ms"]:
                choices[key] = {"variant": r["variant"], **it["cfg"]}
        fastest = min(entry["runs"], key=lambda p: p[0]["ms"], default=None)
        if fastest:
            summary.update(fastest_any=fastest[0]["variant"], fastest_any_ms=fastest[0]["ms"],
                           fastest_any_rel_err=fastest[0]["rel_err"])
        rep.add("sweep summary", **summary)
    rep.choices = choices
    rep.note(f"sweep: {len(choices)} shapes where a grouped kernel beats today's "
             f"(within 1.5x of its error)")
    shape_ref.clear()
    shape_copies.clear()
    inputs.cache.clear()
    if CUDA:
        torch.cuda.empty_cache()


def cfg_str(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items()) or "default"


def section_model(rep: Report, device, path: str, deadline: float, tiny: bool, reps: int,
                  choices_path: str | None):
    t_left = deadline - time.time()
    step_counts = (2,) if tiny else ((16, 48) if t_left > 150 else (16,))
    if len(step_counts) == 1 and not tiny:
        rep.note("model: 48-step generation skipped (time)")
    rows, state = bench.bench_model(path, device, 64 if tiny else 4096, 2 if t_left > 120 else 1,
                                    reps, step_counts=step_counts)
    for row in rows:
        rep.add("model", **{k: v for k, v in row.items() if k != "section"})
    rep.write()
    model, cache, canvas, sc = state
    if choices_path and rep.choices and time.time() < deadline:
        import diffcli
        base = model.denoise(cache, canvas, sc).float()
        os.environ["DIFFCLI_KERNEL_CHOICES"] = choices_path
        try:
            if model.step_graph is not None:
                model.step_graph.drop()                         # captured with today's kernels
            alt = model.denoise(cache, canvas, sc).float()      # repacks on first use
            rep.add("model", name="logits with choices vs today's",
                    rel_diff=((alt - base).norm() / base.norm()).item(),
                    argmax_agree=(alt.argmax(-1) == base.argmax(-1)).float().mean().item())
            for graphs in ("off", "on"):
                model.cuda_graphs = graphs == "on"
                ms = bench.timeit(lambda: model.denoise(cache, canvas, sc), reps)
                rep.add("model", name="denoise step (self-cond) [choices]", value=ms, unit="ms",
                        head="unfused", graphs=graphs)
            model.cuda_graphs = True
            if time.time() < deadline:
                C = model.config.canvas_length
                prompt = torch.randint(5, model.config.vocab_size, (256,),
                                       generator=torch.Generator().manual_seed(0))
                done = diffcli.generate(model, prompt, max_new_tokens=C,
                                        sampler=diffcli.SamplerConfig(max_steps=16, confidence=0.0),
                                        seed=0, mode="hf", eog_ids=[-1])
                st = done.stats
                rep.add("model", name="generate 16 steps/canvas [choices]",
                        value=1e3 * C * st.canvases / (st.total_ms - st.prefill_ms), unit="tok/s",
                        ms_per_step=st.ms_per_step, canvases=st.canvases)
            if CUDA:
                rep.add("model", name="peak GPU memory [after choices]",
                        value=torch.cuda.max_memory_allocated() / 2**30, unit="GiB")
        finally:
            os.environ.pop("DIFFCLI_KERNEL_CHOICES", None)
            if model.step_graph is not None:
                model.step_graph.drop()
    return state


def profile_step(state, rep: Report, label: str, top: int):
    """Top kernels of one eager self-conditioned step, launches, GPU vs wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    model, cache, canvas, sc = state
    model.cuda_graphs = False
    model.denoise(cache, canvas, sc)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.denoise(cache, canvas, sc)
    torch.cuda.synchronize()
    wall = 1e3 * (time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.denoise(cache, canvas, sc)
        torch.cuda.synchronize()
    kernels: dict[str, list] = {}
    for e in prof.events():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        t = e.time_range.elapsed_us()                   # a kernel event's own duration
        k = kernels.setdefault(e.name, [0.0, 0])
        k[0] += t
        k[1] += 1
    total = sum(v[0] for v in kernels.values())
    launches = sum(v[1] for v in kernels.values())
    rep.add("profile", name=f"one self-cond step, eager{label}", wall_ms=wall,
            gpu_kernel_ms=total / 1e3, launches=launches, distinct_kernels=len(kernels))
    for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        rep.add("profile", name=f"{name[:70]}{label}", ms=t / 1e3, share=100 * t / max(total, 1),
                calls=n)
    model.cuda_graphs = True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu_check"))
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--tmp", default=None, help="where the synthetic file goes (default: a temp dir)")
    ap.add_argument("--model", default=None, help="a GGUF to use instead of the synthetic file")
    ap.add_argument("--workers", type=int, default=min(10, max(0, (os.cpu_count() or 2) - 4)))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="sweep items at most")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the default without CUDA)")
    ap.add_argument("--compile-shard", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.tiny = args.tiny or not CUDA
    if args.compile_shard:
        i, n = map(int, args.compile_shard.split("/"))
        return compile_worker(i, n, args.tiny)
    only = set(args.only.split(","))
    unknown = only - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    os.makedirs(args.out, exist_ok=True)
    tmp_holder = None
    if args.tmp is None:
        tmp_holder = tempfile.TemporaryDirectory(prefix="gpu_check_")
        args.tmp = tmp_holder.name
    rep, clock = Report(args.out), Clock(args.budget)
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.bfloat16 if CUDA else torch.float32
    reps = args.reps or (10 if CUDA else 1)

    def watchdog():                       # a hung kernel must not cost the results
        time.sleep(max(0.0, args.budget + 60))
        rep.note("watchdog: past the budget + 60 s, exiting")
        rep.write()
        os._exit(3)
    threading.Thread(target=watchdog, daemon=True).start()

    def run(name, fn):
        if name not in only:
            return None
        t0 = time.time()
        try:
            return fn()
        except Exception as exc:
            rep.note(f"{name}: {type(exc).__name__}: {str(exc)[:400]}")
            traceback.print_exc()
        finally:
            rep.note(f"{name}: {time.time() - t0:.0f} s")
            rep.write()

    run("env", lambda: section_env(rep, device))
    run("numerics", lambda: section_numerics(rep, device))
    want_model = "model" in only or "profile" in only
    procs = start_background(args, rep, "tests" in only and CUDA,
                             want_model and args.model is None,
                             CUDA and ("sweep" in only or "kernels" in only))
    # the tests and compilers share the GPU and CPUs with nothing timed; allow them ~1/3 of it
    wait_for(procs, ["tests"] + [n for n in procs if n.startswith("compile")],
             time.time() + 0.33 * args.budget, rep)
    run("tests", lambda: summarize_tests(rep, args.out))
    run("kernels", lambda: section_kernels(rep, device, dtype, clock.section("kernels"),
                                           args.tiny, reps))
    run("sweep", lambda: section_sweep(rep, device, dtype, clock.section("sweep"), args.tiny,
                                       reps, args.limit))
    state = None
    if want_model:
        path = args.model
        if path is None and "synth" in procs:
            wait_for(procs, ["synth"], time.time() + max(30.0, 0.5 * clock.left()), rep)
            path = procs["synth"][2] if procs["synth"][0].returncode == 0 else None
        if path and os.path.exists(path):
            choices_path = os.path.join(args.out, "choices.json")
            state = run("model", lambda: section_model(rep, device, path, clock.section("model"),
                                                       args.tiny, 8 if CUDA else 1, choices_path))
        else:
            rep.note("model: no model file (synthesis failed or stopped)")
    if state is not None and CUDA and "profile" in only:
        def prof():
            profile_step(state, rep, "", 15)
            if rep.choices and clock.left() > 10:
                os.environ["DIFFCLI_KERNEL_CHOICES"] = os.path.join(args.out, "choices.json")
                try:
                    profile_step(state, rep, " [choices]", 8)
                finally:
                    os.environ.pop("DIFFCLI_KERNEL_CHOICES", None)
        run("profile", prof)
    for name, (p, _, _) in procs.items():
        if p.poll() is None:
            p.kill()
    rep.note(f"done in {time.time() - clock.start:.0f} s of a {args.budget:.0f} s budget")
    rep.write()
    bench.print_table([r for r in rep.rows if r["section"] in ("sweep summary", "model", "tests")])
    if tmp_holder is not None:
        tmp_holder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
