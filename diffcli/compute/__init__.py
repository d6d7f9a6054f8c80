"""Where the arithmetic runs: the backend choice (`backend`: triton | native | torch), the
quantized ops the model calls (`ops`), the native C++ library's loader (`native`) and the
CUDA-graph step runner (`graphs`). Builds on `diffcli.gguf` and `diffcli.kernels`."""
