"""scripts/gpu_check.py, the one-call GPU check, exercised on the CPU at tiny shapes (kernels under
TRITON_INTERPRET=1): the sections it can run here write their rows, the markdown and a choices
table the selection module reads. Its numbers mean nothing here; the GPU run is what it is for."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is the real thing there")
def test_gpu_check_writes_its_tables(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out),
                          "--only", "env,sweep,model", "--limit", "2", "--tmp", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    sections = {r["section"] for r in report["rows"]}
    assert {"env", "sweep", "sweep summary", "model"} <= sections, sections
    sweep = [r for r in report["rows"] if r["section"] == "sweep"]
    assert [r["variant"] for r in sweep] == ["bf16", "mmq"]
    assert all(r["ms"] > 0 and 0 < r["rel_err"] < 0.05 for r in sweep)
    names = {r["name"] for r in report["rows"] if r["section"] == "model"}
    assert {"load", "prefill 64 tokens", "generate 2 steps/canvas"} <= names
    md = (out / "gpu_check.md").read_text()
    assert "## sweep" in md and "## model" in md
    table = json.loads((out / "choices.json").read_text())
    assert isinstance(table["choices"], dict)          # fp32 here: nothing qualifies, still valid
