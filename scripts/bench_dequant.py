"""Dequantisation speed, backends side by side in one run: the torch reference against the
Triton kernels (on CUDA; on CPU only the torch reference runs). Writes CSV rows to --csv.

    python scripts/bench_dequant.py                       # every kernel type, 2816 x 2112 x 8 values
    python scripts/bench_dequant.py --types Q4_K,Q8_0 --csv out/dequant.csv
"""
from __future__ import annotations

import argparse
import csv
import sys
import time

import torch

from diffcli import QTensor
from diffcli.compute.backend import set_backend
from diffcli.gguf.quants import TRITON_TYPES, block_size, type_size


def timed(fn, device: str, repeat: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(sorted(TRITON_TYPES)))
    ap.add_argument("--rows", type=int, default=2112 * 8)
    ap.add_argument("--cols", type=int, default=2816 // 256 * 256)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    fast = "triton" if args.device == "cuda" else None
    out = []
    for qtype in args.types.split(","):
        if args.cols % block_size(qtype):
            print(f"skip {qtype}: {args.cols} columns is not a whole number of blocks")
            continue
        nbytes = args.rows * args.cols // block_size(qtype) * type_size(qtype)
        raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=args.device)
        qt = QTensor(raw, qtype, (args.rows, args.cols), qtype)
        row = {"qtype": qtype, "values": args.rows * args.cols, "device": args.device,
               "dtype": args.dtype}
        for backend in ("torch", fast):
            if backend is None:
                continue
            set_backend(backend)
            row[f"{backend}_ms"] = 1e3 * timed(lambda: qt.dequantize(dtype), args.device,
                                               args.repeat)
        set_backend(None)
        moved = nbytes + row["values"] * dtype.itemsize
        if fast and f"{fast}_ms" in row:
            row["speedup"] = row["torch_ms"] / row[f"{fast}_ms"]
            row[f"{fast}_GBps"] = moved / row[f"{fast}_ms"] / 1e6
        out.append(row)
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()))
    if args.csv and out:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=sorted({k for r in out for k in r}))
            w.writeheader()
            w.writerows(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
