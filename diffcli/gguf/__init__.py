"""The GGUF file format: reading (`reader`), block formats and their torch reference
dequantizers (`quants`), `QTensor`, the numpy quantizers (`quantize`) and the Hugging Face ->
GGUF converter (`convert`, `convert_vocab`). Imports nothing else from diffcli but `errors`."""
