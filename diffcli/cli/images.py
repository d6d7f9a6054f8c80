"""Images for a run: open the vision tower once (`open_vision`), turn --image / /image files into
prepared images (`read_images`) and a prompt's image slots into the soft-token spans the encoder
takes (`image_spans`, cached by the image's digest across chat turns). The tower and the spans
come from `engine.images`, which `diffcli serve` shares."""
from __future__ import annotations

from typing import Any, Sequence

from ..engine.images import ImageEmbedder, open_vision  # noqa: F401  (open_vision: session's)
from ..errors import InputError
from ..media.image import prepare_image


def read_images(session, paths: Sequence[str]) -> list[Any]:
    tower = session.vision
    if paths and tower is None:
        raise InputError("images need the vision tower", fix="start diffcli with --mmproj FILE")
    return [prepare_image(p, tower.config.patch_size, max_soft_tokens=session.opts.image_max_tokens,
                          pooling=tower.config.pooling) for p in paths]


def image_spans(session, slots: Sequence[tuple[int, Any]]) -> list[Any]:
    """(first soft token index, prepared image) -> ImageSpan, running the tower once per image."""
    return ImageEmbedder(session.vision, cache=session.image_embeds).spans(slots)
