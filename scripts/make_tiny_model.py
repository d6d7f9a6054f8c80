#!/usr/bin/env python
"""Write a tiny DiffusionGemma GGUF with RANDOM weights, to try diffcli without the 16 GB model.

Its replies are gibberish (the weights are random), but every code path runs: the toy Gemma-4-style
vocabulary and chat template, canvases, the sampler, chat mode and the live view. Needs only
diffcli's runtime dependencies (no transformers).

    python scripts/make_tiny_model.py                 # -> ./tiny-diffusion-gemma.gguf
    diffcli -m tiny-diffusion-gemma.gguf -p "Hello" --diffusion-visual
    python scripts/make_tiny_model.py --mmproj tiny-mmproj.gguf    # plus a random vision tower
    diffcli -m tiny-diffusion-gemma.gguf --mmproj tiny-mmproj.gguf --image photo.png -p "Describe it."

Prints the path of the file it wrote.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from diffcli.errors import DiffcliError
    from diffcli.testing import make_random_gguf, make_random_mmproj
except ImportError as exc:      # run with a Python that has no diffcli (not .venv's)
    sys.exit(f"make_tiny_model: cannot import diffcli ({exc}); run scripts/setup.sh, then use "
             f".venv/bin/python scripts/make_tiny_model.py (or activate .venv first)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="tiny-diffusion-gemma.gguf", type=Path,
                    help="output file (default: %(default)s)")
    ap.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0", "q4_k_m"],
                    help="tensor type (q4_k_m needs --hidden 256 to use real K-quant rows)")
    ap.add_argument("--hidden", type=int, default=64, choices=[64, 96, 256],
                    help="hidden size of the tiny model (default: %(default)s)")
    ap.add_argument("--canvas", type=int, default=16, help="canvas length (default: %(default)s)")
    ap.add_argument("--layers", type=int, default=4, help="layers (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--mmproj", type=Path, metavar="OUT",
                    help="also write a random vision tower (mmproj) for --image")
    args = ap.parse_args()
    overrides = {"canvas_length": args.canvas, "num_hidden_layers": args.layers}
    try:
        path = make_random_gguf(args.out, overrides, args.outtype, seed=args.seed,
                                variant=f"h{args.hidden}")
        mm = None if args.mmproj is None else make_random_mmproj(args.mmproj, args.hidden, seed=args.seed)
    except DiffcliError as exc:
        print(f"make_tiny_model: error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print(path)
    print(f"make_tiny_model: wrote {path} ({Path(path).stat().st_size / 2**20:.1f} MiB, random weights: "
          f"replies are gibberish); try: diffcli -m {path} -p \"Hello\" --diffusion-visual",
          file=sys.stderr)
    if mm is not None:
        print(f"make_tiny_model: wrote {mm} (a random vision tower); try: diffcli -m {path} "
              f"--mmproj {mm} --image photo.png -p \"Describe it.\"", file=sys.stderr)


if __name__ == "__main__":
    main()
