#!/usr/bin/env python
"""diffcli serve vs diffcli run on the same model, prompt, seed and sampler, interleaved in one run.

run:   a fresh `diffcli run ... --json` process per prompt: the process's wall time (start-up and
       loading included: what a script calling run pays per prompt) and the generation time its
       JSON stats report;
serve: one `diffcli serve` process (loaded once), one request at a time: the request latency
       (sent -> whole reply read, non-streaming), the time to the first streamed text, and the
       server's own generation time (the reply's diffusion.total_ms).

Tokens/s is emitted tokens over each time. Both must produce the same text for the same seed
(checked), so they did the same work. Traffic goes to 127.0.0.1 only.

    python scripts/bench_serve.py                       # a tiny random model made in a temp dir
    python scripts/bench_serve.py -m model.gguf -n 256 --runs 3 --device cuda
"""
from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a haiku about diffusion."


def start_server(model: str, flags: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "diffcli", "serve", "-m", model, "--port", "0",
                             "--no-perf", *flags], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = None
    for line in proc.stderr:
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        port = int(m.group(1)) if m else port
        if "diffcli serve: ready" in line:
            return proc, port
    raise SystemExit("bench_serve: the server did not start")


def post(port: int, body: dict) -> tuple[float, float | None, dict]:
    """(latency ms, ms to the first text chunk or None, final JSON or the last stream chunk)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if not body.get("stream"):
        out = json.loads(r.read())
        conn.close()
        return 1000.0 * (time.perf_counter() - t0), None, out
    first, text, final = None, "", {}
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        for c in chunk.get("choices", []):
            if c["delta"].get("content"):
                first = first or 1000.0 * (time.perf_counter() - t0)
                text += c["delta"]["content"]
        if "diffusion" in chunk:
            final = chunk
    conn.close()
    final["text"] = text
    return 1000.0 * (time.perf_counter() - t0), first, final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", help="GGUF (default: a tiny random model)")
    ap.add_argument("-n", type=int, default=64, help="tokens per reply (max_tokens / -n)")
    ap.add_argument("--steps", type=int, default=16, help="--diffusion-eb-max-steps")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("-t", "--threads", type=int, default=-1)
    ap.add_argument("--dtype", default="f32",
                    help="f32 (default) so the texts can be compared: in bf16 the server's prompt "
                    "cache encodes the prompt in two pieces, which moves bf16 rounding")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    model = args.model
    if model is None:
        from diffcli.testing import make_random_gguf
        model = str(make_random_gguf(Path(tmp.name) / "tiny.gguf", None, "f32", seed=0))
    flags = ["--device", args.device, "--dtype", args.dtype, "--diffusion-eb-max-steps",
             str(args.steps), "-t", str(args.threads)]
    proc, port = start_server(model, flags)
    rows: dict[str, list[float]] = {k: [] for k in (
        "run_wall", "run_gen", "serve_latency", "serve_gen", "serve_first_text", "run_tok", "serve_tok")}
    try:
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": args.n, "seed": 1}
        post(port, body)                                     # warm-up (first-call costs)
        for _ in range(args.runs):
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "diffcli", "-m", model, "-p", PROMPT,
                                  "-n", str(args.n), "-s", "1", "--json", "--no-perf", *flags],
                                 capture_output=True, text=True, check=True)
            rows["run_wall"].append(1000.0 * (time.perf_counter() - t0))
            out = json.loads(res.stdout)
            rows["run_gen"].append(out["stats"]["total_ms"])
            n_run = out["stats"]["emitted_tokens"]
            latency, _, reply = post(port, body)
            rows["serve_latency"].append(latency)
            rows["serve_gen"].append(reply["diffusion"]["total_ms"])
            n_serve = reply["usage"]["completion_tokens"]
            _, first, chunk = post(port, {**body, "stream": True})
            rows["serve_first_text"].append(first or 0.0)
            if reply["choices"][0]["message"]["content"] != out["text"] or chunk["text"] != out["text"]:
                raise SystemExit("bench_serve: run and serve disagree on the text; not comparable")
            rows["run_tok"].append(1000.0 * n_run / rows["run_wall"][-1])
            rows["serve_tok"].append(1000.0 * n_serve / latency)
    finally:
        proc.terminate()
        proc.wait(30)
        tmp.cleanup()
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"model {model if args.model else 'tiny random (h64, 4 layers, vocab 512, canvas 16)'}, "
          f"-n {args.n}, {args.steps} steps/canvas max, {args.device} {args.dtype}, threads {args.threads}, "
          f"median of {args.runs} (same text both ways; {n_serve} tokens emitted)")
    print(f"{'':40}{'ms':>10}{'tok/s':>10}")
    print(f"{'diffcli run: process wall time':40}{med['run_wall']:10.1f}{med['run_tok']:10.1f}")
    print(f"{'diffcli run: generation (stats)':40}{med['run_gen']:10.1f}{1000 * n_run / med['run_gen']:10.1f}")
    print(f"{'serve: request latency':40}{med['serve_latency']:10.1f}{med['serve_tok']:10.1f}")
    print(f"{'serve: generation (diffusion.total_ms)':40}{med['serve_gen']:10.1f}"
          f"{1000 * n_serve / med['serve_gen']:10.1f}")
    print(f"{'serve: first streamed text':40}{med['serve_first_text']:10.1f}")
    print(f"serve latency / run wall time: {med['serve_latency'] / med['run_wall']:.3f}; "
          f"serve latency - serve generation (HTTP + queue + JSON): "
          f"{med['serve_latency'] - med['serve_gen']:.1f} ms")


if __name__ == "__main__":
    main()
