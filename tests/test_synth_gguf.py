"""scripts/synth_gguf.py: the full-shape plan matches spec §A.4's inventory, and a tiny file loads
through diffcli.load and runs a denoising step."""
import collections
import importlib.util
import pathlib
import sys

import numpy as np
import torch
from gguf import GGUFReader

_spec = importlib.util.spec_from_file_location(
    "synth_gguf", pathlib.Path(__file__).resolve().parents[1] / "scripts" / "synth_gguf.py")
synth = importlib.util.module_from_spec(_spec)
sys.modules["synth_gguf"] = synth          # dataclasses look their module up while executing it
_spec.loader.exec_module(synth)


def test_full_plan_matches_spec_inventory():
    plan = synth.tensor_plan(synth.Dims(), "Q4_K_M")
    counts = collections.Counter(t for _, _, t in plan)
    # spec §A.4: 692 tensors; f32 423, q5_0 33, q8_0 28, q4_K 194, q6_K 14; ~16.8 GB
    assert len(plan) == 692 and len({n for n, _, _ in plan}) == 692
    assert counts == {"F32": 423, "Q5_0": 33, "Q8_0": 28, "Q4_K": 194, "Q6_K": 14}
    assert abs(sum(synth.nbytes(s, t) for _, s, t in plan) / 1e9 - 16.79) < 0.02
    q8 = synth.tensor_plan(synth.Dims(), "Q8_0")
    # spec §A.4: token_embd Q8_0 is 0x2EC00000 bytes; the Q8_0 file is ~26.88 GB
    assert dict((n, synth.nbytes(s, t)) for n, s, t in q8)["token_embd.weight"] == 0x2EC00000
    assert abs(sum(synth.nbytes(s, t) for _, s, t in q8) / 1e9 - 26.86) < 0.05
    shapes = {n: s for n, s, _ in plan}
    assert shapes["blk.5.attn_q.weight"] == (8192, 2816) and "blk.5.attn_v.weight" not in shapes
    assert shapes["blk.0.ffn_gate_up_exps.weight"] == (128, 1408, 2816)
    assert shapes["blk.0.ffn_down_exps.weight"] == (128, 2816, 704)


def test_tiny_file_loads_and_denoises(tmp_path):
    import diffcli
    path = str(tmp_path / "tiny.gguf")
    synth.synthesize(path, "Q4_K_M", tiny=True, log=lambda *_: None)
    reader = GGUFReader(path)
    plan = synth.tensor_plan(synth.TINY, "Q4_K_M")
    got = {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name) for t in reader.tensors}
    assert got == {n: (s, q) for n, s, q in plan}
    model = diffcli.load(path)
    cache = model.encode(torch.arange(5, 21))
    logits = model.denoise(cache, torch.full((synth.TINY.canvas,), 4))
    assert logits.shape == (synth.TINY.canvas, synth.TINY.V)
    assert torch.isfinite(logits).all() and logits.std() > 0
    rope = np.asarray(reader.get_tensor(2).data) if reader.tensors[2].name == "rope_freqs.weight" else None
    assert rope is not None and (rope == 1.0).sum() == synth.TINY.hd * 0.25 // 2
