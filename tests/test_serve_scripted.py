"""The server end to end on a model double whose canvases are known in advance (a scripted
thought channel, answer and end-of-generation): reasoning_content, finish_reason "stop", usage, and
stop strings across canvases, through the openai client, streaming and not. (The random tiny model
never opens a thought channel, so only a script can check this path.)"""
from __future__ import annotations

import pytest

from diffcli.engine.loading import open_model_file
from diffcli.serve.runner import Settings
from _cli_fixtures import make_model
from _serve_fixtures import ScriptedModel, in_process, wait_ready

THOUGHT = "The user asks about colour; Rayleigh scattering goes as the fourth power."
ANSWER = "Short wavelengths scatter most, so the sky looks blue."
HI = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import openai
    mf = open_model_file(make_model(tmp_path_factory.mktemp("scripted") / "tiny.gguf"),
                         sampler_overrides={"max_steps": 4})
    tok = mf.tokenizer
    script = tok.encode(f"<|channel>thought\n{THOUGHT}<channel|>{ANSWER}", add_bos=False)
    assert len(script) > 2 * mf.canvas_length          # the reply spans several canvases
    eog = tok.token_to_id("<turn|>")
    with in_process(mf, Settings(model_name="scripted", context=4096),
                    lambda: ScriptedModel(mf.config, script, eog)) as (port, logs):
        wait_ready(port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        yield client, script, mf.canvas_length


def test_thinking_arrives_in_reasoning_content(served):
    client, script, C = served
    r = client.chat.completions.create(model="scripted", messages=HI, max_tokens=20 * C)
    msg = r.choices[0].message
    assert msg.reasoning_content == THOUGHT and msg.content == ANSWER
    assert r.choices[0].finish_reason == "stop" and r.diffusion["stop"] == "eog"
    assert r.usage.completion_tokens == len(script)             # not the rest of the last canvas
    assert r.diffusion["canvases"] == -(-(len(script) + 1) // C)


def test_streamed_reasoning_and_content_deltas_add_up(served):
    client, script, C = served
    chunks = list(client.chat.completions.create(model="scripted", messages=HI, stream=True,
                                                 max_tokens=20 * C))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.reasoning_content or "" for d in deltas if hasattr(d, "reasoning_content")) == THOUGHT
    assert "".join(d.content or "" for d in deltas) == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_include_reasoning_false_drops_the_thought_not_into_the_answer(served):
    client, _, C = served
    r = client.chat.completions.create(model="scripted", messages=HI, max_tokens=20 * C,
                                       extra_body={"include_reasoning": False})
    assert r.choices[0].message.reasoning_content is None and r.choices[0].message.content == ANSWER


def test_max_tokens_inside_the_thought(served):
    client, script, _ = served
    r = client.chat.completions.create(model="scripted", messages=HI, max_tokens=7)
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == "" and THOUGHT.startswith(r.choices[0].message.reasoning_content)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_in_the_answer_ends_the_reply(served, stream):
    client, script, C = served
    kw = dict(model="scripted", messages=HI, max_tokens=20 * C, stop=["so the"])
    if stream:
        content = "".join(c.choices[0].delta.content or "" for c in
                          client.chat.completions.create(stream=True, **kw) if c.choices)
    else:
        r = client.chat.completions.create(**kw)
        content = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop" and r.choices[0].stop_reason == "so the"
        assert r.usage.completion_tokens < len(script)
    assert content == ANSWER[:ANSWER.index("so the")]


def test_a_stop_string_only_in_the_thought_does_not_stop(served):
    client, _, C = served
    r = client.chat.completions.create(model="scripted", messages=HI, max_tokens=20 * C,
                                       stop=["fourth power"])
    assert r.choices[0].message.content == ANSWER and r.choices[0].stop_reason is None
