"""A small Gemma-4-shaped BPE vocabulary for tokenizer/chat tests, and the HF `tokenizers` oracle.

The vocabulary is learned with `tokenizers`' own BPE trainer (so the merges are real BPE merges),
then laid out like the Gemma 4 GGUF: control tokens at 0..4, the turn/channel/tool tokens at the ids
of spec §D.2 (looked up by text anyway), 256 `<0xXX>` byte tokens, then the learned pieces.
"""
from __future__ import annotations

from pathlib import Path

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

SPACE = "\u2581"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Why is the sky blue? Because of Rayleigh scattering of sunlight.",
    "Hello world! Hello there, how are you today?",
    "def main():\n    return 42\n",
    "Les élèves étudient à l'école. Über 100 Äpfel.",
    "The model denoises a canvas of tokens in parallel, step by step.",
    "numbers 0123456789 and symbols: {}[]()<>=+-*/",
] * 4

SPECIAL = {  # id: (text, token_type) — ids as in spec §D.2
    0: ("<pad>", 3), 1: ("<eos>", 3), 2: ("<bos>", 3), 3: ("<unk>", 2), 4: ("<mask>", 3),
    46: ("<|tool>", 4), 47: ("<tool|>", 4), 48: ("<|tool_call>", 4), 49: ("<tool_call|>", 4),
    50: ("<|tool_response>", 3), 51: ("<tool_response|>", 4), 52: ('<|"|>', 4),
    98: ("<|think|>", 3), 100: ("<|channel>", 4), 101: ("<channel|>", 4),
    105: ("<|turn>", 3), 106: ("<turn|>", 3),
}
N_RESERVED = 112


def toy_vocab(cross_newline_merge: bool = True) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token_types, merges) of the toy vocabulary."""
    tokens = [f"<unused{i}>" for i in range(N_RESERVED)]
    types = [5] * N_RESERVED
    for i, (t, k) in SPECIAL.items():
        tokens[i], types[i] = t, k
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    hf = Tokenizer(BPE(unk_token="<unk>"))
    hf.normalizer = normalizers.Replace(" ", SPACE)
    trainer = BpeTrainer(vocab_size=600, show_progress=False, initial_alphabet=list("\n"))
    # train per line so that no learned merge crosses a newline; the one that does is added below
    hf.train_from_iterator([ln for text in CORPUS for ln in text.split("\n")], trainer)
    learned = hf.get_vocab()
    merges = [" ".join(pair) for pair in _merges_of(hf)]
    for t, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        if t not in tokens:
            tokens.append(t)
            types.append(1)
    # Newline runs: "\n\n" reachable by a merge; "\n\n\n" in the vocab but not reachable by merges
    # (llama.cpp emits it whole, HF cannot build it); ".\n" a merge that crosses a newline.
    extra = {"\n\n": ("\n", "\n"), "\n\n\n": None}
    if cross_newline_merge:
        extra[".\n"] = (".", "\n")
    for t, pair in extra.items():
        if t not in tokens:
            tokens.append(t)
            types.append(1)
        if pair and " ".join(pair) not in merges:
            merges.append(" ".join(pair))
    return tokens, types, merges


def _merges_of(hf: Tokenizer) -> list[tuple[str, str]]:
    import json
    model = json.loads(hf.to_str())["model"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def write_toy_gguf(path: Path, chat_template: str | None = None, **kw) -> Path:
    tokens, types, merges = toy_vocab(**kw)
    w = gguf.GGUFWriter(str(path), "diffusion-gemma")
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_oracle(tokens: list[str], types: list[int], merges: list[str]) -> Tokenizer:
    """The HF side of the same tokenizer (spec §D.1, transformers' GemmaTokenizer layout), built
    directly from the vocabulary and merges: no newline-run split."""
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(BPE(vocab, pairs, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    # Control tokens are special (hidden on decode); user-defined ones are added but shown.
    tok.add_tokens([AddedToken(t, special=(k == 3), normalized=False)
                    for t, k in zip(tokens, types) if k in (3, 4)])
    return tok

