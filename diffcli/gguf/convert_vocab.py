"""The tokenizer half of the converter: HF `tokenizer.json` -> the `tokenizer.*` GGUF keys (spec §A.3).

Token types follow the Gemma-4 path of the PR conversion: special added tokens are control (3),
except the channel / tool-call / tool-response / quote markers, which are user-defined (4) so they
stay visible in printed text; `<0xXX>` pieces are byte tokens (6); ids the tokenizer does not fill
are unused (5); everything else is normal (1).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
VISIBLE_SPECIALS = frozenset({"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>",
                              "<|tool_response>", "<tool_response|>", '<|"|>'})
_BYTE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
ADDED_SCORE = -1000.0
# GGUF key -> token text; the ids are looked up, never assumed
SPECIAL_IDS = {"bos": "<bos>", "eos": "<eos>", "unknown": "<unk>", "padding": "<pad>", "mask": "<mask>"}


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str]            # "left right"
    special: dict[str, int]      # "bos" -> id, ...
    chat_template: str | None = None

    def add_to_writer(self, w) -> None:
        w.add_string("tokenizer.ggml.model", "gemma4")
        w.add_array("tokenizer.ggml.tokens", self.tokens)
        w.add_array("tokenizer.ggml.scores", [float(s) for s in self.scores])
        w.add_array("tokenizer.ggml.token_type", [int(t) for t in self.types])
        w.add_array("tokenizer.ggml.merges", self.merges)
        for key, tid in self.special.items():
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", tid)
        if self.chat_template:
            w.add_string("tokenizer.chat_template", self.chat_template)
        w.add_bool("tokenizer.ggml.add_space_prefix", False)
        w.add_bool("tokenizer.ggml.add_bos_token", True)


def vocab_from_tokenizer_json(tok: dict, vocab_size: int, chat_template: str | None = None,
                              path: Path | None = None) -> Vocab:
    """Build the GGUF vocabulary from a parsed `tokenizer.json` with `vocab_size` entries."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise InputError(f"tokenizer model is {model.get('type')!r}, not BPE", path=path,
                         fix="DiffusionGemma ships a BPE tokenizer.json; use the original file")
    by_id: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    added = {int(a["id"]): a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= vocab_size:
        raise InputError(f"tokenizer has id {max(by_id)} but the model has only {vocab_size} embeddings",
                         path=path, fix="the tokenizer does not belong to this checkpoint")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]"), scores.append(ADDED_SCORE), types.append(UNUSED)
            continue
        tokens.append(text)
        if i in added:
            scores.append(ADDED_SCORE)
            if text in VISIBLE_SPECIALS or not added[i].get("special", False):
                types.append(USER_DEFINED)
            else:
                types.append(CONTROL)
        else:
            scores.append(0.0)
            types.append(BYTE if _BYTE.match(text) else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    index = {t: i for i, t in enumerate(tokens)}
    special = {key: index[text] for key, text in SPECIAL_IDS.items() if text in index}
    return Vocab(tokens, scores, types, merges, special, chat_template)


def read_hf_tokenizer(hf_dir: Path, vocab_size: int) -> Vocab:
    path = hf_dir / "tokenizer.json"
    if not path.exists():
        raise InputError("tokenizer.json is missing", path=hf_dir,
                         fix="copy tokenizer.json (and chat_template.jinja) from the original model repository")
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"invalid JSON ({exc})", path=path, fix="download the file again") from None
    template = None
    if (hf_dir / "chat_template.jinja").exists():
        template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif (hf_dir / "tokenizer_config.json").exists():
        try:
            cfg = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            cfg = {}
        t = cfg.get("chat_template")
        template = t if isinstance(t, str) else None
    return vocab_from_tokenizer_json(tok, vocab_size, template, path)
