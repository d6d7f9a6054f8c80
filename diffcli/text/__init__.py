"""Text handling for the front ends: the Gemma-4 tokenizer (`tokenizer`) and the chat template,
conversation and thinking channel (`chat`). The model and the generation loop never import it."""
