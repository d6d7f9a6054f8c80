"""Prompt inputs that are not text, for the front ends: images decoded with Pillow and prepared as
transformers 5.23.0's Gemma 4 image processor prepares them (`image`), and OpenAI-style `data:`
URLs (`dataurl`). The model and the generation loop never import it."""
