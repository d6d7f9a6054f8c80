"""Open a model file for a front end: the GGUF's config, tokenizer, chat template and sampler
settings (`open_model_file`), the device to run on (`resolve_device`) and the weights with a
placement (`load_model`). Shared by `diffcli run` and `diffcli serve`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InputError


@dataclass
class ModelFile:
    """A GGUF opened for generation, weights not loaded yet."""
    path: str
    gguf: Any            # the open GGUFFile (memory-mapped)
    config: Any          # ModelConfig
    tokenizer: Any       # Tokenizer
    sampler: Any         # SamplerConfig: command-line value > GGUF key > default
    template: Any        # ChatTemplate (the file's, the given one, or diffcli's built-in)

    @property
    def canvas_length(self) -> int:
        return int(self.config.canvas_length)


def open_model_file(path: str | os.PathLike, *, sampler_overrides: dict[str, Any] | None = None,
                    template_source: str | None = None,
                    template_path: str | None = None) -> ModelFile:
    """Read the metadata, tokenizer and chat template of `path` (cheap: nothing is loaded).
    `template_source` replaces the file's template (`--chat-template-file`); a bad sampler value
    is reported under the `--diffusion-eb-*` flags that set it."""
    from ..generation.sampler import SamplerConfig
    from ..gguf.reader import open_gguf
    from ..model.config import ModelConfig
    from ..text.chat import ChatTemplate
    from ..text.tokenizer import Tokenizer

    path = os.fspath(path)
    f = open_gguf(path)
    cfg = ModelConfig.from_gguf(f)
    try:
        sampler = SamplerConfig.resolve(cfg, **(sampler_overrides or {}))
    except InputError as exc:
        raise InputError(f"--diffusion-eb-*: {exc.problem}", fix=exc.fix) from None
    tokenizer = Tokenizer.from_gguf(f)
    source = template_source if template_source is not None else tokenizer.chat_template
    template = ChatTemplate(source, bos_token=token_text(tokenizer, tokenizer.bos_id, "<bos>"),
                            eos_token=token_text(tokenizer, tokenizer.eos_id, "<eos>"),
                            path=template_path or path)
    return ModelFile(path, f, cfg, tokenizer, sampler, template)


def token_text(tokenizer, i: int | None, default: str) -> str:
    return tokenizer.id_to_token(i) if i is not None and 0 <= i < len(tokenizer) else default


def resolve_device(name: str) -> str:
    import torch
    name = name.lower()
    if name in ("auto", ""):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if name == "none":
        return "cpu"
    if name.startswith("cuda") and name[4:].isdigit():      # llama.cpp's -dev CUDA0
        name = f"cuda:{name[4:]}"
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available",
                         fix="use --device cpu (or auto)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps was asked for but MPS is not available", fix="use --device cpu")
    return name


def load_model(path: str, device: str, *, dtype: str = "auto", n_gpu_layers: int = -1,
               n_cpu_moe: int | None = None, override_tensor: tuple[str, ...] = (),
               mmap: bool = True, threads: int = -1, cuda_graphs: bool = True,
               log: Callable[[str], None] | None = None):
    """diffcli.load with the placement flags (-ngl, --n-cpu-moe, -ot, --no-mmap); a placement
    that splits the model across devices is logged in one line."""
    from .. import load           # the public API (so a caller's patched diffcli.load is used)
    if threads > 0:
        import torch
        torch.set_num_threads(threads)
    model = load(path, device=device, dtype=dtype, n_gpu_layers=n_gpu_layers,
                 n_cpu_moe=n_cpu_moe or 0, override_tensor=tuple(override_tensor), mmap=mmap)
    if not cuda_graphs:
        model.cuda_graphs = False
    plan = getattr(model, "placement", None)
    if log is not None and plan is not None and len({*plan.layers, plan.head, *plan.tensors.values()}) > 1:
        on_accel = sum(d == plan.accel for d in plan.layers)
        off = sum(d.type == "cpu" for d in plan.tensors.values())
        log(f"diffcli: placement: {on_accel}/{len(plan.layers)} layers on {plan.accel}, head on "
            f"{plan.head}; {off} of {len(plan.tensors)} tensors on the CPU")
    return model
