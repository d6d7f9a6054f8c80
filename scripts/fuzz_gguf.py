#!/usr/bin/env python3
"""Long fuzz runs of diffcli's untrusted-file path (the CI test, tests/test_fuzz.py, runs 2,000).

Mutants of three tiny well-formed files (F32, Q8_0, Q4_K_M; random weights, the toy vocabulary
and chat template) go through what `diffcli inspect` and `diffcli run` do with a file: open the
GGUF, describe it, read the config, tokenizer and chat template, tokenize, render, load the
weights (tests/_gguffuzz.py: `mutate`, `exercise`). Mutations aim at the structure: counts,
string lengths, value and ggml type codes, dims, offsets, string bytes; values of the wrong type,
edge values of the config keys, token lists and merges, hostile templates, truncation.

Each mutant runs in this process under a wall-clock alarm (--timeout: past it, the mutant is a
hang), with its time taken and the process's peak RSS read before and after it (a mutant that
raises the peak by N MiB is reported with N; --fork runs each in a forked child instead, slower,
with the child's own peak). A mutant may end "ok" or in a DiffcliError with a one-line message;
anything else (a foreign exception, a multi-line message, inspect and run disagreeing, a crash,
a hang) is a finding, written with its bytes to --out.

    .venv/bin/python scripts/fuzz_gguf.py -n 100000 --seed 1 --out fuzz-out
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import _gguffuzz as gz  # noqa: E402


def rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Hang(BaseException):
    pass


def _alarm(*_):
    raise Hang


def run_one(path: str, timeout: float) -> dict:
    """Exercise one file; what ended it, and a finding if it is one."""
    from diffcli.errors import DiffcliError
    out: dict = {}
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        out["end"] = gz.exercise(path)
    except DiffcliError as exc:
        msg = exc.message
        out["end"] = "error"
        out["message"] = msg[:300]
        if "\n" in msg or "\r" in msg or "\x00" in msg:
            out["finding"] = "message is not one clean line"
    except Hang:
        out["end"], out["finding"] = "hang", f"ran past {timeout:g} s"
    except BaseException as exc:   # noqa: BLE001 - a foreign exception is what we look for
        import traceback
        if isinstance(exc, KeyboardInterrupt):
            raise
        out["end"] = "inconsistent" if isinstance(exc, gz.Inconsistent) else "foreign"
        out["finding"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        out["where"] = traceback.format_exc().splitlines()[-6:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return out


def run_forked(path: str, timeout: float) -> tuple[dict, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        start = rss_kib()
        out = run_one(path, timeout)
        out["grew_kib"] = max(0, peak_kib() - start)
        os.write(w, (json.dumps(out) + "\n").encode())
        os._exit(0)
    os.close(w)
    _, status, _ = os.wait4(pid, 0)
    line = os.read(r, 1 << 16).decode()
    os.close(r)
    try:
        out = json.loads(line)
    except ValueError:
        out = {"end": "crash", "finding": f"child died (status {status}) without a result"}
    return out, out.pop("grew_kib", 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--mutants", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds before a mutant is a hang")
    ap.add_argument("--fork", action="store_true", help="each mutant in a forked child")
    ap.add_argument("--out", type=Path, default=Path("fuzz-out"))
    ap.add_argument("--report-every", type=int, default=5000)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(gz.scratch_dir(tempfile.mkdtemp(prefix="diffcli-fuzz-")))
    bases = gz.base_files(work)
    fields = {k: gz.fields(b) for k, b in bases.items()}
    for kind in bases:                                   # warm up: imports, kernels, templates
        assert gz.exercise(work / f"base-{kind}.gguf") == "ok", kind
    signal.signal(signal.SIGALRM, _alarm)
    rng = random.Random(args.seed)
    ends: Counter = Counter()
    findings = []
    slowest: list[tuple[float, str]] = []
    biggest: list[tuple[int, str]] = []
    start_peak = peak_kib()
    t0 = time.time()
    path = str(work / "mutant.gguf")
    try:
        for i in range(args.mutants):
            kind = rng.choice(sorted(bases))
            data, what = gz.mutate(bases[kind], rng, fields[kind])
            with open(path, "wb") as fh:
                fh.write(data)
            before = peak_kib()
            start = time.perf_counter()
            if args.fork:
                out, grew = run_forked(path, args.timeout)
            else:
                out = run_one(path, args.timeout)
                grew = peak_kib() - before           # > 0 only when this mutant set a new peak
            wall = time.perf_counter() - start
            label = f"#{i} {kind}: {what}"
            ends[out["end"]] += 1
            if len(slowest) < 5 or wall > slowest[-1][0]:
                slowest = sorted(slowest + [(wall, label)], reverse=True)[:5]
            if grew > 0 and (len(biggest) < 5 or grew > biggest[-1][0]):
                biggest = sorted(biggest + [(grew, label)], reverse=True)[:5]
            if "finding" in out:
                findings.append({"mutant": i, "base": kind, "mutation": what, **out})
                (args.out / f"finding-{i}.gguf").write_bytes(data)
            if (i + 1) % args.report_every == 0 or i + 1 == args.mutants:
                rate = (i + 1) / (time.time() - t0)
                print(f"{i + 1:,} mutants, {rate:.1f}/s: {dict(ends)}; findings {len(findings)}; "
                      f"slowest {slowest[0][0]:.3f} s; peak RSS {peak_kib() / 1024:.0f} MiB "
                      f"(+{(peak_kib() - start_peak) / 1024:.1f} since the start)", flush=True)
                (args.out / "findings.json").write_text(json.dumps(findings, indent=1))
    finally:
        for p in work.glob("*.gguf"):
            p.unlink()
    summary = {
        "mutants": sum(ends.values()), "seed": args.seed, "seconds": round(time.time() - t0, 1),
        "mode": "fork" if args.fork else "in-process",
        "ends": dict(ends), "findings": len(findings),
        "foreign_exceptions": ends["foreign"], "hangs": ends["hang"], "crashes": ends["crash"],
        "inconsistent": ends["inconsistent"],
        "slowest": [{"seconds": round(s, 3), "mutant": m} for s, m in slowest],
        "peak_rss_mib": round(peak_kib() / 1024, 1),
        "peak_rss_growth_mib": round((peak_kib() - start_peak) / 1024, 1),
        "most_memory": [{"mib_above_previous_peak" if not args.fork else "mib_above_start":
                         round(k / 1024, 1), "mutant": m} for k, m in biggest],
    }
    (args.out / "findings.json").write_text(json.dumps(findings, indent=1))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
