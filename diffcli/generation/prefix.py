"""The encoder cache kept across chat turns: a model proxy that re-encodes only what changed.

Used by the front ends for multi-turn chat (FIELD: "chat that keeps the prompt KV across turns"
instead of re-running the whole history, as llama.cpp's runner does).
"""
from __future__ import annotations

from typing import Any


class PrefixCachedModel:
    """A model proxy that keeps the encoder cache of the previous prompt and, for the next one,
    only encodes the tokens after the longest cached prefix (spec FIELD: "chat that keeps the
    prompt KV across turns").

    The model's cache can be snapshotted (`cache.copy()`) but not truncated (sliding layers keep
    only the last W-1 keys), so snapshots are taken where the next turn's prompt can diverge: just
    before the last turn-opening token (`<|turn>`) — the next turn re-renders the model turn with
    its answer there instead of the generation prompt. Everything else is passed through.
    """

    def __init__(self, model, checkpoint_id: int | None = None):
        self._model = model
        self._checkpoint_id = checkpoint_id
        self._snapshots: list[tuple[list[int], Any]] = []   # (ids in the cache, cache)
        self.encoded_tokens = 0                             # tokens run through the encoder
        self.reused_tokens = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def reset(self) -> None:
        self._snapshots.clear()

    def encode(self, prompt_ids, images=()):
        """`images`: image spans of the prompt (model.images.ImageSpan); a position inside an
        image counts as the same token only for the same image (its `key`), so a cached prefix
        is reused only where the images match too."""
        ids = [int(i) for i in (prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)]
        images = sorted(images, key=lambda s: s.start)
        keys: list = list(ids)
        for s in images:
            keys[s.start:s.end] = [(s.key or id(s), j) for j in range(s.end - s.start)]
        best, cache = 0, None
        for snap_ids, snap in self._snapshots:
            if len(snap_ids) > best and keys[:len(snap_ids)] == snap_ids and \
                    not any(s.start < len(snap_ids) < s.end for s in images):
                best, cache = len(snap_ids), snap
        cut = len(ids)
        if self._checkpoint_id is not None and self._checkpoint_id in ids[best:]:
            cut = len(ids) - 1 - ids[::-1].index(self._checkpoint_id)
            if any(s.start < cut < s.end for s in images):
                cut = len(ids)
        if cache is None:
            cache = self._model.new_cache() if hasattr(self._model, "new_cache") else None
        else:
            cache = cache.copy()
        self.reused_tokens += best
        pieces = [(best, cut), (cut, len(ids))] if best < cut < len(ids) else [(best, len(ids))]
        snapshots = []
        for lo, hi in pieces:
            if hi <= lo:
                continue
            part = [s.shifted(-lo) for s in images if lo <= s.start and s.end <= hi]
            extra = {"images": part} if part else {}
            if cache is None:
                cache = self._model.encode(_like(prompt_ids, ids[lo:hi]), **extra)
            else:
                cache = self._model.commit(cache, _like(prompt_ids, ids[lo:hi]), **extra)
            self.encoded_tokens += hi - lo
            if hi == cut and hasattr(cache, "copy"):
                snapshots.append((keys[:hi], cache.copy()))
        if cache is None:      # an empty prompt: nothing to encode
            cache = self._model.encode(prompt_ids)
        if hasattr(cache, "copy"):
            if not snapshots:
                # no new checkpoint (a repeated prompt encodes nothing): keep the old one that lies
                # on this prompt, where the next turn starts from
                snapshots = [(k, c) for k, c in self._snapshots
                             if len(k) < len(keys) and keys[:len(k)] == k][-1:]
            snapshots.append((keys, cache.copy()))
            self._snapshots = snapshots     # at most a checkpoint and the whole prompt
        return cache


def _like(template, ids: list[int]):
    """ids in the same container type the caller used (tensor or list)."""
    if hasattr(template, "new_tensor"):
        return template.new_tensor(ids)
    return ids
