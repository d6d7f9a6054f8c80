"""Image input (diffcli.media) against transformers 5.23.0: `load_image` + the Pillow backend of
the Gemma 4 image processor (`Gemma4ImageProcessorPil`) must give the same pixels, bit for bit,
the same patch grid and soft-token count; damaged, huge or foreign inputs are one InputError.
Images are made here with Pillow."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from diffcli.errors import InputError
from diffcli.media.dataurl import image_bytes_from_data_url, image_bytes_from_part
from diffcli.media.image import MAX_PIXELS, decode_image, prepare_image, target_size


def _hf(path, patch_size=16, max_soft_tokens=280, pooling=3):
    from transformers.image_utils import load_image
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    proc = Gemma4ImageProcessorPil(patch_size=patch_size, max_soft_tokens=max_soft_tokens,
                                   pooling_kernel_size=pooling)
    out = proc(load_image(str(path)), return_tensors="np")
    n = int(out["num_soft_tokens_per_image"][0])
    pos = out["image_position_ids"][0]
    real = (pos != -1).any(-1)
    return out["pixel_values"][0][real], pos[real], n


def _noise(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    chans = {"RGB": 3, "RGBA": 4}[mode]
    # smooth gradients plus noise, so bicubic resampling has something to interpolate
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                     ((xx + yy) * 127 // max(w + h - 2, 1))] + ([rng.integers(0, 256, (h, w))]
                                                                  if chans == 4 else []), -1)
    noise = rng.integers(-40, 40, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), mode)


@pytest.mark.parametrize("h,w,mode,fmt,budget,patch", [
    (75, 100, "RGB", "png", 280, 16),      # small: scaled up to fill the budget
    (1200, 700, "RGB", "png", 280, 16),    # large, portrait: scaled down
    (480, 480, "RGB", "png", 70, 16),      # already 480 = 10 * 48: still resized to fit 70 tokens
    (336, 432, "RGB", "png", 70, 16),      # exactly the budget's size: left as it is
    (20, 1000, "RGB", "png", 70, 16),      # a strip: one pooled row, the other side capped
    (900, 15, "L", "png", 140, 16),        # a column, grey
    (123, 77, "RGBA", "png", 280, 14),     # alpha dropped (as load_image does); another patch size
    (200, 300, "RGB", "jpeg", 560, 16),
])
def test_patches_equal_transformers_bit_for_bit(tmp_path, h, w, mode, fmt, budget, patch):
    path = tmp_path / f"img.{fmt}"
    _noise(h, w, mode).save(path)
    ours = prepare_image(path, patch, max_soft_tokens=budget)
    pixels, pos, n = _hf(path, patch, budget)
    assert ours.n_tokens == n
    assert ours.pixels.dtype == np.float32 and ours.pixels.shape == pixels.shape
    assert np.array_equal(ours.pixels, pixels)
    assert np.array_equal(ours.positions, pos)
    rows, cols = ours.grid
    assert rows * cols == len(pixels) and rows % 3 == 0 and cols % 3 == 0


def test_exif_orientation_is_applied_like_load_image(tmp_path):
    img = _noise(60, 150)
    exif = Image.Exif()
    exif[0x0112] = 6                         # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    ours = prepare_image(path, 16, max_soft_tokens=70)
    pixels, _, n = _hf(path, 16, 70)
    assert np.array_equal(ours.pixels, pixels) and ours.n_tokens == n
    assert ours.grid[0] > ours.grid[1]       # displayed upright: now taller than wide


def test_target_size_matches_the_processor_over_many_shapes():
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size
    rng = np.random.default_rng(1)
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(1, 5000, 2))
        for budget in (70, 280, 1120):
            want = get_aspect_ratio_preserving_size(h, w, 16, budget * 9, 3)
            assert target_size(h, w, 16, budget * 9, 3) == want, (h, w, budget)


def test_bytes_and_paths_give_the_same_image(tmp_path):
    path = tmp_path / "a.png"
    _noise(90, 64).save(path)
    a = prepare_image(path, 16, max_soft_tokens=70)
    b = prepare_image(path.read_bytes(), 16, max_soft_tokens=70)
    assert np.array_equal(a.pixels, b.pixels) and a.digest == b.digest
    other = prepare_image(_noise(90, 64, seed=5), 16, max_soft_tokens=70)
    assert other.digest != a.digest


# ---- bad input -----------------------------------------------------------------------------

def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height but which carries almost no data (a pixel bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


def test_a_pixel_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(30000, 30000))          # 900 MP claimed, 100 bytes on disk
    with pytest.raises(InputError, match="too large|more than the") as e:
        decode_image(path)
    assert "bomb.png" in e.value.message and "\n" not in e.value.message
    with pytest.raises(InputError, match="more than the"):
        decode_image(_png_claiming(9000, 9000))            # just over 8192^2
    assert 9000 * 9000 > MAX_PIXELS


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_bytes(b"this is not an image at all"), "not an image"),
    (lambda p: p.write_bytes(_noise_png()[:200]), "damaged or truncated"),
    (lambda p: p.write_bytes(_png_claiming(64, 64)), "damaged or truncated"),   # too little data
    (lambda p: p.write_bytes(b""), "not an image"),
])
def test_damaged_files_are_one_clear_error(tmp_path, make, match):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(InputError, match=match) as e:
        prepare_image(path, 16)
    assert str(path) in e.value.message


def _noise_png() -> bytes:
    buf = io.BytesIO()
    _noise(64, 64).save(buf, format="PNG")
    return buf.getvalue()


def test_missing_file_directory_and_bad_budget(tmp_path):
    with pytest.raises(InputError, match="no such image file"):
        prepare_image(tmp_path / "nope.png", 16)
    with pytest.raises(InputError, match="is a directory"):
        prepare_image(tmp_path, 16)
    with pytest.raises(InputError, match="70, 140, 280, 560, 1120"):
        prepare_image(_noise(10, 10), 16, max_soft_tokens=100)


# ---- data: URLs (OpenAI image_url parts) -----------------------------------------------------

def test_data_url_round_trip_and_part_shapes():
    raw = _noise_png()
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    assert image_bytes_from_data_url(url) == raw
    assert image_bytes_from_part({"type": "image_url", "image_url": {"url": url}}) == raw
    assert image_bytes_from_part({"type": "image_url", "image_url": url}) == raw
    wrapped = "data:image/png;base64," + "\n".join(base64.encodebytes(raw).decode().split())
    assert image_bytes_from_data_url(wrapped) == raw
    img = prepare_image(image_bytes_from_part({"type": "image_url", "image_url": {"url": url}}), 16,
                        max_soft_tokens=70, name="image_url")
    assert img.n_tokens > 0


@pytest.mark.parametrize("url,match", [
    ("https://example.invalid/cat.png", "not a data: URL"),
    ("data:image/png,rawbytes", "not base64"),
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("data:image/png;base64,@@@@", "invalid base64"),
    ("data:image/png;base64,", "empty"),
    ("", "no URL"),
])
def test_bad_data_urls(url, match):
    with pytest.raises(InputError, match=match):
        image_bytes_from_data_url(url)


def test_data_url_size_is_bounded_before_decoding():
    url = "data:image/png;base64," + "A" * (4 * 1024 * 1024)
    with pytest.raises(InputError, match="larger than 1 MiB"):
        image_bytes_from_data_url(url, max_bytes=1024 * 1024)


def test_decoded_data_url_bytes_that_are_not_an_image():
    url = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
    with pytest.raises(InputError, match="not an image"):
        prepare_image(image_bytes_from_data_url(url), 16, name="image_url")


def test_openai_content_becomes_conversation_parts():
    from diffcli.media.dataurl import content_parts
    raw = _noise_png()
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    parts = content_parts([{"type": "text", "text": "Look:"},
                           {"type": "image_url", "image_url": {"url": url, "detail": "auto"}},
                           {"type": "text", "text": "what is it?"}], 16, max_soft_tokens=70)
    assert [p["type"] for p in parts] == ["text", "image", "text"]
    want = prepare_image(raw, 16, max_soft_tokens=70)
    assert np.array_equal(parts[1]["image"].pixels, want.pixels)
    assert content_parts("just text", 16) == "just text"
    with pytest.raises(InputError, match="content part 0 has type 'input_audio'"):
        content_parts([{"type": "input_audio"}], 16)
    with pytest.raises(InputError, match="content part 1 \\(image_url\\)"):
        content_parts([{"type": "text", "text": "x"},
                       {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], 16)
