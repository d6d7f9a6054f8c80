"""Images in `diffcli serve`: OpenAI `image_url` parts with data: URLs, on a tiny random model and
a random vision tower made in tmp_path, driven with the official openai client. A reply with images
must be the reply `diffcli run --image` gives (and the library's generate with the same image) for
the same seed; two images of the same size must never share a cached prefix; every bad image
request is a 400 with a message that says what to do."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from _cli_fixtures import make_model, run
from _serve_fixtures import (FAST, Reference, ScriptedModel, ServerProcess, data_url, image_part,
                             in_process, raw)

pytestmark = pytest.mark.slow
BUDGET = 70                       # soft tokens per image: the smallest budget, for speed
IMG = ["--image-max-tokens", str(BUDGET)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from diffcli.testing import make_random_mmproj
    d = tmp_path_factory.mktemp("serve_images")
    make_model(d / "tiny.gguf")
    make_random_mmproj(d / "mm.gguf", text_hidden=64)
    make_random_mmproj(d / "wide-mm.gguf", text_hidden=96)
    rng = np.random.default_rng(11)
    # a and a2: the same size (the same prompt ids), different pixels
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(d / "a2.png")
    Image.fromarray(rng.integers(0, 256, (90, 30, 3), dtype=np.uint8)).save(d / "b.jpg", quality=90)
    return d


@pytest.fixture(scope="module")
def server(files):
    s = ServerProcess(files / "tiny.gguf", *FAST, "--mmproj", str(files / "mm.gguf"), *IMG,
                      "-a", "tiny")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def ref(files):
    import diffcli
    r = Reference(files / "tiny.gguf")
    r.tower = diffcli.load_vision(files / "mm.gguf", dtype=torch.float32)
    return r


def reference(ref, files, parts, max_tokens: int, seed: int):
    """(prompt ids, tokens) the library gives for one user message of `parts`: ("text", str) or
    ("image", file name), built with the CLI's own Conversation and image preparation."""
    from diffcli.media.image import prepare_image
    from diffcli.text.chat import ChatTemplate, Conversation
    conv = Conversation(ChatTemplate(ref.tok.chat_template), ref.tok)
    conv.messages = [{"role": "user", "content": [
        {"type": "text", "text": v} if k == "text" else
        {"type": "image", "image": prepare_image(files / v, 16, max_soft_tokens=BUDGET)}
        for k, v in parts]}]
    ids, slots = conv.prompt()
    return ids, ref.tokens(ids, max_tokens, seed, images=ref.image_spans(ref.tower, slots))


def ask(client, content, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                          **kw)


def test_a_reply_with_images_is_the_reply_of_diffcli_run(files, client, ref):
    """`diffcli run --image a.png --image b.jpg -p "Compare <__media__> with <__media__>."` and the
    same message as OpenAI content parts: the same prompt, the same tokens."""
    threads = torch.get_num_threads()
    try:
        res = run(["-m", files / "tiny.gguf", "--mmproj", files / "mm.gguf", "--image",
                   files / "a.png", "--image", files / "b.jpg", *IMG, "-p",
                   "Compare <__media__> with <__media__>.", "-n", "32", "-s", "5", "--json",
                   "--dtype", "f32", "-t", "1", "--diffusion-eb-max-steps", "2", "--no-perf",
                   "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)              # -t 1 in this process: restore it
    assert res.exit_code == 0, res.stderr
    cli = json.loads(res.stdout)
    content = [{"type": "text", "text": "Compare "}, image_part(data_url(files / "a.png")),
               {"type": "text", "text": " with "}, image_part(data_url(files / "b.jpg")),
               {"type": "text", "text": "."}]
    r = ask(client, content, max_tokens=32, seed=5)
    assert r.usage.prompt_tokens == cli["prompt_tokens"] > 2 * BUDGET
    assert r.usage.completion_tokens == len(cli["tokens"][:32])
    assert r.choices[0].message.content == ref.answer(cli["tokens"][:32])
    assert r.diffusion["images"] == 2
    # and the library, given the same images, generates these very tokens
    ids, want = reference(ref, files, [("text", "Compare "), ("image", "a.png"), ("text", " with "),
                                       ("image", "b.jpg"), ("text", ".")], 32, 5)
    assert len(ids) == cli["prompt_tokens"] and want == cli["tokens"][:32]


def test_streaming_with_an_image_sends_the_same_text(client, files, ref):
    content = [image_part(data_url(files / "b.jpg")), {"type": "text", "text": "What is it?"}]
    ids, want = reference(ref, files, [("image", "b.jpg"), ("text", "What is it?")], 40, 8)
    plain = ask(client, content, max_tokens=40, seed=8)
    assert plain.choices[0].message.content == ref.answer(want)
    assert plain.usage.prompt_tokens == len(ids)
    text = "".join(c.choices[0].delta.content or "" for c in ask(client, content, max_tokens=40, seed=8,
                                                                 stream=True) if c.choices)
    assert text == plain.choices[0].message.content


def test_two_images_never_share_a_cached_prefix(client, files, ref):
    """a.png and a2.png have the same size, so their prompts have the same token ids: only the
    image digests in the prompt cache's keys tell them apart."""
    def content(name):
        return [image_part(data_url(files / name)), {"type": "text", "text": "Describe it."}]
    ids_a, want_a = reference(ref, files, [("image", "a.png"), ("text", "Describe it.")], 32, 3)
    ids_b, want_b = reference(ref, files, [("image", "a2.png"), ("text", "Describe it.")], 32, 3)
    assert ids_a == ids_b and ref.answer(want_a) != ref.answer(want_b)     # the test can tell
    first_image = ids_a.index(ref.tok.token_to_id("<|image>")) + 1
    ra = ask(client, content("a.png"), max_tokens=32, seed=3)
    rb = ask(client, content("a2.png"), max_tokens=32, seed=3)
    assert ra.choices[0].message.content == ref.answer(want_a)
    assert rb.choices[0].message.content == ref.answer(want_b)
    assert rb.usage.prompt_tokens_details.cached_tokens < first_image
    # the same image again does reuse the cache, and the reply is still its own
    rb2 = ask(client, content("a2.png"), max_tokens=32, seed=3)
    assert rb2.usage.prompt_tokens_details.cached_tokens > first_image + BUDGET
    assert rb2.choices[0].message.content == ref.answer(want_b)
    ra2 = ask(client, content("a.png"), max_tokens=32, seed=3)
    assert ra2.usage.prompt_tokens_details.cached_tokens < first_image
    assert ra2.choices[0].message.content == ref.answer(want_a)


def test_a_chat_turn_after_an_image_reuses_the_image_prefix(client, files, ref):
    turn1 = [{"role": "user", "content": [image_part(data_url(files / "b.jpg")),
                                          {"type": "text", "text": "What is it?"}]}]
    r1 = client.chat.completions.create(model="tiny", messages=turn1, max_tokens=16, seed=1)
    turn2 = [*turn1, {"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "And its colour?"}]
    r2 = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=16, seed=1)
    assert BUDGET < r2.usage.prompt_tokens_details.cached_tokens < r2.usage.prompt_tokens


def test_the_image_is_its_pixels_whatever_the_format(client, files, tmp_path):
    """The same pixels as PNG and as lossless WebP: the same prompt, reply and cache key."""
    Image.open(files / "a.png").save(tmp_path / "a.webp", lossless=True)
    def content(path):
        return [image_part(data_url(path)), {"type": "text", "text": "Again?"}]
    r_png = ask(client, content(files / "a.png"), max_tokens=16, seed=2)
    r_webp = ask(client, content(tmp_path / "a.webp"), max_tokens=16, seed=2)
    assert r_webp.choices[0].message.content == r_png.choices[0].message.content
    assert r_webp.usage.prompt_tokens_details.cached_tokens == r_webp.usage.prompt_tokens


def test_a_photo_sized_image_over_4_mib_is_taken(client, files, ref, tmp_path):
    """With --mmproj the body limit is 32 MiB: a 1500 x 1000 noise PNG is about 6 MiB in base64."""
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (1000, 1500, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    url = data_url(tmp_path / "big.png")
    assert len(url) > 5 << 20
    r = ask(client, [image_part(url), {"type": "text", "text": "Hi"}], max_tokens=16, seed=4)
    from diffcli.media.image import prepare_image
    from diffcli.text.chat import ChatTemplate, Conversation
    conv = Conversation(ChatTemplate(ref.tok.chat_template), ref.tok)
    conv.add_user("Hi", images=[prepare_image(tmp_path / "big.png", 16, max_soft_tokens=BUDGET)])
    ids, slots = conv.prompt()
    want = ref.tokens(ids, 16, 4, images=ref.image_spans(ref.tower, slots))
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].message.content == ref.answer(want)


def test_the_tower_runs_once_per_distinct_image_among_the_recent_ones():
    from diffcli.engine.images import ImageEmbedder
    from diffcli.media.image import prepare_image

    class Tower:              # counts its runs; soft tokens that say which pixels they came from
        calls = 0

        def embed(self, pixels, grid):
            Tower.calls += 1
            return pixels[: grid[0] * grid[1] // 9, :4].clone()
    rng = np.random.default_rng(0)
    imgs = [prepare_image(Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)), 16,
                          max_soft_tokens=BUDGET) for _ in range(3)]
    e = ImageEmbedder(Tower(), keep=2)
    a, b, c = imgs
    first = e.spans([(1, a), (200, b)])
    assert Tower.calls == 2 and [s.key for s in first] == [a.digest, b.digest]
    again = e.spans([(1, a), (200, b)])
    assert Tower.calls == 2 and all(torch.equal(x.embeds, y.embeds) for x, y in zip(first, again))
    e.spans([(1, c)])                     # c in, a (the least recently used) out
    assert Tower.calls == 3
    e.spans([(1, b)])
    assert Tower.calls == 3               # b was kept
    e.spans([(1, a)])
    assert Tower.calls == 4 and len(e.cache) == 2 and c.digest not in e.cache


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a pixel bomb: decoding it would need
    3 * width * height bytes); its pixel data is a few bytes of nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def _b64(data: bytes, mime: str = "image/png") -> str:
    import base64
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def bad_requests(files):
    ok = image_part(data_url(files / "b.jpg"))
    png = (files / "a.png").read_bytes()

    def user(*parts):
        return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "Hi"}]}]}
    return [
        ("https URL", user(image_part("https://example.com/cat.png")), "not a https: URL"),
        ("http URL", user({"type": "image_url", "image_url": "http://example.com/cat.png"}),
         "fetches nothing"),
        ("file path", user(image_part("/etc/passwd")), "must be a data: URL"),
        ("no URL", user({"type": "image_url", "image_url": {"url": ""}}), "needs"),
        ("no image_url", user({"type": "image_url"}), "needs"),
        ("not base64", user(image_part("data:image/png,rawbytes")), "not base64-encoded"),
        ("bad base64", user(image_part("data:image/png;base64,@@@@")), "invalid base64"),
        ("not an image type", user(image_part(_b64(b"hello", "text/plain"))), "not an image"),
        ("not an image", user(image_part(_b64(b"hello world, no pixels here"))), "not an image diffcli can read"),
        ("truncated", user(image_part(_b64(png[:150]))), "damaged or truncated"),
        # over diffcli's 8192 x 8192 (checked on the header), and over Pillow's own bomb limit
        ("pixel bomb", user(image_part(_b64(png_header(9000, 8000)))), "72,000,000 pixels"),
        ("huge pixel bomb", user(image_part(_b64(png_header(20000, 20000)))), "too large to decode"),
        ("too many images", user(*[ok] * 17), "at most 16"),
        ("image in an assistant message", {"messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": [ok]},
            {"role": "user", "content": "Again"}]}, "user messages only"),
        ("audio part", user({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}),
         "only text and image_url parts"),
        ("text part without text", user({"type": "text"}), "needs a \"text\" string"),
        ("an image marker typed in the text", {"messages": [{"role": "user", "content": [
            ok, {"type": "text", "text": "look: <|image|>"}]}]}, "image markers"),
    ]


def test_bad_image_requests_are_400s_with_a_message(server, files):
    cases = bad_requests(files)
    for name, body, says in cases:
        status, _, data = raw(server.port, "POST", "/v1/chat/completions", {**body, "max_tokens": 8})
        assert status == 400, (name, data)
        err = data["error"]
        assert err["type"] == "invalid_request_error" and says in err["message"], (name, err)
        assert "Traceback" not in err["message"] and "\n" not in err["message"], name
    # the message says which part: the pixel bomb is the first part of the first message
    bomb = next(body for name, body, _ in cases if name == "pixel bomb")
    status, _, data = raw(server.port, "POST", "/v1/chat/completions", bomb)
    assert data["error"]["param"] == "messages.0.content.0", data
    assert data["error"]["message"].startswith("messages.0.content.0: image is 9000x8000")
    # the server still answers after all that
    status, _, data = raw(server.port, "POST", "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert status == 200, data


def test_the_openai_client_sees_a_bad_request_for_a_web_url(client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [image_part("https://example.com/cat.png"), {"type": "text", "text": "Hi"}],
            max_tokens=8)
    assert "data:" in e.value.message and "fetches nothing" in e.value.message


def test_an_image_to_a_server_without_mmproj_says_to_start_it_with_mmproj(files):
    from diffcli.engine.loading import open_model_file
    from diffcli.serve.runner import Settings
    mf = open_model_file(files / "tiny.gguf")
    settings = Settings(model_name="tiny", context=4096, log_requests=False)
    load = lambda: ScriptedModel(mf.config, [5] * 16, mf.tokenizer.eos_id)  # noqa: E731
    with in_process(mf, settings, load) as (port, _):
        body = {"messages": [{"role": "user", "content": [image_part(data_url(files / "a.png")),
                                                           {"type": "text", "text": "Hi"}]}]}
        status, _, data = raw(port, "POST", "/v1/chat/completions", body)
    assert status == 400, data
    msg = data["error"]["message"]
    assert msg.startswith("messages.0.content.0: ") and "start it with --mmproj" in msg, msg


def test_a_bad_mmproj_is_a_one_line_error_before_listening(files):
    base = ["serve", "-m", files / "tiny.gguf", "--port", "0", "--device", "cpu"]
    for mm, says in ((files / "wide-mm.gguf", "width 96"), (files / "tiny.gguf", "not an mmproj file"),
                     (files / "nope.gguf", "nope.gguf")):
        res = run([*base, "--mmproj", mm])
        assert res.exit_code == 2, (mm, res.stderr)
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("diffcli: error: ") and says in last, res.stderr
        assert "listening" not in res.stderr and "Traceback" not in res.stderr
    res = run([*base, "--mmproj", files / "mm.gguf", "--image", files / "a.png"])
    assert res.exit_code == 2 and "--image" in res.stderr          # images come with requests
