"""What every front end shares: opening a model file with its tokenizer, chat template and sampler
settings (`loading`), resolving the device and loading the weights with a placement, and turning a
request's committed canvases into reply text (`reply`). Front ends (`cli`, `serve`) build on this;
nothing here prints or parses flags."""
