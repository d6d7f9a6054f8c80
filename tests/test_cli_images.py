"""`diffcli -m M --mmproj P --image A.png -p ...` and `/image` in -cnv, on a tiny model and its
vision tower converted from transformers; bad images and mismatched files are one line, exit 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from _cli_fixtures import FAST, run

IMG = ["--image-max-tokens", "70"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from diffcli.testing import make_tiny_gguf
    d = tmp_path_factory.mktemp("cli_images")
    make_tiny_gguf(d / "tiny.gguf", mmproj=d / "mm.gguf")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 256, (90, 30, 3), dtype=np.uint8)).save(d / "b.png")
    (d / "broken.png").write_bytes((d / "a.png").read_bytes()[:150])
    return d


def test_image_prompt_runs_and_matches_the_api(files):
    d = files
    res = run(["-m", d / "tiny.gguf", "--mmproj", d / "mm.gguf", "--image", d / "a.png",
               "--image", d / "b.png", *IMG, "-p", "Compare them.", "-n", "16", "-s", "5",
               "--json", "--dtype", "f32", *FAST])
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)

    import diffcli
    from diffcli.generation.sampler import SamplerConfig
    from diffcli.media.image import prepare_image
    from diffcli.model.images import ImageSpan
    from diffcli.text.chat import ChatTemplate, Conversation
    model = diffcli.load(d / "tiny.gguf", dtype=torch.float32)
    tower = diffcli.load_vision(d / "mm.gguf", dtype=torch.float32)
    tok = diffcli.Tokenizer.from_gguf(d / "tiny.gguf")
    conv = Conversation(ChatTemplate(tok.chat_template), tok)
    conv.add_user("Compare them.", images=[prepare_image(d / p, 16, max_soft_tokens=70)
                                           for p in ("a.png", "b.png")])
    ids, slots = conv.prompt()
    spans = [ImageSpan(s, tower.embed(torch.from_numpy(i.pixels), i.grid)) for s, i in slots]
    want = diffcli.generate(model, ids, images=spans, max_new_tokens=16, seed=5, mode="cli",
                            sampler=SamplerConfig.resolve(model.config, max_steps=2),
                            eog_ids=tok.eog_ids)
    assert got["prompt_tokens"] == len(ids) > 2 * 30
    assert got["tokens"] == want.tokens


def test_media_markers_place_the_images(files):
    d = files
    res = run(["-m", d / "tiny.gguf", "--mmproj", d / "mm.gguf", "--image", d / "a.png", *IMG,
               "-p", "Before <__media__> after.", "-n", "16", "--json", *FAST])
    assert res.exit_code == 0, res.stderr
    bad = run(["-m", d / "tiny.gguf", "--mmproj", d / "mm.gguf", "--image", d / "a.png", *IMG,
               "-p", "<__media__> <__media__>", "-n", "16", *FAST])
    assert bad.exit_code == 2 and "2 <__media__> markers for 1 images" in bad.stderr


def _one_line_error(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("diffcli: error: ") and "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[-1], lines[-1]


def test_bad_inputs_are_one_line_exit_2(files, tmp_path):
    d = files
    base = ["-m", d / "tiny.gguf", "-p", "Hi", "-n", "16", *FAST]
    _one_line_error(run([*base, "--image", d / "a.png"]), "--image needs", "--mmproj")
    _one_line_error(run([*base, "--mmproj", d / "mm.gguf", "--image", d / "nope.png"]),
                    "nope.png", "no such image file")
    _one_line_error(run([*base, "--mmproj", d / "mm.gguf", "--image", d / "broken.png"]),
                    "broken.png", "damaged or truncated")
    (tmp_path / "text.png").write_text("hello")
    _one_line_error(run([*base, "--mmproj", d / "mm.gguf", "--image", tmp_path / "text.png"]),
                    "text.png", "not an image")
    _one_line_error(run([*base, "--mmproj", d / "tiny.gguf", "--image", d / "a.png"]),
                    "tiny.gguf", "not an mmproj file")
    _one_line_error(run([*base, "--mmproj", d / "mm.gguf", "--image", d / "a.png",
                         "--image-max-tokens", "100"]), "--image-max-tokens")
    _one_line_error(run(["-m", d / "mm.gguf", "-p", "Hi", *FAST]), "mm.gguf", "pass it to --mmproj")


def test_an_mmproj_for_another_model_is_refused(files, tmp_path):
    from diffcli.testing import make_tiny_gguf
    make_tiny_gguf(tmp_path / "wide.gguf", variant="h96", mmproj=tmp_path / "wide-mm.gguf")
    res = run(["-m", files / "tiny.gguf", "--mmproj", tmp_path / "wide-mm.gguf", "--image",
               files / "a.png", "-p", "Hi", "-n", "16", *FAST])
    _one_line_error(res, "wide-mm.gguf", "width 96", "hidden size is 64")


def test_chat_image_command(files):
    d = files
    script = (f"/image {d / 'a.png'}\nWhat is it?\n/image {d / 'nope.png'}\n/image\n"
              f"And this one?\n/image {d / 'b.png'}\nLast one.\n/exit\n")
    res = run(["-m", d / "tiny.gguf", "--mmproj", d / "mm.gguf", *IMG, "-cnv", "-n", "16", *FAST],
              input=script)
    assert res.exit_code == 0, res.stderr
    assert res.stderr.count("goes with your next message") == 2
    assert "nope.png: no such image file" in res.stderr and "/image needs a file" in res.stderr
    assert len([ln for ln in res.stdout.splitlines() if ln.strip()]) >= 1
    no_tower = run(["-m", d / "tiny.gguf", "-cnv", "-n", "16", *FAST],
                   input=f"/image {d / 'a.png'}\n/exit\n")
    assert no_tower.exit_code == 0 and "images need the vision tower" in no_tower.stderr


def test_random_tiny_pair_from_the_script_runs(tmp_path):
    """The README demo's tiny model with a random vision tower (no transformers involved)."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_tiny_model.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "t.gguf"), "--mmproj",
                          str(tmp_path / "t-mm.gguf")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "p.png")
    res = run(["-m", tmp_path / "t.gguf", "--mmproj", tmp_path / "t-mm.gguf", "--image",
               tmp_path / "p.png", "-p", "Describe it.", "-n", "16", "--json", *FAST])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["prompt_tokens"] > 256      # a 40x40 image fills 256 of the 280

