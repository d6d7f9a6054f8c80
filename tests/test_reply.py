"""engine.reply: committed canvases -> reply text, checked against decoding the whole token list
at once (the oracle), for every way the tokens can be cut into canvases."""
from __future__ import annotations

import pytest

from diffcli.engine.reply import Reply
from diffcli.text.chat import split_thinking
from diffcli.text.tokenizer import Tokenizer
from _cli_fixtures import make_model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_gguf(make_model(tmp_path_factory.mktemp("reply") / "tiny.gguf"))


def ids_of(tok, text):
    return tok.encode(text, add_bos=False, parse_special=True)


def feed_split(reply, ids, cut, ended_reason="eog"):
    """Feed ids as two canvases cut at `cut`; returns the deltas."""
    out = [reply.feed(ids[:cut])]
    out.append(reply.feed(ids[cut:], ended=True, reason=ended_reason))
    return out


def test_whole_canvases_decode_like_the_token_list(tok):
    ids = ids_of(tok, "The sky is blue because of Rayleigh scattering.")
    for cut in range(len(ids) + 1):
        r = Reply(tok)
        deltas = feed_split(r, ids, cut)
        assert "".join(d.content for d in deltas) == tok.decode(ids)
        assert r.finish_reason == "stop" and r.cause == "eog" and r.completion_tokens == len(ids)


@pytest.mark.parametrize("budget", [1, 5, 9, 16])
def test_max_tokens_is_exact_and_trims_the_last_canvas(tok, budget):
    ids = ids_of(tok, "one two three four five six seven eight nine ten eleven twelve")
    assert len(ids) > 16
    r = Reply(tok, max_tokens=budget)
    first = r.feed(ids[:8])
    rest = r.feed(ids[8:16], ended=False) if not r.finished else None
    text = first.content + (rest.content if rest else "")
    assert r.completion_tokens == budget and r.tokens == ids[:budget]
    assert text == tok.decode(ids[:budget])
    assert r.finished and r.finish_reason == "length" and r.cause == "max_tokens"
    assert not r.feed(ids[16:], ended=True, reason="eog")          # nothing after the budget


def test_a_reply_that_ends_before_the_budget_says_stop_and_counts_only_its_tokens(tok):
    ids = ids_of(tok, "short answer")
    r = Reply(tok, max_tokens=100)
    d = r.feed(ids, ended=True, reason="eog")
    assert d.content == tok.decode(ids) and r.completion_tokens == len(ids)
    assert r.finish_reason == "stop"
    r = Reply(tok, max_tokens=100)
    r.feed(ids, ended=True, reason="length")                        # the canvases ran out
    assert r.finish_reason == "length" and r.cause == "canvases"


def test_stop_string_is_found_across_every_canvas_boundary_and_never_sent(tok):
    text = "alpha beta. STOP gamma delta"
    ids = ids_of(tok, text)
    want = text[:text.index("STOP")]
    for cut in range(len(ids) + 1):
        r = Reply(tok, stop=("STOP",))
        deltas = feed_split(r, ids, cut, ended_reason="length")
        sent = "".join(d.content for d in deltas)
        assert sent == want, cut          # so no piece of the stop string was ever sent
        assert r.finish_reason == "stop" and r.stop_match == "STOP"
        # the tokens counted are the fewest whose text reaches the end of the stop string
        n = r.completion_tokens
        assert "STOP" in tok.decode(ids[:n]) and "STOP" not in tok.decode(ids[:n - 1])


def test_held_back_stop_prefix_is_released_when_it_is_not_a_stop(tok):
    text = "a ST b STX c"
    ids = ids_of(tok, text)
    r = Reply(tok, stop=("STOP",))
    deltas = feed_split(r, ids, len(ids_of(tok, "a ST")), ended_reason="eog")
    assert "".join(d.content for d in deltas) == tok.decode(ids)
    assert deltas[0].content == tok.decode(ids_of(tok, "a "))      # "ST" waited for the next canvas
    assert r.finish_reason == "stop" and r.stop_match is None and r.cause == "eog"


def test_the_earliest_of_several_stop_strings_wins(tok):
    ids = ids_of(tok, "x END y HALT z")
    r = Reply(tok, stop=("HALT", "END"))
    r.feed(ids, ended=True, reason="length")
    assert r.content == "x " and r.stop_match == "END"


def test_thinking_goes_to_reasoning_at_every_canvas_boundary(tok):
    text = "<|channel>thought\nThe user wants colour.<channel|>Blue."
    ids = ids_of(tok, text)
    thinking, answer = split_thinking(tok.decode(ids))
    assert thinking and answer == "Blue."
    for cut in range(len(ids) + 1):
        r = Reply(tok)
        deltas = feed_split(r, ids, cut)
        assert "".join(d.reasoning for d in deltas) == thinking, cut
        assert "".join(d.content for d in deltas) == answer, cut


def test_stop_strings_apply_to_the_answer_not_the_thought(tok):
    ids = ids_of(tok, "<|channel>thought\nno STOP here<channel|>yes STOP there")
    r = Reply(tok, stop=("STOP",))
    r.feed(ids, ended=True, reason="eog")
    assert r.reasoning == "no STOP here" and r.content == "yes " and r.finish_reason == "stop"


def test_a_raw_completion_keeps_the_channel_in_the_text(tok):
    ids = ids_of(tok, "<|channel>thought\nhm<channel|>ok")
    r = Reply(tok, reasoning=False)
    r.feed(ids, ended=True, reason="eog")
    assert r.content == tok.decode(ids) and r.reasoning == ""
