"""`load`: a diffusion-gemma GGUF opened, checked, placed (placement.py) and wrapped in a
DiffusionGemma, its weights left quantized where they are placed."""
from __future__ import annotations

import torch

from ..compute import native
from ..compute.backend import DTYPES, default_dtype, keep_freed_memory
from ..errors import InputError
from ..gguf.reader import open_gguf
from .config import ModelConfig
from .diffusion_gemma import DiffusionGemma
from .weights import load_weights, validate


def load(path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
         cache_embedding: bool | None = None, n_gpu_layers: int = -1, n_cpu_moe: int | None = 0,
         override_tensor=(), mmap: bool = True) -> DiffusionGemma:
    """Open a diffusion-gemma GGUF. Weights stay quantized (raw bytes where they are placed).

    device: the accelerator (or "cpu"). n_gpu_layers / n_cpu_moe / override_tensor place layers
    and tensors as llama.cpp's -ngl / --n-cpu-moe / -ot do (semantics in placement.py); the
    default puts everything on `device`. Before anything is copied to a CUDA device, the bytes
    the placement needs there are checked against the free memory: a placement that cannot fit
    raises InputError naming one that does.
    dtype: activation dtype everywhere (a torch dtype, or "f32" / "bf16" / "f16"; None or "auto":
    the default); default per device (backend.default_dtype): bfloat16 on accelerators, on
    CPUs with bf16 dot products and, for a quantized file, where the native int8 products run
    (AVX2 included); float32 on other CPUs. float32 on the CPU reproduces transformers' fp32
    logits to ~1e-5.
    cache_embedding: keep a dequantized copy of the tied embedding for the head and
    self-conditioning (see DiffusionGemma._dense_embedding); default True off the CPU; on the CPU
    False where the native kernels can use the embedding's blocks (compute/vocab.blocks_usable),
    else only for a bf16 head (a float32 copy would be 4 bytes per value).
    mmap: False (--no-mmap) copies the CPU-placed weights out of the file mapping into process
    memory at load time (the whole file is read once); True leaves them as views of the mapping.
    """
    from .placement import canonical, check_fits, plan_placement
    device = canonical(device)
    if isinstance(dtype, str):
        if dtype != "auto" and dtype not in DTYPES:
            raise InputError(f"unknown activation dtype {dtype!r}",
                             fix=f"use auto or one of {', '.join(DTYPES)}")
        dtype = DTYPES.get(dtype)
    f = open_gguf(path)
    cfg = ModelConfig.from_gguf(f)
    validate(f, cfg)
    plan = plan_placement(f.tensor_names, cfg.n_layer, device, n_gpu_layers, n_cpu_moe or 0,
                          override_tensor or ())
    qtypes = {f.info(n).qtype for n in f.tensor_names}
    act = {d: dtype or default_dtype(d, qtypes=qtypes) for d in {plan.head, *plan.layers, *plan.tensors.values()}}
    check_fits(f, cfg, plan, act, n_gpu_layers=n_gpu_layers, n_cpu_moe=n_cpu_moe or 0,
               override_tensor=override_tensor or ())
    if any(d.type == "cpu" for d in act):
        native.check_settings()
        keep_freed_memory()
    f.prefetch()        # the weights come in from disk in one sequential read, in the background
    weights = load_weights(f, cfg, plan.head, plan, copy=not mmap)
    from ..compute import vocab as cpu_vocab
    if cache_embedding is None:
        # on the CPU the native kernels run the head and self-conditioning on the blocks (no
        # copy: 1.5 GB in bf16 at the real shapes); without them a bf16 head keeps a bf16 copy
        cache_embedding = plan.head.type != "cpu" or (
            act[plan.head] != torch.float32 and not cpu_vocab.blocks_usable(weights.embed, act[plan.head]))
    model = DiffusionGemma(cfg, weights, plan.head, act[plan.head], cache_embedding,
                           plan.layers, act)
    if plan.head.type == "cpu" and not cache_embedding:
        cpu_vocab.prepare(weights.embed, act[plan.head])     # not inside the first step
    model.gguf = f      # keeps the mmap the CPU weights view alive; metadata for the tokenizer
    model.placement = plan
    return model
