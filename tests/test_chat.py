"""Chat template rendering (vs transformers' renderer), thinking, BOS, history, prefix cache."""
from __future__ import annotations

import pytest

from diffcli.errors import InputError
from diffcli.generation.prefix import PrefixCachedModel
from diffcli.text.chat import GEMMA4_TEMPLATE, ChatTemplate, Conversation, encode_prompt, split_thinking
from diffcli.text.tokenizer import Tokenizer
from _toyvocab import write_toy_gguf

pytest.importorskip("transformers")
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402

HISTORY = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": " Why is the sky blue? "},
    {"role": "assistant", "content": "<|channel>thought\nRayleigh...<channel|>Scattering."},
    {"role": "user", "content": [{"type": "text", "text": "And sunsets?"}]},
]


def _oracle(template: str, messages, **kw) -> str:
    out, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                   bos_token="<bos>", eos_token="<eos>", **kw)
    return out[0]


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("n", [2, 4])
def test_renders_like_transformers(thinking, n):
    msgs = HISTORY[1:n] if n == 2 else HISTORY[:n]
    kw = {"enable_thinking": True} if thinking else {}
    assert ChatTemplate(None).render(msgs, enable_thinking=thinking) == _oracle(GEMMA4_TEMPLATE, msgs, **kw)


def test_spec_examples():
    """The two prompts spelled out in spec §D.3."""
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    t = ChatTemplate(None)
    assert t.render(msgs) == ("<bos><|turn>user\nWhy is the sky blue?<turn|>\n<|turn>model\n"
                              "<|channel>thought\n<channel|>")
    assert t.render(msgs, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nWhy is the sky blue?<turn|>\n"
        "<|turn>model\n")


def test_earlier_thoughts_are_dropped():
    text = ChatTemplate(None).render(HISTORY)
    assert "Rayleigh" not in text and "<|turn>model\nScattering.<turn|>" in text
    assert "<|turn>system\nBe brief.<turn|>" in text


def test_environment_features_match_transformers():
    """A file template may use the sandbox extras: loop controls, raise_exception, tojson (not
    HTML-escaping), trim/lstrip blocks."""
    tmpl = ("{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}\n"
            "  {{ m.content | tojson }}|{{ bos_token }}\n{% endfor %}"
            "{% if messages | length > 5 %}{{ raise_exception('too many') }}{% endif %}")
    msgs = [{"role": "user", "content": "a<b> & \"é\""}, {"role": "skip", "content": "x"}]
    assert ChatTemplate(tmpl).render(msgs) == _oracle(tmpl, msgs)
    with pytest.raises(InputError, match="too many"):
        ChatTemplate(tmpl).render(msgs * 3)
    with pytest.raises(InputError, match="does not parse"):
        ChatTemplate("{% if %}")


def test_exactly_one_bos(tmp_path):
    tok = Tokenizer.from_gguf(write_toy_gguf(tmp_path / "t.gguf"))
    conv = Conversation(ChatTemplate(None), tok, system="Be brief.")
    conv.add_user("Hello there")
    ids = conv.prompt_ids()
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.decode(ids, special=True) == conv.prompt_text()
    # a template without <bos> still gets exactly one (the vocabulary adds it)
    assert encode_prompt(tok, "<|turn>user\nhi<turn|>\n")[:2] == [tok.bos_id, tok.token_to_id("<|turn>")]


def test_thinking_switches(tmp_path):
    tok = Tokenizer.from_gguf(write_toy_gguf(tmp_path / "t.gguf"))
    conv = Conversation(ChatTemplate(None), tok)
    conv.add_user("hi")
    assert "<|think|>" not in conv.prompt_text()
    conv.enable_thinking = True
    assert "<|think|>" in conv.prompt_text()
    conv.enable_thinking, conv.template_kwargs = False, {"enable_thinking": True}
    assert "<|think|>" in conv.prompt_text()


def test_clear_keeps_system():
    conv = Conversation(ChatTemplate(None), None, system="sys")
    conv.add_user("a")
    conv.add_reply("b")
    conv.clear()
    assert conv.messages == [{"role": "system", "content": "sys"}]


@pytest.mark.parametrize("text,want", [
    ("plain answer", ("", "plain answer")),
    ("<|channel>thought\nlet me see<channel|>42", ("let me see", "42")),
    ("<|channel>thought\nunfinished", ("unfinished", "")),
    ("a<|channel>thought\nx<channel|>b<|channel>thought\ny<channel|>c", ("xy", "abc")),
])
def test_split_thinking(text, want):
    assert split_thinking(text) == want


class _ListCache:
    def __init__(self, ids=()):
        self.ids = list(ids)

    def copy(self):
        return _ListCache(self.ids)


class _CountingModel:
    """Cache = the list of encoded ids; counts every token that goes through the encoder."""

    def __init__(self):
        self.encoded = 0

    def new_cache(self):
        return _ListCache()

    def encode(self, ids):
        return self.commit(_ListCache(), ids)

    def commit(self, cache, ids):
        self.encoded += len(ids)
        cache.ids += list(ids)
        return cache


def test_prefix_cache_reuses_previous_turn(tmp_path):
    tok = Tokenizer.from_gguf(write_toy_gguf(tmp_path / "t.gguf"))
    inner = _CountingModel()
    model = PrefixCachedModel(inner, checkpoint_id=tok.token_to_id("<|turn>"))
    conv = Conversation(ChatTemplate(None), tok, system="Be brief.")
    conv.add_user("Why is the sky blue?")
    turn1 = conv.prompt_ids()
    cache = model.encode(turn1)
    assert cache.ids == turn1 and inner.encoded == len(turn1)
    model.commit(cache, [7, 8, 9])                 # generation appends a canvas in place
    conv.add_reply("Because of scattering.")
    conv.add_user("And sunsets?")
    turn2 = conv.prompt_ids()
    before = inner.encoded
    cache2 = model.encode(turn2)
    assert cache2.ids == turn2                      # the cache holds exactly the new prompt
    new_tokens = inner.encoded - before
    # Only the tokens from turn 1's generation prompt on were encoded again: the snapshot sits just
    # before the last <|turn> of turn 1, which everything of turn 1's user message precedes.
    checkpoint = len(turn1) - 1 - turn1[::-1].index(tok.token_to_id("<|turn>"))
    assert new_tokens == len(turn2) - checkpoint
    assert tok.decode(turn2[checkpoint:], special=True).startswith("<|turn>model\nBecause")


def test_prefix_cache_keeps_its_checkpoint_when_a_prompt_repeats(tmp_path):
    # A server sees the same prompt twice (a regenerated reply, a retry) before the next turn;
    # the second, fully cached encode must not drop the snapshot the next turn starts from.
    tok = Tokenizer.from_gguf(write_toy_gguf(tmp_path / "t.gguf"))
    inner = _CountingModel()
    model = PrefixCachedModel(inner, checkpoint_id=tok.token_to_id("<|turn>"))
    conv = Conversation(ChatTemplate(None), tok)
    conv.add_user("Why is the sky blue?")
    turn1 = conv.prompt_ids()
    model.encode(turn1)
    before = inner.encoded
    model.encode(turn1)                              # the same prompt again: nothing to encode
    assert inner.encoded == before
    conv.add_reply("Because of scattering.")
    conv.add_user("And sunsets?")
    turn2 = conv.prompt_ids()
    before = inner.encoded
    assert model.encode(turn2).ids == turn2
    checkpoint = len(turn1) - 1 - turn1[::-1].index(tok.token_to_id("<|turn>"))
    assert inner.encoded - before == len(turn2) - checkpoint
