"""diffcli: run DiffusionGemma 26B-A4B block-diffusion GGUF models on your own machine.

Public API (imported lazily, so `import diffcli` stays cheap):
`open_gguf`, `load`, `load_vision`, `generate`, `stream`, `convert`, `convert_mmproj`, `Tokenizer`,
`SamplerConfig`, `ModelConfig`, `QTensor`, `DiffcliError`.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "open_gguf": "gguf.reader",
    "QTensor": "gguf.qtensor",
    "convert": "gguf.convert",
    "convert_mmproj": "gguf.mmproj",
    "ModelConfig": "model.config",
    "load": "model.loading",
    "load_vision": "model.vision",
    "SamplerConfig": "generation.sampler",
    "generate": "generation.loop",
    "stream": "generation.loop",
    "Tokenizer": "text.tokenizer",
    "DiffcliError": "errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffcli' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
