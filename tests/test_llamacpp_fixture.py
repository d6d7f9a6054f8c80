"""Files written by llama.cpp's own converter (issue 13, item 22): `../shared/fixtures/llamacpp-tiny`
next to the repository holds a transformers checkpoint (`hf/`) and its conversion by
`convert_hf_to_gguf.py` of llama.cpp PR #24423 to F32 and Q8_0 (see the fixture's README). diffcli
must load both and match transformers within spec §G.4's 1e-4 in float32: the F32 file against
the checkpoint itself, the Q8_0 file against the checkpoint given the weights exactly as that file
stores them (dequantized by gguf-py), so the only difference left is the arithmetic.

Skipped where the fixture is absent (a user's clone). The files are only read, from a copy in
tmp_path; nothing of them enters the repository.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import diffcli
from diffcli.compute.backend import set_backend

from _spec_names import gguf_name_for

FIXTURE = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "llamacpp-tiny"
pytestmark = pytest.mark.skipif(not (FIXTURE / "hf" / "config.json").is_file(),
                                reason=f"no llama.cpp fixture at {FIXTURE}")

TOL = 1e-4                       # max |Δlogit| in float32 (spec §G.4)
PROMPT = torch.tensor([2] + list(range(10, 30)))     # 21 tokens > sliding window 8
FILES = {"f32": ("llamacpp-f32.gguf", "F32"), "q8_0": ("llamacpp-q8_0.gguf", "Q8_0")}


@pytest.fixture(scope="module")
def fixture_copy(tmp_path_factory):
    out = tmp_path_factory.mktemp("llamacpp-tiny")
    for name, _ in FILES.values():
        shutil.copyfile(FIXTURE / name, out / name)
    shutil.copytree(FIXTURE / "hf", out / "hf")
    return out


@pytest.fixture(scope="module")
def hf_model(fixture_copy):
    """The checkpoint in transformers, float32 (read from the local copy; nothing is fetched)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import DiffusionGemmaForBlockDiffusion
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(fixture_copy / "hf"),
                                                            dtype=torch.float32)
    return model.float().eval()


def _with_file_weights(hf, path):
    """The HF model given the weights exactly as the GGUF stores them, dequantized by gguf-py."""
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
              for t in reader.tensors}
    with torch.no_grad():
        for name, p in hf.model.decoder.named_parameters():
            p.copy_(stored[gguf_name_for(f"model.decoder.{name}")].reshape(p.shape))
    return hf


def _canvas(seed, n=16, vocab=768):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab - 16, (n,), generator=g)


def _reference(hf):
    """transformers: prefill + a step, a self-conditioned step, a commit, then a step."""
    canvas, block, after = _canvas(1), _canvas(2), _canvas(3)
    with torch.no_grad():
        out = hf(input_ids=PROMPT[None], decoder_input_ids=canvas[None])
        pkv, first = out.past_key_values, out.logits[0]
        sc = hf(past_key_values=pkv, decoder_input_ids=canvas[None],
                self_conditioning_logits=(first / 0.8)[None]).logits[0]
        hf.model.encoder(input_ids=block[None], past_key_values=pkv)
        last = hf(past_key_values=pkv, decoder_input_ids=after[None]).logits[0]
    return {"step 1": first, "step 2 (SC)": sc, "after commit": last}


def _ours(model):
    canvas, block, after = _canvas(1), _canvas(2), _canvas(3)
    cache = model.encode(PROMPT)
    first = model.denoise(cache, canvas)
    sc = model.denoise(cache, canvas, first / 0.8)
    model.commit(cache, block)
    return {"step 1": first, "step 2 (SC)": sc, "after commit": model.denoise(cache, after)}


@pytest.fixture
def backends():
    from diffcli.compute import native
    yield ["torch"] + (["native"] if native.available() else [])
    set_backend(None)


@pytest.mark.parametrize("which", sorted(FILES))
def test_llamacpp_file_matches_transformers(fixture_copy, hf_model, backends, which):
    name, qtype = FILES[which]
    path = fixture_copy / name
    hf = copy.deepcopy(hf_model)
    if qtype != "F32":
        _with_file_weights(hf, path)
    want = _reference(hf)
    model = diffcli.load(path, dtype=torch.float32)
    assert model.w.layers[0].wq.qtype == qtype
    assert model.config.n_layer == hf.config.text_config.num_hidden_layers
    for b in backends:
        set_backend(b)
        for label, got in _ours(model).items():
            assert got.shape == want[label].shape
            err = (got - want[label]).abs().max().item()
            assert err <= TOL, f"{which} backend {b} {label}: max |Δlogit| = {err:.2e}"


@pytest.mark.parametrize("which", sorted(FILES))
def test_llamacpp_file_tokenizes_as_the_checkpoint(fixture_copy, which):
    from tokenizers import Tokenizer as HFTokenizer
    ours = diffcli.Tokenizer.from_gguf(fixture_copy / FILES[which][0])
    theirs = HFTokenizer.from_file(str(fixture_copy / "hf" / "tokenizer.json"))
    for text in ["Hello world", "Why is the sky blue?\n", "  spaces,\ttabs and 123 digits ü"]:
        want = theirs.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_bos=False) == want, text
