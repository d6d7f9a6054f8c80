"""Triton kernels (imported as `diffcli.kernels`) and the C++ CPU kernels under native/.

Nothing here imports from the rest of diffcli: kernels take raw uint8 ggml blocks and torch
tensors, and the launchers check dtype, contiguity and shape before launching.
"""
