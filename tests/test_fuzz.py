"""A bounded, structure-aware fuzz run (issue 13, item 21): 2,000 mutants of tiny F32 / Q8_0 /
Q4_K_M files through what `inspect` and `run` do with a file (open, describe, config, tokenizer,
chat template, load). Every mutant must end "ok" or in the project's own error, one line; inspect
and run must agree about it. Long runs: scripts/fuzz_gguf.py.

The mutation sequence is fixed by the seed, so a failure here reproduces with the same seed."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from click.testing import CliRunner

import _gguffuzz as gz
from diffcli.cli import cli
from diffcli.errors import DiffcliError

N_MUTANTS = 2000
SEED = 20261202


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return gz.base_files(tmp_path_factory.mktemp("fuzz-bases"))


def test_mutants_end_in_the_projects_own_errors(bases, tmp_path, monkeypatch):
    from diffcli.text.chat import TemplateLimits
    # hostile templates stop at the step bound; a smaller one keeps the run short (the bound
    # itself is tested in test_trust_files.py)
    monkeypatch.setattr(TemplateLimits, "steps", 20_000)
    work = Path(gz.scratch_dir(tmp_path))
    path = work / "mutant.gguf"
    fields = {k: gz.fields(b) for k, b in bases.items()}
    rng = random.Random(SEED)
    ends: dict[str, int] = {}
    bad = []
    runner = CliRunner()
    try:
        for i in range(N_MUTANTS):
            kind = rng.choice(sorted(bases))
            data, what = gz.mutate(bases[kind], rng, fields[kind])
            path.write_bytes(data)
            try:
                end = gz.exercise(path)
            except DiffcliError as exc:
                end = "error"
                if any(c in exc.message for c in "\n\r\x00"):
                    bad.append((i, kind, what, f"not one line: {exc.message!r}"))
            except Exception as exc:   # noqa: BLE001 - anything else is what this test looks for
                end = "foreign"
                bad.append((i, kind, what, f"{type(exc).__name__}: {exc}"))
            ends[end] = ends.get(end, 0) + 1
            if i % 50 == 0:            # the command line too: exit 0 or 2, one stderr line
                res = runner.invoke(cli, ["inspect", str(path)])
                err = res.stderr.strip()
                if res.exit_code not in (0, 2) or "\n" in err or "Traceback" in res.output:
                    bad.append((i, kind, what, f"inspect exit {res.exit_code}: {err[:300]}"))
    finally:
        for p in work.glob("*.gguf"):
            p.unlink()
    assert not bad, bad[:10]
    # the run reached every stage: most mutants are refused, some still load and generate text
    assert ends.get("error", 0) > N_MUTANTS // 2 and ends.get("ok", 0) > N_MUTANTS // 20, ends
