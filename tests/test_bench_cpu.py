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


def test_peer_figures_come_from_the_fastest_runs():
    walls = {"lo": [30.0, 20.0], "hi": [28.0, 26.0], "long": [45.0, 40.0]}
    got = bench_cpu.peer_differences(walls, steps=2, prompt_len=512)
    assert got["ms_per_step"] == pytest.approx(3000.0) and got["prefill_s"] == pytest.approx(20.0)
    assert got["prefill_tok_s"] == pytest.approx(25.6) and "error" not in got


def test_peer_walls_that_do_not_add_up_are_an_error_not_a_figure():
    # a 30-layer run on a 23 GB machine: the 2-step run (cold page cache) was the slowest
    walls = {"lo": [147.1], "hi": [113.6], "long": [124.6]}
    got = bench_cpu.peer_differences(walls, steps=2, prompt_len=512)
    assert "ms_per_step" not in got and "prefill_tok_s" not in got
    assert "147.1 s with 2 steps, 113.6 s with 4" in got["error"] and got["walls_s"] == walls


def test_page_cache_warm_up_reads_the_file_or_says_why_not(tmp_path, monkeypatch):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"\0" * (3 << 20))
    said = []
    from diffcli.gguf import reader
    monkeypatch.setattr(reader, "available_ram", lambda: 64 << 20)
    assert bench_cpu.warm_page_cache(f, said.append) >= 0 and said == []
    monkeypatch.setattr(reader, "available_ram", lambda: 2 << 20)   # the file does not fit
    assert bench_cpu.warm_page_cache(f, said.append) is None
    assert len(said) == 1 and "not reading model.gguf into the page cache" in said[0]
