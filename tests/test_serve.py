"""`diffcli serve` driven with the official openai client, streaming and not, on a tiny random
model: every reply is checked against the library's own generation for the same prompt and seed,
and every bad request has its 4xx."""
from __future__ import annotations

import json
import threading

import openai
import pytest

from _cli_fixtures import make_model
from _serve_fixtures import FAST, Reference, ServerProcess, raw

pytestmark = pytest.mark.slow
HI = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("serve") / "tiny.gguf")


@pytest.fixture(scope="module")
def server(model_path):
    s = ServerProcess(model_path, *FAST, "--max-queue", "8", "-a", "tiny")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def ref(model_path):
    return Reference(model_path)


def test_health_and_models(server, client):
    status, _, body = raw(server.port, "GET", "/health")
    assert status == 200 and body == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].max_model_len == 4096 and models[0].canvas_length == 16


def test_chat_matches_the_library_token_for_token(client, ref):
    for seed, max_tokens in ((7, 32), (3, 5)):
        r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=max_tokens, seed=seed)
        ids = ref.chat_ids(HI)
        want = ref.tokens(ids, max_tokens, seed)
        choice = r.choices[0]
        assert choice.message.content == ref.answer(want)
        assert r.usage.prompt_tokens == len(ids)
        assert r.usage.completion_tokens == len(want) <= max_tokens        # exact, never a canvas more
        assert choice.finish_reason == ("length" if len(want) == max_tokens else "stop")
        assert r.diffusion["seed"] == seed and r.diffusion["emitted_tokens"] == len(want)
        assert r.diffusion["canvases"] == -(-len(want) // 16) or choice.finish_reason == "stop"
        assert r.model == "tiny" and r.object == "chat.completion"


def test_streaming_sends_one_delta_per_canvas_and_the_same_text(client, ref):
    plain = client.chat.completions.create(messages=HI, model="tiny", max_tokens=48, seed=5)
    chunks = list(client.chat.completions.create(messages=HI, model="tiny", max_tokens=48, seed=5,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(text) == plain.choices[0].message.content
    assert 1 <= len(text) <= plain.diffusion["canvases"]              # a delta per committed canvas
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_the_step_stream_extension_sends_every_draft_canvas(server, ref):
    body = {"messages": HI, "max_tokens": 40, "seed": 9, "stream": True, "diffusion_trace": True}
    status, _, text = raw(server.port, "POST", "/v1/chat/completions", body)
    assert status == 200
    events = [json.loads(line[5:]) for line in text.splitlines()
              if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    steps = [e["diffusion_step"] for e in events if "diffusion_step" in e]
    canvases = [e["diffusion_canvas"] for e in events if "diffusion_canvas" in e]
    final = [e for e in events if "diffusion" in e][0]["diffusion"]
    assert all(e["choices"] == [] for e in events if "diffusion_step" in e or "diffusion_canvas" in e)
    order = [(s["canvas"], s["step"]) for s in steps]
    assert order == sorted(set(order))                 # in order; a slow reader may miss some
    for s in steps:
        assert len(s["argmax"]) == len(s["accepted"]) == len(s["entropy"]) == len(s["pieces"]) == 16
        assert set(s["accepted"]) <= {0, 1} and all(h >= 0 for h in s["entropy"])
        assert s["pieces"] == [ref.tok.piece(i) for i in s["argmax"]]
    assert len(canvases) == final["canvases"] and [c["steps"] for c in canvases] == final["steps_per_canvas"]
    # each canvas's last step is always sent, and its argmax is what the canvas committed
    want = ref.tokens(ref.chat_ids(HI), 40, 9)
    committed = []
    for c, n_steps in enumerate(final["steps_per_canvas"]):
        last = [s for s in steps if s["canvas"] == c][-1]
        assert last["step"] == n_steps - 1
        committed += last["argmax"]
    assert committed[:len(want)] == want and canvases[-1]["emitted"] == len(want)


def test_completions_endpoint_string_and_token_prompts(client, ref):
    from diffcli.text.chat import encode_prompt
    ids = encode_prompt(ref.tok, "Once upon a time")
    want = ref.tokens(ids, 24, 4)
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, seed=4)
    assert r.choices[0].text == ref.tok.decode(want)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=24, seed=4)
    assert r2.choices[0].text == r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=24, seed=4, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_stop_strings_cut_the_answer_and_count_only_what_came_before(client, ref):
    ids = ref.chat_ids(HI)
    seed, want = next((s, w) for s in range(7, 40) if len(ref.answer(w := ref.tokens(ids, 48, s))) > 12)
    full = ref.answer(want)
    stop = next(full[i:i + 3] for i in range(5, len(full) - 3) if full.find(full[i:i + 3]) == i)
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=48, seed=seed, stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop" and r.choices[0].stop_reason == stop
    assert r.usage.completion_tokens < len(want)
    s = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=48, seed=seed, stop=stop, stream=True) if c.choices)
    assert s == full[:full.index(stop)]


def test_seed_reproduces_and_sampling_fields_are_ignored(client):
    def ask(**kw):
        return client.chat.completions.create(model="tiny", messages=HI, max_tokens=32, **kw)
    a, b = ask(seed=21), ask(seed=21, temperature=0.1, top_p=0.5, presence_penalty=1.0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert ask(seed=22).choices[0].message.content != a.choices[0].message.content
    # no seed: a fresh one each time, reported so the reply can be reproduced
    c = ask()
    assert ask(seed=c.diffusion["seed"]).choices[0].message.content == c.choices[0].message.content


def test_sampler_fields_named_like_the_flags(client):
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=32, seed=1,
                                       extra_body={"diffusion_eb_max_steps": 1})
    assert r.diffusion["steps_per_canvas"] and all(s == 1 for s in r.diffusion["steps_per_canvas"])
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=16, seed=1,
                                       extra_body={"diffusion_eb_max_steps": 6,
                                                   "diffusion_eb_confidence": 0.0})
    assert r.diffusion["steps_per_canvas"] == [6]        # confidence 0 never stops a canvas early


def test_thinking_switches_and_earlier_thoughts_stay_out(client, ref):
    def prompt_tokens(messages, **kw):
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, seed=1,
                                              **kw).usage.prompt_tokens
    off, on = len(ref.chat_ids(HI)), len(ref.chat_ids(HI, thinking=True))
    assert on > off
    assert prompt_tokens(HI) == off
    assert prompt_tokens(HI, extra_body={"chat_template_kwargs": {"enable_thinking": True}}) == on
    assert prompt_tokens(HI, reasoning_effort="high") == on
    assert prompt_tokens(HI, reasoning_effort="none") == off
    # an explicit enable_thinking beats reasoning_effort
    assert prompt_tokens(HI, reasoning_effort="high",
                         extra_body={"chat_template_kwargs": {"enable_thinking": False}}) == off
    clean = [*HI, {"role": "assistant", "content": "Rayleigh."}, {"role": "user", "content": "More?"}]
    thought = [*HI, {"role": "assistant", "content": "<|channel>thought\nlong secret musing<channel|>Rayleigh.",
                     "reasoning_content": "more secret musing"}, {"role": "user", "content": "More?"}]
    assert prompt_tokens(thought) == prompt_tokens(clean) == len(ref.chat_ids(clean))


def test_multi_turn_reuses_the_prompt_cache(client):
    r1 = client.chat.completions.create(model="tiny", messages=HI, max_tokens=16, seed=1)
    turn2 = [*HI, {"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "And at sunset?"}]
    r2 = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=16, seed=1)
    assert 0 < r2.usage.prompt_tokens_details.cached_tokens < r2.usage.prompt_tokens


BAD = [
    ("not json", b"{\"messages\": [", "not valid JSON"),
    ("not an object", b"[1, 2]", "must be a JSON object"),
    ("nested too deeply", b"[" * 200000 + b"]" * 200000, "nested too deeply"),
    ("not UTF-8", b'{"messages": "\xff"}', "UTF-8"),
    ("no messages", {"model": "tiny"}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("messages not a list", {"messages": "hi"}, "messages"),
    ("max_tokens a string", {"messages": HI, "max_tokens": "10"}, "max_tokens"),
    ("max_tokens zero", {"messages": HI, "max_tokens": 0}, "max_tokens"),
    ("stream not a bool", {"messages": HI, "stream": "yes"}, "stream"),
    ("seed negative", {"messages": HI, "seed": -1}, "seed"),
    ("temperature out of range", {"messages": HI, "temperature": 7}, "temperature"),
    ("n > 1", {"messages": HI, "n": 2}, "n must be 1"),
    ("empty stop", {"messages": HI, "stop": [""]}, "stop string"),
    ("stop string too long", {"messages": HI, "stop": "x" * 2000}, "at most 1024"),
    ("too many stop strings", {"messages": HI, "stop": ["a"] * 17}, "at most 16"),
    ("tools", {"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool"),
    ("image part", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "start it with --mmproj"),
    ("tool role", {"messages": [{"role": "tool", "content": "x"}]}, "not supported"),
    ("logprobs", {"messages": HI, "logprobs": True}, "logprobs"),
    ("json mode", {"messages": HI, "response_format": {"type": "json_object"}}, "response_format"),
    ("bad reasoning_effort", {"messages": HI, "reasoning_effort": "huge"}, "reasoning_effort"),
    ("unknown diffcli field", {"messages": HI, "diffusion_eb_max_step": 3}, "unknown field"),
    ("sampler setting out of range", {"messages": HI, "diffusion_eb_t_min": 0.9,
                                      "diffusion_eb_t_max": 0.5}, "t_min"),
    ("max_steps zero", {"messages": HI, "diffusion_eb_max_steps": 0}, "diffusion_eb_max_steps"),
    ("too long for the context", {"messages": HI, "max_tokens": 10**6}, "context"),
]


@pytest.mark.parametrize("name,body,says", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests_get_400_with_an_openai_error(server, name, body, says):
    status, _, data = raw(server.port, "POST", "/v1/chat/completions", body)
    assert status == 400, data
    err = data["error"]
    assert err["type"] == "invalid_request_error" and says in err["message"], err


@pytest.mark.parametrize("body,says", [
    ({"prompt": "x", "echo": True}, "echo"), ({"prompt": ["a", "b"]}, "one prompt"),
    ({"prompt": [10**6]}, "vocabulary"), ({"prompt": 5}, "prompt"), ({}, "prompt"),
    ({"prompt": ""}, "empty"),
])
def test_bad_completion_requests_get_400(server, body, says):
    status, _, data = raw(server.port, "POST", "/v1/completions", body)
    assert status == 400 and says in data["error"]["message"], data


def test_the_openai_client_sees_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HI, n=3)
    assert "n must be 1" in e.value.message


def test_unknown_routes_and_methods_and_oversized_bodies(server):
    status, _, data = raw(server.port, "GET", "/v1/embeddings")
    assert status == 404 and data["error"]["type"] == "not_found_error"
    status, _, data = raw(server.port, "GET", "/v1/chat/completions")
    assert status == 405 and "error" in data
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (5 << 20)}]})
    status, _, data = raw(server.port, "POST", "/v1/chat/completions", big)
    assert status == 413 and data["error"]["code"] == "request_too_large"


def test_the_page_is_served(server):
    status, headers, text = raw(server.port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert 'id="canvas"' in text and "/v1/chat/completions" in text


def test_concurrent_requests_are_answered_in_turn_and_identically(client):
    want = client.chat.completions.create(model="tiny", messages=HI, max_tokens=32, seed=3)
    got = [None] * 6

    def ask(i):
        got[i] = client.chat.completions.create(model="tiny", messages=HI, max_tokens=32, seed=3)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(g.choices[0].message.content == want.choices[0].message.content for g in got)
