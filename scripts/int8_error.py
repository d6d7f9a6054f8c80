"""How far bf16 mode's logits move from f32 mode's, with and without the int8 kernels.

    python scripts/int8_error.py MODEL.gguf [--prompt-len 64] [--threads 2]

Two denoising steps of a canvas of random ids after a random prompt (the same ids for every
run): the first of a canvas (no self-conditioning), and one self-conditioned on the f32 run's
first logits (the same input everywhere, so each figure is one step's error). On the native CPU
kernels: f32 (the exact
products), bf16 (bf16 products), bf16 + int8 (DIFFCLI_NATIVE_INT8's int8 products where the
weight types allow). Prints, for the two bf16 runs, the relative error of the logits against
f32 (|l - l32| / |l32|, Frobenius), the largest absolute difference, and how many of the canvas'
argmax tokens agree with f32. Needs the native library (python -m diffcli.compute.native build).
"""
from __future__ import annotations

import argparse
import sys

import torch


def step_logits(model, prompt: torch.Tensor, canvas: torch.Tensor, sc: torch.Tensor | None) -> torch.Tensor:
    cache = model.encode(prompt)
    return model.denoise(cache, canvas, sc).float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import diffcli
    from diffcli.compute import native
    if not native.available():
        print("int8_error: the native library is not built (python -m diffcli.compute.native build)",
              file=sys.stderr)
        return 1
    gen = torch.Generator().manual_seed(0)
    ref_model = diffcli.load(a.model, dtype=torch.float32)
    cfg = ref_model.config
    prompt = torch.cat([torch.tensor([2]), torch.randint(10, cfg.vocab_size - 16, (a.prompt_len - 1,),
                                                         generator=gen)])
    canvas = torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=gen)
    first = step_logits(ref_model, prompt, canvas, None)
    refs = [first, step_logits(ref_model, prompt, canvas, first)]
    del ref_model
    model = diffcli.load(a.model, dtype=torch.bfloat16)
    rows = []
    for name, on in (("bf16", False), ("bf16 + int8", True)):
        native.set_int8(on)
        for step, (sc, ref) in enumerate(zip((None, first), refs), 1):
            got = step_logits(model, prompt, canvas, sc)
            rel = ((got - ref).norm() / ref.norm()).item()
            agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
            rows.append((name, step, rel, (got - ref).abs().max().item(), agree))
    native.set_int8(False)
    print(f"{a.model}: logits against f32 mode, {first.shape[0]} canvas rows x {first.shape[1]} vocabulary "
          f"({model.cpu_kernels})")
    moved = ((refs[1] - refs[0]).norm() / refs[0].norm()).item()
    print(f"  (self-conditioning moves the f32 logits by {moved:.2e} of their norm at step 2)")
    for name, step, rel, mx, agree in rows:
        print(f"  {name:12s} step {step}: relative error {rel:.2e}   max |diff| {mx:.3e}   "
              f"argmax agrees {agree:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
