"""tests/conftest.py's gpu skip: it keys on the marker, so a checkout whose path contains "gpu"
still runs the unmarked tests (it once skipped the whole suite there)."""
import pathlib
import shutil
import subprocess
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent


def test_gpu_skip_keys_on_the_marker_not_the_path(tmp_path):
    root = tmp_path / "gpu"
    root.mkdir()
    shutil.copy(HERE / "conftest.py", root / "conftest.py")
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    (root / "test_probe.py").write_text(
        "import pytest\n\n"
        "def test_plain():\n    pass\n\n"
        "@pytest.mark.gpu\ndef test_marked():\n    pass\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    if torch.cuda.is_available():
        assert "2 passed" in out, out
    else:
        assert "1 passed, 1 skipped" in out and "needs a CUDA device" in out, out
