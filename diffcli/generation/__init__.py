"""Generation: the entropy-bound sampler (`sampler`), the block-diffusion loop as a stream of
events (`loop`, `events`) and the prompt cache kept across chat turns (`prefix`)."""
