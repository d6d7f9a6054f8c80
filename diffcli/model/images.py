"""Images in the encoder's input: where soft tokens replace embeddings, and the attention they get.

An image enters the prompt as a block of soft tokens (the vision tower's output, already in the
text embedding space) standing where the prompt has the image placeholder ids. As in
transformers 5.23.0 (`DiffusionGemmaEncoderModel` with `use_bidirectional_attention="vision"`, the
masks `generate` builds from `mm_token_type_ids`):

- the soft tokens replace the placeholder embeddings *unscaled* (text embeddings are scaled by
  sqrt(H), image features are not);
- on every encoder layer, full and sliding alike, a query inside an image block also sees every
  key of its own block, later ones and ones outside the sliding window included (the causal /
  sliding mask OR "same image block"); text never attends bidirectionally.

Image blocks are never split across prefill chunks: a chunk attends to its own keys and the
cache, so a block cut in two would lose the keys of its second half.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class ImageSpan:
    """One image's soft tokens at `start` (an index into the ids they are encoded with)."""
    start: int
    embeds: torch.Tensor      # [n, H] in the text embedding space (not scaled by sqrt(H))
    key: str = ""             # the image's identity (its pixels' digest) for prompt caches

    @property
    def end(self) -> int:
        return self.start + int(self.embeds.shape[0])

    def shifted(self, offset: int) -> "ImageSpan":
        return ImageSpan(self.start + offset, self.embeds, self.key)


def check_spans(spans: Sequence[ImageSpan], n_ids: int, n_embd: int) -> list[ImageSpan]:
    """Spans sorted by start; each inside [0, n_ids), none overlapping, embeds [n, n_embd]."""
    out = sorted(spans, key=lambda s: s.start)
    prev = 0
    for s in out:
        if s.embeds.dim() != 2 or s.embeds.shape[1] != n_embd or s.embeds.shape[0] == 0:
            raise ValueError(f"image embeddings must be [n, {n_embd}], got {tuple(s.embeds.shape)}")
        if s.start < prev or s.end > n_ids:
            raise ValueError(f"image span [{s.start}, {s.end}) overlaps another or leaves the "
                             f"{n_ids} ids it is encoded with")
        prev = s.end
    return out


def chunk_bounds(n: int, chunk: int, spans: Sequence[ImageSpan]) -> list[tuple[int, int]]:
    """[lo, hi) pieces of at most `chunk` ids, moved so that no image span is cut: a piece that
    would end inside a span ends before it, or after it when the span starts the piece."""
    bounds, lo = [], 0
    while lo < n:
        hi = min(lo + chunk, n)
        for s in spans:
            if s.start < hi < s.end:
                hi = s.start if s.start > lo else s.end
                break
        bounds.append((lo, hi))
        lo = hi
    return bounds


def in_chunk(spans: Sequence[ImageSpan], lo: int, hi: int) -> list[ImageSpan]:
    """The spans inside [lo, hi), re-based to the chunk."""
    return [s.shifted(-lo) for s in spans if lo <= s.start and s.end <= hi]


def place(x: torch.Tensor, spans: Sequence[ImageSpan]) -> torch.Tensor:
    """x [T, H] (scaled text embeddings) with each span's rows replaced by its soft tokens."""
    if not spans:
        return x
    x = x.clone()
    for s in spans:
        x[s.start:s.end] = s.embeds.to(x.device, x.dtype)
    return x


def image_blocks(T: int, spans: Sequence[ImageSpan], device) -> torch.Tensor | None:
    """[T] int: the image block of each position (0, 1, ...), -1 for text; None without images."""
    if not spans:
        return None
    ids = torch.full((T,), -1, dtype=torch.long, device=device)
    for b, s in enumerate(spans):
        ids[s.start:s.end] = b
    return ids
