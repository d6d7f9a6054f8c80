"""PLACEHOLDER until the quant table lands (issue 2): plain float types only."""
import torch

TRITON_TYPES: frozenset[str] = frozenset()


def dequantize_torch(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    if qtype == "F32":
        return raw.view(torch.float32)
    if qtype == "F16":
        return raw.view(torch.float16).float()
    if qtype == "BF16":
        return raw.view(torch.bfloat16).float()
    raise NotImplementedError(qtype)
