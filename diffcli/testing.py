"""Tiny DiffusionGemma fixtures for tests, benchmarks and scripts (spec §G). Not used by the runtime.

Two ways to a tiny GGUF:
- `make_tiny_gguf`: build the transformers 5.23.0 model (the oracle), save it as an HF checkpoint,
  convert it with `diffcli.convert`; returns the path and the HF model to compare against.
- `make_random_gguf`: random weights under the HF names, written straight through the converter's
  writer; needs no transformers (README demo, benchmarks with bigger shapes).

Both carry a toy Gemma-4-style vocabulary (`toy_tokenizer`): ids 0..4 `<pad> <eos> <bos> <unk>
<mask>`, the Gemma-4 turn/channel/tool markers, 256 byte tokens, newline runs, then characters and
BPE merges learned here from a small English text. transformers is imported inside functions only.
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

SPACE = "\u2581"
BASE_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
GEMMA4_SPECIALS = ["<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>",
                   "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']
NEWLINE_RUNS = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]
# Gemma 4's image markers (begin, end, soft-token placeholder), at the ids tiny_config_dict gives
# boi / eoi / image: vocab_size - 12, - 11, - 10.
IMAGE_MARKERS = ["<|image>", "<image|>", "<|image|>"]
IMAGE_MARKER_OFFSET = 12

_TEXT = """\
The sky is blue because the air scatters the short blue light of the sun more than the red light.
When the sun is low, the light passes through more air, and the sky turns red and orange.
A model that writes text in parallel starts from noise and refines every token of the canvas at
each step, then commits the canvas and moves on to the next one. This is how the diffusion model
thinks: it looks at the whole answer at once, and it changes its mind until the answer is stable.
Hello there! How are you today? I am fine, thank you. What is the time? It is ten to nine.
The quick brown fox jumps over the lazy dog, and the dog does not mind at all.
Numbers such as 1, 2, 3, 10, 42 and 2026 appear in text, and so do words like model, token, layer,
expert, router, attention, window and cache. Why is the sea blue? For the same reason as the sky,
and because water absorbs the red light. Write a short poem about the sea and the sky and the sun.
Once upon a time there was a little robot who wanted to learn how to paint. Every morning the robot
went to the window, looked at the garden and tried to paint the flowers, the trees and the birds.
The first paintings were not very good, but the robot did not give up. It painted again and again,
and after many days the flowers looked like flowers and the birds looked like birds.
Question: what is the capital of France? Answer: the capital of France is Paris.
Question: how many legs does a spider have? Answer: a spider has eight legs.
def add(a, b):
    return a + b

print(add(2, 3))
Thinking step by step helps: first read the question, then plan the answer, then write it down.
The weather today is sunny with a light wind from the west, and tomorrow there will be some rain.
"""

_CHAT_TEMPLATE = """\
{%- macro strip_thinking(text) -%}
{%- set ns = namespace(out='') -%}
{%- for part in text.split('<channel|>') -%}
{%- if '<|channel>' in part -%}{%- set ns.out = ns.out + part.split('<|channel>')[0] -%}
{%- else -%}{%- set ns.out = ns.out + part -%}{%- endif -%}
{%- endfor -%}
{{- ns.out | trim -}}
{%- endmacro -%}
{{- bos_token -}}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set sys_first = messages | length > 0 and messages[0]['role'] in ['system', 'developer'] -%}
{%- if thinking or sys_first or tools -%}
{{- '<|turn>system\\n' -}}
{%- if thinking -%}{{- '<|think|>' -}}{%- endif -%}
{%- if sys_first -%}{{- messages[0]['content'] | trim -}}{%- endif -%}
{%- if tools -%}{%- for t in tools -%}{{- '<|tool>declaration:' + (t | tojson) + '<tool|>' -}}{%- endfor -%}{%- endif -%}
{{- '<turn|>\\n' -}}
{%- endif -%}
{%- for m in messages -%}
{%- if not (loop.first and sys_first) -%}
{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}
{{- '<|turn>' + role + '\\n' -}}
{%- if m['content'] is string -%}
{%- if role == 'model' -%}{{- strip_thinking(m['content']) -}}{%- else -%}{{- m['content'] | trim -}}{%- endif -%}
{%- else -%}
{%- for item in m['content'] -%}
{%- if item['type'] == 'text' -%}
{%- if role == 'model' -%}{{- strip_thinking(item['text']) -}}{%- else -%}{{- item['text'] | trim -}}{%- endif -%}
{%- elif item['type'] == 'image' -%}{{- '\\n\\n<|image|>\\n\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<turn|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|turn>model\\n' -}}
{%- if not thinking -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""


def toy_chat_template() -> str:
    """A Gemma-4-shaped chat template written for the toy vocabulary (spec §D.3 structure); list
    contents render as Gemma 4's does (text items trimmed, an image item as `\\n\\n<|image|>\\n\\n`)."""
    return _CHAT_TEMPLATE


# ---------------------------------------------------------------------------------------------
# Toy vocabulary

def _learn_merges(text: str, budget: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Characters (most frequent first) and up to `budget - len(chars)` greedy BPE merges over the
    words of `text` (a word = optional `▁` plus non-space characters; newlines are never merged
    with anything else, as llama.cpp's gemma4 pre-tokenizer splits on them)."""
    import re
    words = Counter(tuple(w) for line in text.replace(" ", SPACE).split("\n")
                    for w in re.findall(f"{SPACE}?[^{SPACE}]+|{SPACE}", line))
    chars = [c for c, _ in sorted(Counter(c for w, n in words.items() for c in w for _ in range(n))
                                  .items(), key=lambda kv: (-kv[1], kv[0]))]
    merges: list[tuple[str, str]] = []
    while len(chars) + len(merges) < budget:
        pairs: Counter = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        merges.append((a, b))
        new = Counter()
        for w, n in words.items():
            out, k = [], 0
            while k < len(w):
                if k + 1 < len(w) and w[k] == a and w[k + 1] == b:
                    out.append(a + b)
                    k += 2
                else:
                    out.append(w[k])
                    k += 1
            new[tuple(out)] += n
        words = new
    return chars, merges


def toy_vocab(vocab_size: int = 512) -> tuple[list[str], list[str]]:
    """(tokens by id, merges "left right") of the toy vocabulary; ids past what the text can teach are
    filled with unreachable `<unused{k}>` pieces so any `vocab_size` works. The image markers sit at
    vocab_size - 12 .. - 10 (the tiny config's boi / eoi / image ids) when the vocabulary has room."""
    tokens = BASE_SPECIALS + GEMMA4_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + NEWLINE_RUNS
    if vocab_size < len(tokens) + 1:
        raise ValueError(f"vocab_size must be at least {len(tokens) + 1}")
    markers_at = vocab_size - IMAGE_MARKER_OFFSET
    if markers_at <= len(tokens):
        markers_at = None
    merges = [("\n", "\n"), ("\n\n", "\n"), ("\n\n", "\n\n")]
    chars, learned = _learn_merges(_TEXT, vocab_size - len(tokens))
    seen = set(tokens)

    def room() -> int:          # ids left for learned pieces (the markers' three are kept)
        pending = len(IMAGE_MARKERS) if markers_at is not None and len(tokens) <= markers_at else 0
        return vocab_size - len(tokens) - pending

    def push(t: str) -> None:
        if len(tokens) == markers_at:
            tokens.extend(IMAGE_MARKERS)
        tokens.append(t)
        seen.add(t)

    for c in chars:
        if c not in seen and room() > 0:
            push(c)
    for a, b in learned:
        if room() <= 0:
            break
        if a + b not in seen:
            push(a + b)
        merges.append((a, b))
    k = 0
    while room() > 0:
        push(f"<unused{k}>")
        k += 1
    if len(tokens) == markers_at:
        tokens.extend(IMAGE_MARKERS)
    return tokens, [f"{a} {b}" for a, b in merges]


def toy_tokenizer(vocab_size: int = 512):
    """The toy vocabulary as an HF `tokenizers.Tokenizer` configured like Gemma 4's (spec §D.1)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tokens, merges = toy_vocab(vocab_size)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab, [tuple(m.split(" ")) for m in merges], unk_token="<unk>",
                        byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in BASE_SPECIALS + GEMMA4_SPECIALS + IMAGE_MARKERS if t in vocab])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    return tok


def toy_tokenizer_files(out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    toy_tokenizer(vocab_size).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
        "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096,
    }, indent=2))
    (out_dir / "chat_template.jinja").write_text(_CHAT_TEMPLATE)
    return out_dir


def toy_gguf_vocab(vocab_size: int = 512):
    """The toy vocabulary as the converter's `Vocab` (what `convert` would read from the files)."""
    from .gguf.convert_vocab import vocab_from_tokenizer_json
    tok = json.loads(toy_tokenizer(vocab_size).to_str())
    return vocab_from_tokenizer_json(tok, vocab_size, _CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------
# Tiny configs

def tiny_config_dict(variant: str = "h64", **overrides: Any) -> dict:
    """config.json-shaped dict of the tiny model (spec §G.1). `variant` "h96" makes sqrt(H) inexact;
    "h256" gives rows of 256 so q4_k_m really uses Q4_K/Q6_K. Overrides are text-config fields, plus
    `canvas_length`; `global_head_dim` / `num_global_key_value_heads` set the full layers."""
    hidden = {"h64": 64, "h96": 96, "h256": 256}[variant]
    text = dict(vocab_size=512, hidden_size=hidden, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                num_global_key_value_heads=1, sliding_window=8, num_experts=8, top_k_experts=2,
                moe_intermediate_size=32, use_bidirectional_attention="vision",
                max_position_embeddings=4096, rms_norm_eps=1e-6,
                pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if variant == "h256":
        text.update(intermediate_size=256, head_dim=64, global_head_dim=64, moe_intermediate_size=256)
    canvas = overrides.pop("canvas_length", 16)
    text.update(overrides)
    if "layer_types" not in overrides:
        n = text["num_hidden_layers"]
        text["layer_types"] = ["full_attention" if i % 2 or i == n - 1 else "sliding_attention"
                               for i in range(n)]
    v = text["vocab_size"]
    return {"model_type": "diffusion_gemma", "text_config": text, "canvas_length": canvas,
            "boi_token_id": v - 12, "eoi_token_id": v - 11, "image_token_id": v - 10}


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16)


def tiny_hf_config(variant: str = "h64", vision: dict | None = None, **overrides: Any):
    """The tiny `DiffusionGemmaConfig` (eager attention) of spec §G.2; `vision` overrides fields
    of the tiny Gemma4VisionConfig (e.g. num_hidden_layers=2, standardize=True,
    use_clipped_linears=True, patch_size=8)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaTextConfig
    from transformers.models.gemma4 import Gemma4VisionConfig

    d = tiny_config_dict(variant, **overrides)
    text = DiffusionGemmaTextConfig(**d["text_config"])
    vision = Gemma4VisionConfig(**{**TINY_VISION, **(vision or {})})
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=d["canvas_length"],
                               boi_token_id=d["boi_token_id"], eoi_token_id=d["eoi_token_id"],
                               image_token_id=d["image_token_id"])
    cfg._attn_implementation = "eager"
    return cfg


def _ones_like_random(shape, rng: np.random.Generator) -> np.ndarray:
    """Replacement for a parameter that initialises to 1: random, positive, away from 1."""
    return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)


def decoder_scalar(i: int) -> float:
    return 0.9 + 0.05 * i


def encoder_scalar(i: int) -> float:
    return 1.1 - 0.05 * i


def build_tiny_hf_model(seed: int = 0, variant: str = "h64", vision: dict | None = None,
                        **overrides: Any):
    """transformers `DiffusionGemmaForBlockDiffusion`, fp32, eval mode, with every parameter that
    initialises to 1 randomised and different encoder/decoder layer scalars (spec §G.1). The vision
    tower's norms, position tables and standardisation are randomised too (they initialise to 1 or
    0), and clipped linears get finite bounds that clip (they initialise to +-inf)."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(tiny_hf_config(variant, vision, **overrides)).float().eval()
    rng = np.random.default_rng(seed + 1)
    with torch.no_grad():
        # named_parameters() lists each shared tensor once, so encoder and decoder stay tied
        for name, p in model.named_parameters():
            if "vision" in name:
                continue
            if p.dim() == 1:   # text model: every 1-D parameter is a norm weight or a router scale
                p.copy_(torch.from_numpy(_ones_like_random(tuple(p.shape), rng)))
        for i, layer in enumerate(model.model.decoder.layers):
            layer.layer_scalar.fill_(decoder_scalar(i))
        for i, layer in enumerate(model.model.encoder.language_model.layers):
            layer.layer_scalar.fill_(encoder_scalar(i))
        _randomise_vision(model, np.random.default_rng(seed + 2))
    return model


# finite bounds of the clipped linears: inputs are RMS-normed (|x| ~ 1), outputs small (|y| ~ 0.1)
CLIP_BOUNDS = {"input_min": -1.0, "input_max": 1.0, "output_min": -0.08, "output_max": 0.08}


def _randomise_vision(model, rng: np.random.Generator) -> None:
    import torch
    for name, p in model.named_parameters():
        if "vision" not in name:
            continue
        if name.endswith("position_embedding_table"):
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape), dtype=np.float32) * 0.5))
        elif p.dim() == 1:      # the tower's norm weights
            p.copy_(torch.from_numpy(_ones_like_random(tuple(p.shape), rng)))
    for name, b in model.named_buffers():
        if "vision" not in name:
            continue
        kind = name.rsplit(".", 1)[-1]
        if kind == "std_bias":
            b.copy_(torch.from_numpy(rng.standard_normal(tuple(b.shape), dtype=np.float32) * 0.3))
        elif kind == "std_scale":
            b.copy_(torch.from_numpy(_ones_like_random(tuple(b.shape), rng)))
        elif kind in CLIP_BOUNDS:
            b.fill_(CLIP_BOUNDS[kind])


def save_tiny_checkpoint(model, out_dir: str | Path, tokenizer: bool = True) -> Path:
    """save_pretrained directory (config.json, generation_config.json, model.safetensors) plus the toy
    tokenizer files sized to the model's vocabulary."""
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    if tokenizer:
        toy_tokenizer_files(out_dir, model.config.text_config.vocab_size)
    return out_dir


def make_tiny_gguf(path: str | Path, outtype: str = "f32", seed: int = 0, variant: str = "h64",
                   mmproj: str | Path | None = None, mmproj_outtype: str = "f32",
                   vision: dict | None = None, **overrides: Any):
    """Build the tiny HF model, save it, convert it to `path` (and its vision tower to `mmproj`
    when given); returns (path, hf_model)."""
    from .gguf.convert import convert
    from .gguf.mmproj import convert_mmproj

    model = build_tiny_hf_model(seed=seed, variant=variant, vision=vision, **overrides)
    with tempfile.TemporaryDirectory(prefix="diffcli-tiny-") as tmp:
        save_tiny_checkpoint(model, tmp)
        out = convert(tmp, path, outtype, overwrite=True, name="tiny-diffusion-gemma")
        if mmproj is not None:
            convert_mmproj(tmp, mmproj, mmproj_outtype, overwrite=True, name="tiny-diffusion-gemma")
    return out, model


# ---------------------------------------------------------------------------------------------
# Random weights without transformers

def random_state_dict(config: dict, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """Random float32 weights under the HF names and shapes the converter expects for `config`."""
    from .gguf.convert import HParams, hf_shapes

    hp = HParams.from_hf(config)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in hf_shapes(hp).items():
        if name.endswith("layer_scalar"):
            i = int(name.split(".layers.")[1].split(".")[0])
            val = encoder_scalar(i) if ".encoder." in name else decoder_scalar(i)
            out[name] = np.full(shape, val, np.float32)
        elif len(shape) == 1:
            out[name] = _ones_like_random(shape, rng)
        else:
            out[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))
    return out


def make_random_gguf(path: str | Path, config_overrides: dict | None = None, outtype: str = "f32",
                     seed: int = 0, variant: str = "h64") -> Path:
    """A diffusion-gemma GGUF with random weights and the toy vocabulary; no transformers needed.
    `config_overrides` are `tiny_config_dict` overrides (e.g. hidden_size=512, num_hidden_layers=8,
    num_experts=16, top_k_experts=4, vocab_size=32000)."""
    from .gguf.convert import HParams, write_gguf

    config = tiny_config_dict(variant, **dict(config_overrides or {}))
    hp = HParams.from_hf(config)
    weights = random_state_dict(config, seed)
    return write_gguf(path, hp, weights.__getitem__, toy_gguf_vocab(hp.vocab_size), outtype,
                      name="random-diffusion-gemma", overwrite=True)


def make_random_mmproj(path: str | Path, text_hidden: int = 64, outtype: str = "f32",
                       seed: int = 0) -> Path:
    """A Gemma 4 vision mmproj with random weights shaped like TINY_VISION, projecting to
    `text_hidden` (the text model's hidden size); no transformers needed."""
    from .gguf.mmproj import VisionHParams, tensor_plan, write_mmproj

    v = TINY_VISION
    hp = VisionHParams(n_layer=v["num_hidden_layers"], hidden=v["hidden_size"],
                       ff=v["intermediate_size"], n_head=v["num_attention_heads"],
                       head_dim=v["head_dim"], patch_size=16, n_pos=10240, text_hidden=text_hidden)
    rng = np.random.default_rng(seed)
    weights = {}
    for _, name, shape in tensor_plan(hp):
        if name.endswith("position_embedding_table"):
            weights[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.5)
        elif len(shape) == 1:
            weights[name] = _ones_like_random(shape, rng)
        else:
            weights[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    return write_mmproj(path, hp, weights.__getitem__, outtype, name="random-vision", overwrite=True)

