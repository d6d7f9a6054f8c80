"""The DiffusionGemma model: its config from GGUF metadata (`config`), the weight-name table
(`weights`), device placement (`placement`), the stateless layer pieces (`layers`) and the
encode / denoise / commit passes (`diffusion_gemma`, which also holds `load`)."""
