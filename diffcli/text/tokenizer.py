"""The Gemma-4 tokenizer of a GGUF file (spec §D.1, §D.2), built on the HF `tokenizers` library.

Encoding follows llama.cpp's `gemma4` path, because that is what the GGUF files were made for:

1. special tokens are cut out of the raw text first, longest match wins. User-defined tokens
   (type 4: `<|channel>`, newline and whitespace runs, ...) are always cut out; control tokens
   (type 3: `<bos>`, `<|turn>`, ...) only when `parse_special` is on — llama.cpp does the same;
2. spaces become `▁` (U+2581); no prefix space;
3. the remaining text is split into maximal runs of newlines vs everything else, and a newline run
   that is itself a vocabulary entry becomes that one token;
4. every other piece goes through BPE over `tokenizer.ggml.merges` (rank = list index), with
   `<0xXX>` byte fallback for characters missing from the vocabulary.

Where this differs from a plain HF `GemmaTokenizer` built from the same vocab and merges: HF has no
newline-run split (step 3), so a merge that crosses a newline (`".\n"`, `"\na"`) can fire in HF and
cannot here. tests/test_tokenizer.py keeps a case that shows the difference.

Decoding hides control tokens and shows user-defined ones (llama.cpp `common_detokenize(...,
special=false)`); `StreamDecoder` turns a growing id sequence into text without ever splitting a
UTF-8 character across two outputs.
"""
from __future__ import annotations

import codecs
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from ..errors import InputError

if TYPE_CHECKING:
    from ..gguf.reader import GGUFFile

SPACE = "\u2581"   # ▁, SentencePiece's visible space
# tokenizer.ggml.token_type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# End-of-generation tokens, looked up by text (spec §D.2): llama.cpp's EOG set for Gemma 4.
EOG_TEXTS = ("<eos>", "<turn|>", "<|tool_response>")
_BYTE_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_NEWLINE_RUNS = re.compile(r"(\n+)")


class Tokenizer:
    """Gemma-4 BPE tokenizer. Build it with `Tokenizer.from_gguf(path_or_file)`."""

    def __init__(self, tokens: list[str], token_types: list[int], merges: list[str], *,
                 bos_id: int | None = 2, eos_id: int | None = 1, unk_id: int | None = 3,
                 pad_id: int | None = 0, add_bos: bool = True, chat_template: str | None = None,
                 model_name: str = "gemma4"):
        self.tokens = tokens
        self.token_types = list(token_types) if token_types else [NORMAL] * len(tokens)
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.model_name = model_name
        self._vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):       # the first of duplicate pieces wins, as in llama.cpp
            self._vocab.setdefault(t, i)
        pairs = []
        for m in merges:
            cut = m.find(" ", 1)             # a piece may itself start with a space
            if cut > 0:
                pairs.append((m[:cut], m[cut + 1:]))
        unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
        try:
            bpe = BPE(self._vocab, pairs, unk_token=unk, byte_fallback=True, fuse_unk=True)
        except Exception as exc:   # the library raises a bare Exception; from_gguf checks first
            raise InputError(f"the tokenizer cannot be built: {' '.join(str(exc).split())}",
                             fix="convert the model again with its tokenizer") from None
        self._bpe = _HFTokenizer(bpe)        # no normalizer or pre-tokenizer: we feed it pieces
        self._special_re: dict[bool, re.Pattern | None] = {}
        self._pieces: list[bytes] | None = None
        self.eog_ids = sorted({self._vocab[t] for t in EOG_TEXTS if t in self._vocab}
                              | ({eos_id} if eos_id is not None else set()))

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, source: "str | os.PathLike | GGUFFile") -> "Tokenizer":
        if isinstance(source, (str, os.PathLike)):
            from ..gguf.reader import open_gguf
            source = open_gguf(source)
        md = source.metadata
        path = getattr(source, "path", None)
        tokens = md.get("tokenizer.ggml.tokens")
        if not tokens:
            raise InputError("the file has no tokenizer (tokenizer.ggml.tokens is missing)",
                             path=path, fix="convert the model again with its tokenizer")
        model = md.get("tokenizer.ggml.model", "gemma4")
        if model not in ("gemma4", "llama", "gpt2"):
            raise InputError(f"unsupported tokenizer model {_show(model)}", path=path,
                             fix="diffcli reads Gemma-4 style BPE vocabularies (tokenizer.ggml.model = gemma4)")
        tokens, types, merges = check_vocabulary(md, path)
        n = len(tokens)

        def opt_id(key: str, default: int | None) -> int | None:
            v = md.get(key, default)
            if v is None:
                return None
            if type(v) is not int or not 0 <= v < n:
                raise InputError(f"{key} is {_show(v)}, not a token id (0 to {n - 1:,})", path=path,
                                 fix="fix that key (gguf-set-metadata) or convert the model again")
            return v

        template = md.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise InputError(f"tokenizer.chat_template is {_show(template)}, not a string", path=path,
                             fix="fix that key (gguf-set-metadata) or convert the model again")
        add_bos = md.get("tokenizer.ggml.add_bos_token", True)
        return cls(tokens, types, merges,
                   bos_id=opt_id("tokenizer.ggml.bos_token_id", 2),
                   eos_id=opt_id("tokenizer.ggml.eos_token_id", 1),
                   unk_id=opt_id("tokenizer.ggml.unknown_token_id", 3),
                   pad_id=opt_id("tokenizer.ggml.padding_token_id", 0),
                   # llama.cpp forces add_bos for Gemma 4 (spec §D.1 step 6)
                   add_bos=True if model == "gemma4" else add_bos is True,
                   chat_template=template, model_name=model)

    # ---- lookups ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_to_id(self, text: str) -> int | None:
        return self._vocab.get(text)

    def id_to_token(self, i: int) -> str:
        return self.tokens[i]

    def is_control(self, i: int) -> bool:
        return self.token_types[i] in (CONTROL, UNUSED)

    # ---- encoding --------------------------------------------------------------------------
    def _specials(self, parse_special: bool) -> re.Pattern | None:
        if parse_special not in self._special_re:
            kinds = (CONTROL, USER_DEFINED) if parse_special else (USER_DEFINED,)
            texts = [t for t, k in zip(self.tokens, self.token_types) if k in kinds and t]
            texts.sort(key=len, reverse=True)    # alternation tries longer texts first
            self._special_re[parse_special] = (
                re.compile("|".join(map(re.escape, texts))) if texts else None)
        return self._special_re[parse_special]

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]:
        """Text -> token ids. `add_bos` adds BOS only when the vocabulary asks for it."""
        ids: list[int] = [self.bos_id] if add_bos and self.add_bos and self.bos_id is not None else []
        special = self._specials(parse_special)
        pieces: list[tuple[int, str | int]] = []      # (slot in ids, text) or a ready id
        pos = 0
        matches = special.finditer(text) if special is not None else ()
        for m in matches:
            self._text_pieces(text[pos:m.start()], pieces)
            pieces.append((-1, self._vocab[m.group()]))
            pos = m.end()
        self._text_pieces(text[pos:], pieces)
        todo = [p for k, p in pieces if k == 0]
        encoded = iter(self._bpe.encode_batch(todo, add_special_tokens=False) if todo else ())
        for k, p in pieces:
            ids.extend(next(encoded).ids if k == 0 else [p])
        return ids

    def _text_pieces(self, text: str, out: list) -> None:
        if not text:
            return
        text = text.replace(" ", SPACE)
        for run in _NEWLINE_RUNS.split(text):
            if not run:
                continue
            if run[0] == "\n" and run in self._vocab:
                out.append((-1, self._vocab[run]))
            else:
                out.append((0, run))

    # ---- decoding --------------------------------------------------------------------------
    def _piece_table(self) -> list[bytes]:
        if self._pieces is None:
            table = []
            for t, k in zip(self.tokens, self.token_types):
                if k in (CONTROL, UNUSED):
                    table.append(b"")
                elif k == BYTE and (m := _BYTE_RE.match(t)):
                    table.append(bytes([int(m.group(1), 16)]))
                else:
                    table.append(t.replace(SPACE, " ").encode("utf-8"))
            self._pieces = table
        return self._pieces

    def decode_bytes(self, ids: Iterable[int], special: bool = False) -> bytes:
        table = self._piece_table()
        n = len(table)
        if special:
            return b"".join(self.tokens[i].replace(SPACE, " ").encode() if self.is_control(i)
                            else table[i] for i in ids if 0 <= i < n)
        return b"".join(table[i] for i in ids if 0 <= i < n)

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Ids -> text. Control tokens are hidden unless `special`; user-defined ones are shown."""
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

    def piece(self, i: int) -> str:
        """The text of one token as it is shown (control tokens empty)."""
        return self._piece_table()[i].decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Feeds ids, returns text; a UTF-8 character split across tokens (byte fallback) is held back
    until it is complete, so no output ever ends in half a character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Iterable[int]) -> str:
        return self._utf8.decode(self.tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _show(value, limit: int = 40) -> str:
    """A token or value for a one-line message: quoted, newlines and NULs escaped, shortened."""
    if isinstance(value, list):
        return f"a list of {len(value):,} values"
    text = repr(value[:limit] if isinstance(value, str) else value)
    return text if len(text) <= 2 * limit else text[:2 * limit] + "..."


def check_vocabulary(md: dict, path) -> tuple[list[str], list[int], list[str]]:
    """The tokens, token types and merges of a GGUF's metadata, checked the way the BPE model
    needs them: strings, one type (0 to 6) per token, merges "left right" whose two parts and
    their concatenation are all tokens. Raises InputError naming the key and the entry."""
    def fail(problem: str):
        raise InputError(problem, path=path, fix="convert the model again with its tokenizer")

    tokens = md.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(type(t) is str for t in tokens):
        fail(f"tokenizer.ggml.tokens must be an array of strings, not {_kind(tokens)}")
    types = md.get("tokenizer.ggml.token_type") or []
    if not isinstance(types, list) or not all(type(t) is int and 0 <= t <= BYTE for t in types):
        fail(f"tokenizer.ggml.token_type must be an array of token types (0 to {BYTE}), not "
             f"{_kind(types)}")
    if types and len(types) != len(tokens):
        fail(f"tokenizer.ggml.token_type has {len(types):,} entries for {len(tokens):,} tokens")
    merges = md.get("tokenizer.ggml.merges") or []
    if not isinstance(merges, list) or not all(type(m) is str for m in merges):
        fail(f"tokenizer.ggml.merges must be an array of strings, not {_kind(merges)}")
    vocab = set(tokens)
    for i, m in enumerate(merges):
        cut = m.find(" ", 1)
        if cut <= 0:
            fail(f"tokenizer.ggml.merges entry {i} ({_show(m)}) is not two tokens separated by a space")
        for part in (m[:cut], m[cut + 1:], m[:cut] + m[cut + 1:]):
            if part not in vocab:
                fail(f"tokenizer.ggml.merges entry {i} ({_show(m)}) needs the token {_show(part)}, "
                     "which is not in the vocabulary")
    return tokens, types, merges


def _kind(value) -> str:
    if isinstance(value, list):
        kinds = sorted({type(x).__name__ for x in value})
        return f"an array of {'/'.join(kinds) or 'nothing'}"
    return f"a {type(value).__name__}"


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_gguf(path)
