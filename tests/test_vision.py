"""The vision tower and image prompts against transformers 5.23.0 (spec §G with a vision tower):
tiny DiffusionGemma models built in transformers, their text model and vision tower converted
(text GGUF + mmproj), images made here with Pillow.

Oracles: `DiffusionGemmaEncoderModel.get_image_features(...).pooler_output` for the soft tokens;
for prompts with images, the HF model run with the encoder masks `generate` builds from
`mm_token_type_ids` (bidirectional inside image blocks); `generate(pixel_values=...)` for tokens.
Note: transformers' plain `forward` builds those masks and drops them (its encoder is causal over
images unless the mask mapping is passed in), so the logits oracle passes the mapping itself, as
`generate` does; a test below shows the two differ.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import diffcli
from diffcli.gguf import mmproj as fmt
from diffcli.media.image import prepare_image
from diffcli.model.images import ImageSpan
from diffcli.model.vision import load_vision

TOL = 1e-4            # max |difference| in float32 (spec §G.4)
BUDGET = 70           # soft-token budget per image (the processor's smallest)
VARIANTS = {
    "plain": None,     # the spec's tiny tower: 1 layer, no standardisation, no clipping
    "clipped": dict(num_hidden_layers=2, standardize=True, use_clipped_linears=True),
}


def _images(d):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(75, 100), (300, 96)]):
        yy, xx = np.mgrid[0:h, 0:w]
        px = np.stack([xx * 255 // w, yy * 255 // h, rng.integers(0, 256, (h, w))], -1)
        paths.append(d / f"img{i}.png")
        Image.fromarray(px.astype(np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    from diffcli.testing import make_tiny_gguf
    d = tmp_path_factory.mktemp(f"vision_{request.param}")
    text, hf = make_tiny_gguf(d / "tiny.gguf", mmproj=d / "mm.gguf", vision=VARIANTS[request.param])
    model = diffcli.load(text, dtype=torch.float32)
    tower = load_vision(d / "mm.gguf", dtype=torch.float32)
    return model, tower, hf.eval(), _images(d), request.param


def hf_pixels(paths, patch=16):
    """pixel_values / image_position_ids / soft-token counts from transformers' own processor."""
    from transformers.image_utils import load_image
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    out = Gemma4ImageProcessorPil(patch_size=patch, max_soft_tokens=BUDGET)(
        [load_image(str(p)) for p in paths], return_tensors="pt")
    return out["pixel_values"], out["image_position_ids"], [int(n) for n in out["num_soft_tokens_per_image"]]


def hf_features(hf, paths):
    pv, pos, _ = hf_pixels(paths)
    with torch.no_grad():
        return hf.model.encoder.get_image_features(pv, pos).pooler_output


def ours_features(tower, paths):
    out = []
    for p in paths:
        img = prepare_image(p, tower.config.patch_size, max_soft_tokens=BUDGET)
        out.append(tower.embed(torch.from_numpy(img.pixels), img.grid))
    return out


def test_soft_tokens_match_transformers(pair):
    model, tower, hf, paths, _ = pair
    ref = hf_features(hf, paths)                      # [S1 + S2, E], images in order
    got = torch.cat(ours_features(tower, paths))
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < TOL
    assert ref.abs().max().item() > 0.05              # not a comparison of zeros


def test_clipping_and_standardisation_are_live(pair):
    """Negative control: the clamps and the standardisation change the result, so the
    comparison above would notice them being skipped."""
    model, tower, hf, paths, variant = pair
    if variant != "clipped":
        pytest.skip("the plain tower has neither")
    ref = hf_features(hf, paths[:1])
    saved = [dict(lw.clamps) for lw in tower.layers], tower.std
    try:
        for lw in tower.layers:
            lw.clamps.clear()
        assert (ours_features(tower, paths[:1])[0] - ref).abs().max().item() > 1e-3
        for lw, c in zip(tower.layers, saved[0]):
            lw.clamps.update(c)
        tower.std = None
        assert (ours_features(tower, paths[:1])[0] - ref).abs().max().item() > 1e-3
    finally:
        for lw, c in zip(tower.layers, saved[0]):
            lw.clamps.clear()
            lw.clamps.update(c)
        tower.std = saved[1]


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_quantized_mmproj_equals_transformers_on_the_stored_weights(tmp_path, outtype):
    """A quantized mmproj runs the tower on its stored weights: transformers given the same
    (dequantized) weights agrees within the float32 bound."""
    from diffcli.gguf.reader import open_gguf
    from diffcli.testing import build_tiny_hf_model, save_tiny_checkpoint
    hf = build_tiny_hf_model(vision=VARIANTS["clipped"])
    save_tiny_checkpoint(hf, tmp_path / "hf")
    path = fmt.convert_mmproj(tmp_path / "hf", tmp_path / "mm.gguf", outtype)
    f = open_gguf(path)
    state = hf.state_dict()
    hp = fmt.VisionHParams.from_hf(hf.config.to_dict())
    with torch.no_grad():
        for gname, hf_name, shape in fmt.tensor_plan(hp):
            stored = f.tensor(gname).dequantize(torch.float32)
            if gname == "v.patch_embd.weight":
                stored = fmt.patch_kernel_to_linear(stored)
            state[hf_name].copy_(stored.reshape(shape))
    assert sorted({f.info(g).qtype for g in f.tensor_names}) != ["F32"]
    paths = _images(tmp_path)
    tower = load_vision(path, dtype=torch.float32)
    got = torch.cat(ours_features(tower, paths))
    assert (got - hf_features(hf, paths)).abs().max().item() < TOL


# ---- prompts with images ----------------------------------------------------------------------

def prompt_with_images(cfg, counts, text=((20, 21, 22), (30, 31), (40, 41, 42))):
    """[bos] text0 [boi img*n0 eoi] text1 [boi img*n1 eoi] text2 ... and the spans' starts."""
    ids, starts = [2, *text[0]], []
    for k, n in enumerate(counts):
        ids.append(cfg.boi_token_id)
        starts.append(len(ids))
        ids += [cfg.image_token_id] * n + [cfg.eoi_token_id, *text[k + 1]]
    return torch.tensor(ids), starts


def hf_masks(hf, ids):
    from transformers import DynamicCache
    cfg = hf.config
    cache = DynamicCache(config=cfg.get_text_config(decoder=True))
    masks = hf.model.encoder.create_masks_for_generate(
        config=cfg, inputs_embeds=torch.empty((1, ids.numel(), 0)),
        attention_mask=torch.ones((1, ids.numel()), dtype=torch.bool), past_key_values=cache,
        position_ids=torch.arange(ids.numel())[None],
        mm_token_type_ids=(ids == cfg.image_token_id).long()[None])
    return masks, cache


@pytest.mark.parametrize("chunk", [1024, 16, 5])
def test_logits_with_images_match_transformers(pair, chunk):
    """Prefill with two images (each block longer than the sliding window of 8) and two
    denoising steps (the second with self-conditioning). Prefill chunks of 16 and 5 put chunk
    boundaries inside image blocks, which must move."""
    model, tower, hf, paths, _ = pair
    pv, pos, counts = hf_pixels(paths)
    ids, starts = prompt_with_images(hf.config, counts)
    feats = ours_features(tower, paths)
    spans = [ImageSpan(s, e) for s, e in zip(starts, feats)]
    canvas = torch.randint(5, 490, (16,), generator=torch.Generator().manual_seed(1))
    masks, cache = hf_masks(hf, ids)
    with torch.no_grad():
        ref1 = hf(input_ids=ids[None], pixel_values=pv, image_position_ids=pos, attention_mask=masks,
                  past_key_values=cache, decoder_input_ids=canvas[None])
        ref2 = hf(past_key_values=ref1.past_key_values, decoder_input_ids=canvas[None],
                  self_conditioning_logits=ref1.logits / 0.8)
    model.prefill_chunk = chunk
    try:
        kv = model.encode(ids, spans)
        got1 = model.denoise(kv, canvas)
        got2 = model.denoise(kv, canvas, got1 / 0.8)
    finally:
        model.prefill_chunk = 1024
    assert (got1 - ref1.logits[0]).abs().max().item() < TOL
    assert (got2 - ref2.logits[0]).abs().max().item() < TOL


def test_image_attention_is_bidirectional_not_causal(pair):
    """Negative control: transformers' plain forward (causal over the image, see the module
    docstring) gives other logits; so does leaving the image out. The 1e-4 agreement above
    therefore pins the image placement and the block mask."""
    model, tower, hf, paths, _ = pair
    pv, pos, counts = hf_pixels(paths[:1])
    ids, starts = prompt_with_images(hf.config, counts)
    canvas = torch.randint(5, 490, (16,), generator=torch.Generator().manual_seed(2))
    spans = [ImageSpan(starts[0], ours_features(tower, paths[:1])[0])]
    got = model.denoise(model.encode(ids, spans), canvas)
    with torch.no_grad():
        causal = hf(input_ids=ids[None], pixel_values=pv, image_position_ids=pos,
                    decoder_input_ids=canvas[None]).logits[0]
    assert (got - causal).abs().max().item() > 1e-3
    assert (got - model.denoise(model.encode(ids), canvas)).abs().max().item() > 1e-3


@pytest.mark.slow
def test_generate_with_images_token_identical_to_transformers(pair):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig
    from diffcli.generation.sampler import SamplerConfig
    model, tower, hf, paths, variant = pair
    pv, pos, counts = hf_pixels(paths)
    ids, starts = prompt_with_images(hf.config, counts)
    spans = [ImageSpan(s, e) for s, e in zip(starts, ours_features(tower, paths))]
    seed, steps = (7, 8) if variant == "plain" else (3, 4)
    torch.manual_seed(seed)
    ref = hf.generate(ids[None], pixel_values=pv, image_position_ids=pos,
                      mm_token_type_ids=(ids == hf.config.image_token_id).long()[None],
                      sampler_config=EntropyBoundSamplerConfig(0.1), max_new_tokens=48,
                      max_denoising_steps=steps, eos_token_id=[1], pad_token_id=0)
    want = ref.sequences[0, ids.numel():].tolist()
    sampler = SamplerConfig(max_steps=steps, stability=1, confidence=0.005, entropy_bound=0.1)
    run = dict(images=spans, max_new_tokens=48, sampler=sampler, seed=seed, mode="hf", eog_ids=[1])
    assert diffcli.generate(model, ids, **run).tokens == want
    if variant == "plain":      # the uncached path re-encodes the images every step
        assert diffcli.generate(model, ids, kv_cache=False, **run).tokens == want


def test_bad_spans_are_refused(pair):
    model, tower, hf, paths, _ = pair
    ids = torch.tensor([2] + [hf.config.image_token_id] * 10)
    e = torch.zeros(6, model.config.n_embd)
    with pytest.raises(ValueError, match="overlaps"):
        model.encode(ids, [ImageSpan(1, e), ImageSpan(4, e)])
    with pytest.raises(ValueError, match="leaves"):
        model.encode(ids, [ImageSpan(8, e)])
    with pytest.raises(ValueError, match=r"\[n, 64\]"):
        model.encode(ids, [ImageSpan(1, torch.zeros(6, 32))])
