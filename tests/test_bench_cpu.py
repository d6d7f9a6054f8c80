"""scripts/bench_cpu.py's peer runner: a llama-diffusion-cli run that logs an error and exits 0 (it
does so when [prompt | canvas] does not fit one micro-batch) must fail the comparison, not give a
time for work that was never done."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_cpu  # noqa: E402


def _peer(tmp_path, stderr_lines, code=0):
    script = tmp_path / "peer.py"
    script.write_text("import sys\n" + "".join(f"print({ln!r}, file=sys.stderr)\n" for ln in stderr_lines)
                      + f"sys.exit({code})\n")
    return [sys.executable, str(script)]


def test_peer_error_line_with_exit_0_fails(tmp_path):
    cmd = _peer(tmp_path, ["0.18.634.434 I diffusion_params: steps=128",
                           "0.18.643.511 E error: this diffusion model needs the whole [prompt | canvas] "
                           "in one ubatch; set -ub"])
    with pytest.raises(RuntimeError, match=r"reported: error: this diffusion model needs the whole"):
        bench_cpu.run_peer(cmd)


def test_peer_exit_code_fails(tmp_path):
    with pytest.raises(RuntimeError, match="exited with 3"):
        bench_cpu.run_peer(_peer(tmp_path, ["0.00.001.000 I loading"], code=3))


def test_peer_clean_run_is_timed(tmp_path):
    wall, rss = bench_cpu.run_peer(_peer(tmp_path, ["0.00.001.000 I diffusion: done", "0.00.002.000 W slow"]))
    assert wall > 0 and rss > 0
