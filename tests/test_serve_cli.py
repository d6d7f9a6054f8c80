"""The `diffcli serve` command line: run's flags (the same definitions), llama-server's, and the
one-line errors before anything listens."""
from __future__ import annotations

import re
import socket

import pytest

from diffcli.cli.run import run_cmd
from diffcli.cli.serve import NOT_SERVED, serve_cmd
from _cli_fixtures import make_model, run


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("serve-cli") / "tiny.gguf")


def test_serve_takes_every_model_sampler_and_placement_flag_of_run():
    res = run(["serve", "--help"])
    assert res.exit_code == 0, res.output
    listed = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", res.stdout))
    served = [p for p in run_cmd.params if p.name not in NOT_SERVED]
    for param in served:
        assert set(param.opts) <= listed, param.opts
    for flag in ("--host", "--port", "--api-key", "-a", "--alias", "--max-queue", "-ngl",
                 "--n-cpu-moe", "-ot", "--diffusion-eb-max-steps", "-c", "-s", "--think"):
        assert flag in listed, flag
    for flag in ("-p", "-cnv", "--diffusion-visual", "--json", "--trace"):
        assert flag not in listed, flag
    # the very same option objects' definitions: names and defaults agree with run's
    run_opts = {p.name: p for p in run_cmd.params}
    for p in serve_cmd.params:
        if p.name in run_opts:
            assert p.opts == run_opts[p.name].opts and p.default == run_opts[p.name].default


def test_bad_model_file_is_a_one_line_error_before_listening(tmp_path):
    res = run(["serve", "-m", tmp_path / "missing.gguf", "--port", "0"])
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "missing.gguf: no such file" in res.stderr
    assert "listening" not in res.stderr


def test_bad_flag_value_is_exit_2(model_path):
    res = run(["serve", "-m", model_path, "--diffusion-eb", "off"])
    assert res.exit_code == 2 and "legacy masked-diffusion" in res.stderr
    res = run(["serve", "-m", model_path, "--port", "70000"])
    assert res.exit_code == 2 and "--port" in res.stderr


def test_a_taken_port_is_a_one_line_runtime_error(model_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = run(["serve", "-m", model_path, "--port", port, "--device", "cpu"])
    assert res.exit_code == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("diffcli: error: cannot listen on 127.0.0.1:") and "--port" in last
