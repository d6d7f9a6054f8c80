"""Images for a run: open the vision tower once (`open_vision`), turn --image / /image files into
prepared images (`read_images`) and a prompt's image slots into the soft-token spans the encoder
takes (`image_spans`, cached by the image's digest across chat turns)."""
from __future__ import annotations

from typing import Any, Sequence

from ..errors import InputError
from ..media.image import prepare_image
from ..text.chat import IMAGE_BEGIN, IMAGE_END, IMAGE_MARKER


def open_vision(path: str, model, tokenizer):
    """The vision tower of `path`, on the model's head device, checked against the model."""
    from ..model.vision import check_pair, load_vision
    tower = load_vision(path, device=model.device, dtype=model.dtype)
    check_pair(tower, model.config)
    missing = [t for t in (IMAGE_BEGIN, IMAGE_MARKER, IMAGE_END) if tokenizer.token_to_id(t) is None]
    if missing:
        raise InputError(f"the model's vocabulary has no {' '.join(missing)} token, so it cannot "
                         "take images", path=path, fix="use --mmproj only with a Gemma 4 / "
                         "DiffusionGemma model file")
    return tower


def read_images(session, paths: Sequence[str]) -> list[Any]:
    tower = session.vision
    if paths and tower is None:
        raise InputError("images need the vision tower", fix="start diffcli with --mmproj FILE")
    return [prepare_image(p, tower.config.patch_size, max_soft_tokens=session.opts.image_max_tokens,
                          pooling=tower.config.pooling) for p in paths]


def image_spans(session, slots: Sequence[tuple[int, Any]]) -> list[Any]:
    """(first soft token index, prepared image) -> ImageSpan, running the tower once per image."""
    import torch
    from ..model.images import ImageSpan
    spans = []
    for start, img in slots:
        embeds = session.image_embeds.get(img.digest)
        if embeds is None:
            embeds = session.vision.embed(torch.from_numpy(img.pixels), img.grid)
            session.image_embeds[img.digest] = embeds
        spans.append(ImageSpan(start, embeds, img.digest))
    return spans
