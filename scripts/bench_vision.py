"""CPU time to turn one image into soft tokens, side by side: transformers vs diffcli.

Builds a Gemma 4 vision tower in transformers (a DiffusionGemma with a small text model; the tower's
shape is set by the flags, default hidden 768, 12 layers, 12 heads, MLP 3072, patch 16), converts
its vision tower to an mmproj with diffcli (f32 and q8_0), and times, for one image prepared at the
given soft-token budget (default 280 = 2520 patches), in the same process one after the other:

- transformers 5.23.0 `get_image_features` (tower + embedder), eager fp32, on the padded patches
  its processor makes;
- diffcli `VisionTower.embed` on the real patches, per mmproj type.

Each contender is warmed up once, then timed `--repeats` times; the table gives the median and the
max |difference| of the soft tokens against transformers. With random weights that difference grows
with depth (float32: ~1e-6 at 1 layer, ~2e-5 at 4, ~7e-4 at 12): the tower's attention has scale 1.0
over RMS-normed q and k, so random scores are large and the softmax nearly one-hot, and rounding
differences are amplified layer by layer; q8_0's weight rounding is amplified the same way. The
correctness bound (1e-4) is checked on 1-2 layer towers in tests/test_vision.py.

    python scripts/bench_vision.py
    python scripts/bench_vision.py --layers 27 --hidden 1152 --heads 16 --ff 4304 --budget 280
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ff", type=int, default=3072)
    ap.add_argument("--budget", type=int, default=280, choices=[70, 140, 280, 560, 1120])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    import diffcli
    from diffcli.media.image import prepare_image
    from diffcli.testing import build_tiny_hf_model, save_tiny_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    vision = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.heads, head_dim=args.hidden // args.heads,
                  intermediate_size=args.ff)
    hf = build_tiny_hf_model(vision=vision)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    prep = prepare_image(img, 16, max_soft_tokens=args.budget)
    n, max_patches = len(prep.pixels), args.budget * 9
    pv = torch.zeros(1, max_patches, prep.pixels.shape[1])
    pos = torch.full((1, max_patches, 2), -1, dtype=torch.long)
    pv[0, :n], pos[0, :n] = torch.from_numpy(prep.pixels), torch.from_numpy(prep.positions)

    def timed(fn):
        fn()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times), out

    rows = []
    with torch.no_grad():
        ms, ref = timed(lambda: hf.model.encoder.get_image_features(pv, pos).pooler_output)
    rows.append(("transformers eager fp32", ms, 0.0))
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_checkpoint(hf, tmp)
        for outtype in ("f32", "q8_0"):
            path = diffcli.convert_mmproj(tmp, Path(tmp) / f"mm-{outtype}.gguf", outtype)
            tower = diffcli.load_vision(path, dtype=torch.float32)
            x = torch.from_numpy(prep.pixels)
            ms, got = timed(lambda: tower.embed(x, prep.grid))
            rows.append((f"diffcli {outtype} mmproj, fp32", ms, (got - ref).abs().max().item()))
    print(f"tower: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, MLP {args.ff}; "
          f"image: {n} patches -> {prep.n_tokens} soft tokens; threads {torch.get_num_threads()}")
    base = rows[0][1]
    print(f"{'contender':32} {'ms':>10} {'vs transformers':>16} {'max |diff|':>11}")
    for name, ms, diff in rows:
        print(f"{name:32} {ms:10.1f} {base / ms:15.2f}x {diff:11.2e}")


if __name__ == "__main__":
    main()
