"""`diffcli inspect`: the real Gemma 3 file, a small diffusion-gemma file, and broken files
(exit 2, one stderr line, no traceback unless --verbose)."""
from __future__ import annotations

import dataclasses
import io
import json

import pytest
from click.testing import CliRunner

import _tinygguf
from _tinygguf import broken_files, write_unsupported
from diffcli.cli import cli
from diffcli.cli.inspect import describe, render_rich
from diffcli.model.config import ModelConfig
from diffcli.gguf.reader import open_gguf


def inspect(*args):
    return CliRunner().invoke(cli, ["inspect", *map(str, args)])


def assert_exit_2_one_line(result, path, *words):
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert "\n" not in err and err.startswith(f"diffcli: error: {path}"), err
    assert "Traceback" not in result.output
    for w in words:
        assert w in err, (w, err)


@pytest.fixture
def tiny(tmp_path):
    return _tinygguf.write(tmp_path / "tiny.gguf")


@pytest.mark.realdata
def test_real_gemma3_file(real_gguf):
    res = inspect(real_gguf, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["architecture"] == "gemma3" and d["n_tensors"] == 236
    assert d["type_mix"] == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
    assert d["config"] is None and not d["runnable"] and d["problems"] == []
    assert d["file_size"] == real_gguf.stat().st_size
    # 270M model: the parameter count is the sum of every tensor's elements
    assert d["n_params"] == sum(t["shape"][0] * (t["shape"][1] if len(t["shape"]) > 1 else 1)
                                for t in d["tensors"])
    assert 250e6 < d["n_params"] < 300e6
    emb = next(t for t in d["tensors"] if t["name"] == "token_embd.weight")
    assert emb["shape"] == [262144, 640] and emb["type"] == "Q8_0"
    assert emb["bytes"] == 262144 * 640 // 32 * 34
    text = inspect(real_gguf)
    assert text.exit_code == 0
    assert "F32 109, Q5_0 81, Q4_K 27, Q8_0 10, Q6_K 9" in text.stdout
    assert "not a diffusion-gemma file" in text.stdout
    assert "blk.*.ffn_down.weight" in text.stdout and "Q6_K 9, Q4_K 9" in text.stdout


def test_diffusion_gemma_json(tiny):
    res = inspect(tiny, "--json")
    d = json.loads(res.stdout)
    # the tiny file holds 6 of the model's tensors: everything is shown, and (as `load` says)
    # it cannot run
    assert res.exit_code == 2 and not d["runnable"] and d["architecture"] == "diffusion-gemma"
    assert len(d["problems"]) == 1 and "'self_cond_pre_norm.weight' is missing" in d["problems"][0]
    cfg = dataclasses.asdict(ModelConfig.from_gguf(open_gguf(tiny)))
    assert d["config"] == json.loads(json.dumps(cfg))
    assert d["type_mix"] == {"Q8_0": 4, "F32": 2}
    # elements: embedding 128*64, rope_freqs 16, output_norm 64, two attn_q 64*64, experts 4*64*64
    assert d["n_params"] == 128 * 64 + 16 + 64 + 2 * 64 * 64 + 4 * 64 * 64
    cpu = d["memory"]["runtime_cpu_f32"]
    # by hand from the tiny file's config (4096-token context, float32 = 4 bytes):
    assert cpu["embedding"] == 128 * 64 * 4                       # V x H
    assert cpu["kv_cache"] == (4 * 2 * 4 * 16 * 47 * 4            # 4 sliding layers keep W-1 = 47
                               + 2 * 2 * 2 * 32 * 4096 * 4)       # 2 full layers keep 4096
    assert cpu["logits"] == 3 * 16 * 128 * 4                      # canvas x V, three copies
    assert cpu["work"] == 64 * 64 * 4                             # one attn_q or one expert
    gpu = d["memory"]["runtime_gpu_bf16"]                         # bf16 activations, fp32 logits
    assert [gpu[k] * 2 for k in ("embedding", "kv_cache", "work")] == \
        [cpu[k] for k in ("embedding", "kv_cache", "work")]
    assert gpu["logits"] == cpu["logits"]
    assert cpu["total"] == sum(cpu[k] for k in ("embedding", "kv_cache", "logits", "work"))


def test_diffusion_gemma_text_and_verbose(tiny):
    res = inspect(tiny)
    assert res.exit_code == 2, res.output                         # incomplete: see above
    out = res.stdout
    assert "model config" in out and "full attention at 3, 5" in out
    assert "max_steps=48" in out                                  # defaults: no eb_* keys
    row = next(line for line in out.splitlines() if line.startswith("blk.*.attn_q.weight"))
    assert row.split()[1:4] == ["2", "Q8_0", "64x64"]
    assert "blk.0.attn_q.weight" not in out
    verbose = inspect(tiny, "--verbose").stdout
    assert "blk.0.attn_q.weight" in verbose and "blk.1.attn_q.weight" in verbose
    assert "diffusion.canvas_length = 16" in verbose


def test_rich_tables_on_a_terminal(tiny):
    from rich.console import Console
    buf = io.StringIO()
    render_rich(describe(open_gguf(tiny)), Console(file=buf, force_terminal=True, width=160), True)
    out = buf.getvalue()
    for part in ("model config", "tensors", "metadata", "blk.1.attn_q.weight", "diffusion-gemma"):
        assert part in out


def test_broken_files_exit_2_without_traceback(tmp_path):
    for kind, path, words in broken_files(tmp_path):
        assert_exit_2_one_line(inspect(path), path, *words)
    missing = tmp_path / "missing.gguf"
    assert_exit_2_one_line(inspect(missing), missing, "no such file")


def test_verbose_adds_the_traceback(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf file at all, no")
    res = inspect(path, "--verbose")
    assert res.exit_code == 2 and "Traceback" in res.stderr


def test_unrunnable_diffusion_gemma_files_are_shown_then_rejected(tmp_path):
    path = write_unsupported(tmp_path / "iq2.gguf")
    res = inspect(path)
    assert "IQ2_XXS" in res.stdout                        # the file-level view is printed
    assert_exit_2_one_line(res, path, "IQ2_XXS", "Q4_K_M")
    path = _tinygguf.write(tmp_path / "nokey.gguf", drop=("expert_count",))
    res = inspect(path, "--json")
    assert json.loads(res.stdout)["config"] is None
    assert_exit_2_one_line(res, path, "diffusion-gemma.expert_count")


def test_other_architectures_get_the_file_view(tmp_path):
    path = _tinygguf.write(tmp_path / "llama.gguf", arch="llama")
    res = inspect(path)
    assert res.exit_code == 0 and "not a diffusion-gemma file" in res.stdout
    assert "model config" not in res.stdout
