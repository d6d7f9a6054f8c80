"""Images -> the patches the Gemma 4 vision tower reads, exactly as transformers 5.23.0 makes them.

The reference is what transformers does with an image file: `image_utils.load_image` (Pillow
open, EXIF orientation applied, `convert("RGB")`) and then `Gemma4ImageProcessorPil` (the Pillow
backend of the Gemma 4 image processor) with its defaults:

1. resize, keeping the aspect ratio, to the largest size whose sides are multiples of
   `pooling * patch` (48 px) and that has at most `max_soft_tokens * pooling**2` patches: small
   images are scaled up and large ones down, so every image fills the budget (Pillow bicubic);
2. rescale to [0, 1] (in float64, then float32); no mean/std normalisation (the model maps
   [0, 1] to [-1, 1] itself);
3. cut into `patch x patch` patches in row-major order, each flattened as (row, column, channel).

transformers then pads the patches to the budget with position (-1, -1); the padding never reaches
a soft token, so diffcli keeps only the real patches and their grid.

Decoding is bounded: the header's size is checked before any pixel is decoded, only common
formats are opened, and a damaged file is an `InputError`, never a partial image.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)    # what the Gemma 4 processor accepts
DEFAULT_SOFT_TOKENS = 280                           # its default (`max_soft_tokens`)
DEFAULT_POOLING = 3
# The most pixels diffcli decodes (8192 x 8192): the model sees at most 1120 * 9 patches of 16 x 16
# (~2.6 MP) anyway, so a bigger image only costs memory (3 bytes a pixel while decoding).
MAX_PIXELS = 8192 * 8192
# Formats Pillow may open: what cameras, browsers and screenshots produce (Pillow's JPEG opener
# also returns the multi-picture JPEGs of phones).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class PreparedImage:
    """One image as the vision tower takes it."""
    pixels: np.ndarray          # [N, p*p*3] float32 in [0, 1]; patch n is at row n // cols
    grid: tuple[int, int]       # (rows, cols) of patches, both multiples of the pooling
    patch_size: int
    pooling: int
    source: str                 # the path, or what the bytes came from (for messages)

    @property
    def n_tokens(self) -> int:
        """Soft tokens the image becomes: one per pooling x pooling patches."""
        return self.grid[0] * self.grid[1] // self.pooling ** 2

    @property
    def positions(self) -> np.ndarray:
        """[N, 2] int64 (x, y) = (column, row) of each patch, as the processor's position ids."""
        rows, cols = self.grid
        y, x = np.divmod(np.arange(rows * cols), cols)
        return np.stack([x, y], axis=-1)

    @property
    def digest(self) -> str:
        """sha256 of the grid and pixels: the image's identity in a prompt cache."""
        h = hashlib.sha256(f"{self.grid}:{self.patch_size}".encode())
        h.update(self.pixels.tobytes())
        return h.hexdigest()


def target_size(height: int, width: int, patch_size: int, max_patches: int,
                pooling: int) -> tuple[int, int]:
    """The processor's `get_aspect_ratio_preserving_size`: (height, width) to resize to."""
    side = pooling * patch_size
    factor = math.sqrt(max_patches * patch_size ** 2 / (height * width))
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    longest = (max_patches // pooling ** 2) * side
    if th == 0 and tw == 0:     # cannot happen for a budget of at least pooling**2 patches
        raise InputError(f"cannot fit a {width}x{height} image into {max_patches} patches")
    if th == 0:                 # a very wide strip: one row of pooled patches
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        th, tw = min(int(math.floor(height / width)) * side, longest), side
    return th, tw


def decode_image(source: str | os.PathLike | bytes, *, max_pixels: int = MAX_PIXELS,
                 name: str | None = None):
    """A Pillow RGB image from a file path or encoded bytes, as transformers' `load_image`:
    EXIF orientation applied, then `convert("RGB")` (alpha is dropped, palettes expanded).
    `name` labels the bytes in error messages."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    label = name or (os.fspath(source) if not isinstance(source, bytes) else "image data")
    if isinstance(source, bytes):
        fp = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise InputError("no such image file", path=path, fix="check the image path")
        if path.is_dir():
            raise InputError("is a directory, not an image", path=path, fix="pass an image file")
        fp = path
    try:
        img = Image.open(fp, formats=FORMATS)      # reads the header only
        w, h = img.size
        if w * h > max_pixels:
            raise InputError(f"image is {w}x{h} = {w * h:,} pixels, more than the {max_pixels:,} "
                             "diffcli decodes", path=label,
                             fix="scale it down first (the model sees about 2.6 megapixels at most)")
        if w < 1 or h < 1:
            raise InputError(f"image has no pixels ({w}x{h})", path=label, fix="pass another image")
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")                  # decodes; a truncated file fails here
    except UnidentifiedImageError:
        raise InputError(f"not an image diffcli can read (formats: {', '.join(FORMATS)})",
                         path=label, fix="convert it to PNG or JPEG") from None
    except PermissionError:
        raise InputError("cannot read the image (permission denied)", path=label,
                         fix="check the file's permissions") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"image is too large to decode safely ({exc})", path=label,
                         fix="scale it down first") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow reports damaged data as OSError ("image file is truncated", "broken data
        # stream"), bad headers as SyntaxError/ValueError
        raise InputError(f"image is damaged or truncated ({exc})", path=label,
                         fix="open it in an image viewer to check it, or export it again") from None


def prepare_image(source, patch_size: int, *, max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
                  pooling: int = DEFAULT_POOLING, max_pixels: int = MAX_PIXELS,
                  name: str | None = None) -> PreparedImage:
    """Decode (a path, bytes, or a Pillow image) and cut into patches (module docstring)."""
    from PIL import Image

    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise InputError(f"an image budget of {max_soft_tokens} soft tokens is not one the model "
                         f"was trained with", fix=f"use one of {', '.join(map(str, SOFT_TOKEN_BUDGETS))}")
    if isinstance(source, Image.Image):
        img, label = source.convert("RGB"), name or "image"
    else:
        img = decode_image(source, max_pixels=max_pixels, name=name)
        label = name or (os.fspath(source) if not isinstance(source, bytes) else "image data")
    h, w = img.height, img.width
    th, tw = target_size(h, w, patch_size, max_soft_tokens * pooling ** 2, pooling)
    if (th, tw) != (h, w):
        img = img.resize((tw, th), resample=Image.Resampling.BICUBIC)
    chw = np.asarray(img).transpose(2, 0, 1)                        # [3, H, W] uint8
    pixels = (chw.astype(np.float64) * (1 / 255)).astype(np.float32)
    rows, cols = th // patch_size, tw // patch_size
    p = patch_size
    patches = pixels.reshape(3, rows, p, cols, p).transpose(1, 3, 2, 4, 0)   # [r, c, p, p, 3]
    return PreparedImage(np.ascontiguousarray(patches.reshape(rows * cols, p * p * 3)),
                         (rows, cols), p, pooling, label)
