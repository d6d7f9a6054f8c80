"""OpenAI-style image content parts -> image bytes: `{"type": "image_url", "image_url": {"url":
"data:image/png;base64,..."}}` (the URL may also be given as a plain string). Only `data:` URLs are
taken: diffcli fetches nothing from the network."""
from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from ..errors import InputError

# Largest decoded image accepted from a data: URL (a 20 MiB PNG is already a 5+ megapixel photo).
MAX_BYTES = 20 * 1024 * 1024
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)"
                       r"(?P<b64>;base64)?,", re.IGNORECASE)


def image_bytes_from_data_url(url: str, *, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes a base64 `data:` URL carries; InputError for any other URL or a bad payload."""
    if not isinstance(url, str) or not url:
        raise InputError("image_url has no URL", fix='give {"url": "data:image/png;base64,..."}')
    m = _DATA_URL.match(url)
    if m is None:
        scheme = url.split(":", 1)[0][:16] if ":" in url else "no scheme"
        raise InputError(f"image_url is not a data: URL ({scheme})",
                         fix="send the image inline as data:image/...;base64,... (diffcli fetches nothing)")
    if m.group("b64") is None:
        raise InputError("image_url data: URL is not base64-encoded",
                         fix="encode the image as data:image/png;base64,...")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise InputError(f"image_url carries {mime}, not an image", fix="send an image/* data: URL")
    payload = url[m.end():]
    if len(payload) > (max_bytes + 2) // 3 * 4 + 64:
        raise InputError(f"image_url is larger than {max_bytes // 2**20} MiB",
                         fix="send a smaller image (the model sees about 2.6 megapixels at most)")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image_url data: URL has invalid base64", fix="check the encoding") from None
    if not data:
        raise InputError("image_url data: URL is empty", fix="send the image bytes")
    return data


def image_bytes_from_part(part: dict[str, Any], *, max_bytes: int = MAX_BYTES) -> bytes:
    """An OpenAI chat content part of type `image_url` -> the image bytes."""
    if not isinstance(part, dict) or part.get("type") != "image_url":
        raise InputError("not an image_url content part", fix='use {"type": "image_url", ...}')
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    return image_bytes_from_data_url(url, max_bytes=max_bytes)


def content_parts(content: str | list, patch_size: int, *, max_soft_tokens: int = 280,
                  pooling: int = 3) -> str | list[dict]:
    """An OpenAI chat message's `content` -> the content a `text.chat.Conversation` message takes:
    a string stays a string; a list of `text` / `image_url` parts becomes text parts and image
    parts (`{"type": "image", "image": PreparedImage}`) in the same order, each image decoded and
    prepared for a tower with `patch_size` (InputError for any bad part)."""
    from .image import prepare_image

    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError("message content must be a string or a list of parts",
                         fix='use "content": "text" or [{"type": "text", "text": ...}, ...]')
    parts: list[dict] = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            data = image_bytes_from_part(part)
            parts.append({"type": "image", "image": prepare_image(
                data, patch_size, max_soft_tokens=max_soft_tokens, pooling=pooling,
                name=f"content part {k} (image_url)")})
        else:
            raise InputError(f"content part {k} has type {kind!r}; diffcli takes text and image_url",
                             fix='send {"type": "text", ...} or {"type": "image_url", ...} parts')
    return parts
