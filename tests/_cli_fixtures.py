"""Tiny random DiffusionGemma GGUFs for the CLI tests, and a helper to run the CLI on them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from diffcli.cli import cli

FAST = ["--diffusion-eb-max-steps", "2", "--no-perf", "--device", "cpu"]   # cpu: same as diffcli.load()


@pytest.fixture
def one_thread():
    """Puts torch's thread count back after the test. The CLI tests run with -t 1 (ONE): on a
    shared 2-core machine torch's default pool spends most of a step waiting for busy cores, and
    the count is process-wide."""
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def make_model(path: Path, **overrides) -> Path:
    from diffcli.testing import make_random_gguf
    return make_random_gguf(path, overrides or None, "f32", seed=0)


def with_metadata(src: Path, dst: Path, **keys) -> Path:
    """Copy a GGUF adding metadata keys (gguf-py's own metadata copier)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch=reader.get_field("general.architecture").contents(),
                             endianess=reader.endianess)
    types = {int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32}
    new = {k: MetadataDetails(types[type(v)], v) for k, v in keys.items()}
    copy_with_new_metadata(reader, writer, new, [])
    return dst


def run(args, input=None, **kw):
    # CliRunner (click 8.2+) keeps stdout and stderr apart: result.stdout / result.stderr
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False, **kw)


def trace_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
