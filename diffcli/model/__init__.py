"""The DiffusionGemma model: its config from GGUF metadata (`config`), the weight-name table
(`weights`), device placement (`placement`), the stateless layer pieces (`layers`), the encoder's
KV cache (`cache`), the encode / denoise / commit passes (`diffusion_gemma`) and `load`
(`loading`), which opens a file into them."""
