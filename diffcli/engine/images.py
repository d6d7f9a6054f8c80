"""Images for a front end: the vision tower of an mmproj file checked against the model
(`vision_config`: metadata only, before anything loads; `open_vision`: the tower itself), and a
prompt's image slots turned into the soft-token spans the encoder takes (`ImageEmbedder`, which
runs the tower once per distinct image and keys every span by the image's digest, so a prompt
cache never mistakes one image for another). Shared by `diffcli run` and `diffcli serve`."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

from ..errors import InputError
from ..text.chat import IMAGE_BEGIN, IMAGE_END, IMAGE_MARKER


def check_image_tokens(tokenizer, path: str) -> None:
    """The model's vocabulary must have Gemma 4's image tokens for an mmproj to be of use."""
    missing = [t for t in (IMAGE_BEGIN, IMAGE_MARKER, IMAGE_END) if tokenizer.token_to_id(t) is None]
    if missing:
        raise InputError(f"the model's vocabulary has no {' '.join(missing)} token, so it cannot "
                         "take images", path=path, fix="use --mmproj only with a Gemma 4 / "
                         "DiffusionGemma model file")


def vision_config(path: str, model_config, tokenizer):
    """The mmproj's VisionConfig, its tensors checked against its metadata and its projection
    against the model's width, without loading a weight (a server checks this before it listens)."""
    from ..gguf.reader import open_gguf
    from ..model.vision import VisionConfig, validate

    f = open_gguf(path)
    cfg = VisionConfig.from_gguf(f)
    validate(f, cfg)
    if cfg.proj_dim != model_config.n_embd:
        raise InputError(f"this mmproj projects images to width {cfg.proj_dim}, but the model's "
                         f"hidden size is {model_config.n_embd}", path=path,
                         fix="pass the mmproj made from the same checkpoint as the model")
    check_image_tokens(tokenizer, path)
    return cfg


def open_vision(path: str, model, tokenizer):
    """The vision tower of `path`, on the model's head device, checked against the model."""
    from ..model.vision import check_pair, load_vision
    tower = load_vision(path, device=model.device, dtype=model.dtype)
    check_pair(tower, model.config)
    check_image_tokens(tokenizer, path)
    return tower


def check_fits(img, cfg) -> None:
    """A prepared image's patch grid must fit the tower's position table (`cfg`: VisionConfig)."""
    rows, cols = img.grid
    if rows > cfg.n_pos or cols > cfg.n_pos:
        raise InputError(f"the image is {cols}x{rows} patches; the vision tower's position table "
                         f"has {cfg.n_pos}", path=img.source,
                         fix="use a less elongated image, or a smaller image budget")


class ImageEmbedder:
    """Soft tokens of prepared images, by digest: each distinct image runs through the tower once
    while it stays among the `keep` most recently used (a chat resends its earlier images with
    every turn). `cache` may be a caller's dict (kept unbounded when `keep` is None)."""

    def __init__(self, tower, *, keep: int | None = None, cache: dict | None = None):
        self.tower = tower
        self.keep = keep
        self.cache: dict = cache if cache is not None else OrderedDict()
        self.runs = 0                     # images run through the tower

    def embeds(self, img):
        import torch
        e = self.cache.get(img.digest)
        if e is None:
            e = self.tower.embed(torch.from_numpy(img.pixels), img.grid)
            self.runs += 1
            self.cache[img.digest] = e
        if isinstance(self.cache, OrderedDict):
            self.cache.move_to_end(img.digest)
            while self.keep is not None and len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        return e

    def spans(self, slots: Sequence[tuple[int, Any]]) -> list[Any]:
        """(first soft token index, prepared image) -> ImageSpan keyed by the image's digest."""
        from ..model.images import ImageSpan
        return [ImageSpan(start, self.embeds(img), img.digest) for start, img in slots]
