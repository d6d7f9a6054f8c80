"""Prompts with images, against transformers 5.23.0's Gemma 4 processor: the chat template
renders an image item as `<|image|>`, and the processor expands each into `<|image>`, one
`<|image|>` per soft token, `<image|>` before tokenizing (`Gemma4Processor.replace_image_token`,
ProcessorMixin's expansion, HF `tokenizers`). diffcli's Conversation must give the same ids, and
its images the processor's pixels. The chat prefix cache must reuse a cached image only for the
same image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffcli.errors import InputError
from diffcli.media.image import prepare_image
from diffcli.text.chat import ChatTemplate, Conversation, encode_prompt_with_images
from diffcli.text.tokenizer import Tokenizer

BUDGET = 70


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffcli.testing import make_random_gguf
    d = tmp_path_factory.mktemp("prompt")
    path = make_random_gguf(d / "tiny.gguf")
    paths = []
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate([(64, 90), (120, 40), (50, 50)]):
        paths.append(d / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return Tokenizer.from_gguf(path), paths


def hf_processor(tokenizer_vocab_size):
    """transformers' Gemma4Processor around the toy tokenizer and the Pillow image processor
    (built without its video and audio parts, which need torchvision)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from diffcli.testing import toy_tokenizer
    tok = PreTrainedTokenizerFast(tokenizer_object=toy_tokenizer(tokenizer_vocab_size),
                                  bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    p = object.__new__(Gemma4Processor)
    p.tokenizer = tok
    p.image_processor = Gemma4ImageProcessorPil(max_soft_tokens=BUDGET)
    p.image_token, p.boi_token, p.eoi_token = "<|image|>", "<|image>", "<image|>"
    p.image_token_id = tok.convert_tokens_to_ids("<|image|>")
    p.boa_token = p.eoa_token = "<unused0>"      # its input check wants these set
    p.audio_token = p.video_token = None
    p.chat_template = None
    return p


def hf_render(template: str, messages) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template
    plain = [{**m, "content": m["content"] if isinstance(m["content"], str) else
              [{k: v for k, v in part.items() if k != "image"} for part in m["content"]]}
             for m in messages]
    out, _ = render_jinja_template([plain], chat_template=template, add_generation_prompt=True,
                                   bos_token="<bos>", eos_token="<eos>")
    return out[0]


def test_ids_and_pixels_equal_the_processor(tiny):
    from transformers.image_utils import load_image
    tok, paths = tiny
    imgs = [prepare_image(p, 16, max_soft_tokens=BUDGET) for p in paths]
    conv = Conversation(ChatTemplate(tok.chat_template), tok, system="Be brief.")
    conv.add_user("What is in this picture?", images=imgs[:1])
    conv.add_reply("A cat.")
    conv.add_user("Compare <__media__> with <__media__>, please.", images=imgs[1:])
    ids, slots = conv.prompt()

    text = hf_render(tok.chat_template, conv.messages)
    assert text.count("<|image|>") == 3
    proc = hf_processor(len(tok))
    out = proc(images=[load_image(str(p)) for p in paths], text=[text], add_special_tokens=False,
               return_tensors="np")
    assert ids == out["input_ids"][0].tolist()
    mm = out["mm_token_type_ids"][0]
    starts = [i for i in range(len(mm)) if mm[i] == 1 and (i == 0 or mm[i - 1] == 0)]
    assert [s for s, _ in slots] == starts
    runs = [int(np.argmin(mm[s:] == 1)) if (mm[s:] == 0).any() else len(mm) - s for s in starts]
    assert [img.n_tokens for _, img in slots] == runs
    pv, pos = out["pixel_values"], out["image_position_ids"]
    for k, (_, img) in enumerate(slots):
        real = (pos[k] != -1).any(-1)
        assert np.array_equal(img.pixels, pv[k][real])


def test_images_go_before_the_text_without_markers(tiny):
    tok, paths = tiny
    img = prepare_image(paths[0], 16, max_soft_tokens=BUDGET)
    conv = Conversation(ChatTemplate(tok.chat_template), tok)
    conv.add_user("Describe it.", images=[img, img])
    assert [p["type"] for p in conv.messages[0]["content"]] == ["image", "image", "text"]
    assert "\n\n<|image|>\n\n\n\n<|image|>\n\nDescribe it." in conv.prompt_text()


def test_marker_mismatches_are_input_errors(tiny):
    tok, paths = tiny
    img = prepare_image(paths[0], 16, max_soft_tokens=BUDGET)
    conv = Conversation(ChatTemplate(tok.chat_template), tok)
    with pytest.raises(InputError, match="2 <__media__> markers for 1 images"):
        conv.add_user("<__media__> and <__media__>", images=[img])
    with pytest.raises(InputError, match="3 image markers for 1 images"):
        encode_prompt_with_images(tok, "<|image|> a <|image|> b <|image|>", [img])
    with pytest.raises(InputError, match="drops images"):
        encode_prompt_with_images(tok, "no marker", [img])


def test_the_builtin_template_renders_images_like_gemma4(tiny):
    tok, paths = tiny
    img = prepare_image(paths[1], 16, max_soft_tokens=BUDGET)
    conv = Conversation(ChatTemplate(None), tok)
    conv.add_user("  Look.  ", images=[img])
    assert conv.prompt_text() == hf_render(ChatTemplate(None).source, conv.messages)
    assert "<|turn>user\n\n\n<|image|>\n\nLook.<turn|>" in conv.prompt_text()


# ---- the chat prefix cache ------------------------------------------------------------------

@pytest.fixture(scope="module")
def vision_model(tmp_path_factory):
    import diffcli
    from diffcli.model.vision import load_vision
    from diffcli.testing import make_tiny_gguf
    d = tmp_path_factory.mktemp("prefix")
    text, _ = make_tiny_gguf(d / "tiny.gguf", mmproj=d / "mm.gguf")
    return diffcli.load(text, dtype=torch.float32), load_vision(d / "mm.gguf", dtype=torch.float32), \
        Tokenizer.from_gguf(text)


def _spans(tower, slots):
    from diffcli.model.images import ImageSpan
    return [ImageSpan(s, tower.embed(torch.from_numpy(i.pixels), i.grid), i.digest) for s, i in slots]


def test_prefix_cache_reuses_an_image_only_when_it_is_the_same(vision_model, tiny):
    from diffcli.generation.prefix import PrefixCachedModel
    model, tower, tok = vision_model
    _, paths = tiny
    a = prepare_image(paths[0], 16, max_soft_tokens=BUDGET)
    same_size = Image.fromarray(np.random.default_rng(9).integers(0, 256, (64, 90, 3), dtype=np.uint8))
    b = prepare_image(same_size, 16, max_soft_tokens=BUDGET)
    assert a.n_tokens == b.n_tokens and a.digest != b.digest
    canvas = torch.randint(5, 480, (16,), generator=torch.Generator().manual_seed(0))

    def turn(conv, cached):
        ids, slots = conv.prompt()
        spans = _spans(tower, slots)
        fresh = model.denoise(model.encode(torch.tensor(ids), spans), canvas)
        reused = model.denoise(cached.encode(torch.tensor(ids), spans), canvas)
        return (fresh - reused).abs().max().item(), len(ids)

    cached = PrefixCachedModel(model, checkpoint_id=tok.token_to_id("<|turn>"))
    conv = Conversation(ChatTemplate(tok.chat_template), tok)
    conv.add_user("What is this?", images=[a])
    assert turn(conv, cached)[0] < 1e-5
    conv.add_reply("A thing.")
    conv.add_user("And now?")
    before = cached.encoded_tokens
    diff, n = turn(conv, cached)
    assert diff < 1e-5
    assert cached.reused_tokens > a.n_tokens and cached.encoded_tokens - before < n - a.n_tokens

    # the same history with another image in its place: nothing from the image on is reused
    other = Conversation(ChatTemplate(tok.chat_template), tok)
    other.add_user("What is this?", images=[b])
    other.add_reply("A thing.")
    other.add_user("And now?")
    assert other.prompt()[0] == conv.prompt()[0]         # the same ids: only the image differs
    reused_before = cached.reused_tokens
    diff, _ = turn(other, cached)
    assert diff < 1e-5
    start = conv.prompt()[1][0][0]
    assert cached.reused_tokens - reused_before <= start      # at most the text before it


def test_openai_parts_render_like_the_cli_prompt(tiny):
    """What a server would do with an OpenAI message (text and image_url parts) gives the ids of
    the same prompt given with <__media__> markers."""
    import base64
    from diffcli.media.dataurl import content_parts
    tok, paths = tiny
    url = "data:image/png;base64," + base64.b64encode(paths[0].read_bytes()).decode()
    api = Conversation(ChatTemplate(tok.chat_template), tok)
    api.messages.append({"role": "user", "content": content_parts(
        [{"type": "text", "text": "Look at"}, {"type": "image_url", "image_url": {"url": url}},
         {"type": "text", "text": "now."}], 16, max_soft_tokens=BUDGET)})
    cli = Conversation(ChatTemplate(tok.chat_template), tok)
    cli.add_user("Look at<__media__>now.", images=[prepare_image(paths[0], 16, max_soft_tokens=BUDGET)])
    assert api.prompt()[0] == cli.prompt()[0]
    assert [s for s, _ in api.prompt()[1]] == [s for s, _ in cli.prompt()[1]]
