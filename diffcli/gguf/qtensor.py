"""QTensor: a quantized tensor that stays quantized in memory.

`raw` holds the ggml blocks as uint8, row-major, one row = `shape[-1]` elements. `shape` is in
torch order (GGUF dims reversed), so a 2-D QTensor is laid out like an `nn.Linear.weight`
`[out, in]`, and a 3-D expert tensor is `[experts, out, in]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quants import dequantize_torch


@dataclass
class QTensor:
    raw: torch.Tensor             # uint8 [nbytes], usually a zero-copy view of the mmap
    qtype: str                    # ggml type name: "F32", "Q4_K", ...
    shape: tuple[int, ...]        # torch order
    name: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def row_bytes(self) -> int:
        rows = self.numel // self.shape[-1] if self.shape else 1
        return self.nbytes // max(rows, 1)

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def blocks(self) -> torch.Tensor:
        """The raw bytes as [rows, row_bytes]."""
        return self.raw.view(-1, self.row_bytes)

    def __getitem__(self, index: int) -> "QTensor":
        """Slice along the first (torch) dim without copying: one expert of an expert tensor."""
        per = self.nbytes // self.shape[0]
        raw = self.raw[index * per:(index + 1) * per]
        return QTensor(raw, self.qtype, tuple(self.shape[1:]), f"{self.name}[{index}]")

    def to(self, device: torch.device | str) -> "QTensor":
        return QTensor(self.raw.to(device), self.qtype, self.shape, self.name)

    def dequantize(self, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """The tensor in `dtype` on `device` (default: where the bytes live), shape `self.shape`,
        through the torch reference dequantizer of its block format (`quants.dequantize_torch`,
        bit-exact with gguf-py). The model goes through `diffcli.compute.ops.dequantize`
        instead, which picks the fastest backend (Triton, native) for the device."""
        raw = self.raw if device is None else self.raw.to(device)
        return dequantize_torch(raw, self.qtype).to(dtype).view(self.shape)

    def __repr__(self) -> str:
        return f"QTensor({self.name!r}, {self.qtype}, shape={list(self.shape)})"
