"""`diffcli run` and the chat as a user's files and shell see them: --trace never destroys a file,
text that is not UTF-8 is one clear line (and a chat survives it), a full disk is one clear line,
the statistics on stderr, in --json and in the trace are the same figures, and chat commands are
parsed before anything reaches the model."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _cli_fixtures import FAST as _FAST, make_model, one_thread, run, trace_records

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [*_FAST, "-t", "1"]       # see one_thread

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("run") / "tiny.gguf")


def error_line(res) -> str:
    """The one `diffcli: error:` line, checked to be the only one and free of internals."""
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("diffcli: error:")]
    assert len(lines) == 1, res.stderr
    assert "internal error" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    return lines[0]


# ---- 1: --trace never overwrites a file --------------------------------------------------------

def test_trace_refuses_an_existing_file_unless_forced(model_path, tmp_path):
    trace = tmp_path / "run.jsonl"
    trace.write_text("my notes\n")
    res = run(["-m", model_path, "-p", "hi", *FAST, "--trace", trace])
    assert res.exit_code == 2
    line = error_line(res)
    assert str(trace) in line and "already exists" in line and "--force" in line
    assert trace.read_text() == "my notes\n"
    assert "loaded" not in res.stderr                      # refused before the model was loaded
    forced = run(["-m", model_path, "-p", "hi", *FAST, "--trace", trace, "--force"])
    assert forced.exit_code == 0, forced.stderr
    assert trace_records(trace)[0]["event"] == "prompt"
    fresh = tmp_path / "new.jsonl"                         # a new file needs no --force
    assert run(["-m", model_path, "-p", "hi", *FAST, "--trace", fresh]).exit_code == 0
    assert trace_records(fresh)[-1]["event"] == "done"


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "forced"])
def test_trace_never_overwrites_an_input_of_the_run(model_path, tmp_path, force):
    model = tmp_path / "m.gguf"
    model.write_bytes(Path(model_path).read_bytes())
    size = model.stat().st_size
    res = run(["-m", model, "-p", "hi", *FAST, "--trace", model, *force])
    assert res.exit_code == 2 and "-m file" in error_line(res)
    assert model.stat().st_size == size
    prompt = tmp_path / "p.txt"
    prompt.write_text("the prompt")
    res = run(["-m", model, "-f", prompt, *FAST, "--trace", prompt, *force])
    assert res.exit_code == 2 and "-f file" in error_line(res)
    assert prompt.read_text() == "the prompt"
    link = tmp_path / "link.jsonl"                         # the same file by another name
    link.symlink_to(model)
    res = run(["-m", model, "-p", "hi", *FAST, "--trace", link, *force])
    assert res.exit_code == 2 and model.stat().st_size == size


def test_trace_to_a_device_needs_no_force(model_path):
    res = run(["-m", model_path, "-p", "hi", *FAST, "--trace", os.devnull])
    assert res.exit_code == 0, res.stderr


# ---- 3: text that is not UTF-8 ------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["-p", "-sys"])
def test_argument_that_is_not_utf8(model_path, flag):
    # Python hands argv bytes that are not UTF-8 over as lone surrogates (PEP 383)
    args = ["-m", model_path, *FAST, flag, "caf\udce9 au lait"]
    if flag == "-sys":
        args += ["-p", "hi"]
    res = run(args)
    assert res.exit_code == 2
    assert f"{flag} is not UTF-8 text (byte 0xe9 at character 3)" in error_line(res)


def test_stdin_that_is_not_utf8(model_path):
    res = run(["-m", model_path, *FAST], input=b"caf\xe9 au lait")
    assert res.exit_code == 2
    assert "stdin is not UTF-8 text (byte 0xe9 at offset 3)" in error_line(res)
    res = run(["-m", model_path, *FAST, "-p", "-"], input=b"\xff")
    assert res.exit_code == 2 and "stdin is not UTF-8" in error_line(res)


def test_chat_survives_a_line_that_is_not_utf8(model_path, tmp_path):
    from diffcli.text.tokenizer import Tokenizer
    trace = tmp_path / "chat.jsonl"
    res = run(["-m", model_path, "-cnv", *FAST, "--trace", trace],
              input=b"first\ncaf\xe9\nsecond\n")
    assert res.exit_code == 0, res.stderr
    assert "line 2 of stdin is not UTF-8 text (byte 0xe9 at offset 3)" in error_line(res)
    tok = Tokenizer.from_gguf(str(model_path))
    prompts = [tok.decode(r["ids"], special=True) for r in trace_records(trace)
               if r["event"] == "prompt"]
    assert len(prompts) == 2 and "second" in prompts[1] and "first" in prompts[1]


def test_chat_template_file_that_is_not_utf8(model_path, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_bytes(b"{{ bos_token }}caf\xe9")
    res = run(["-m", model_path, "-p", "hi", *FAST, "--chat-template-file", template])
    assert res.exit_code == 2
    assert f"{template}: the chat template is not UTF-8 text (byte 0xe9 at offset 18)" in error_line(res)


def test_argv_bytes_in_a_real_process(model_path):
    """The real path: the shell passes the byte 0xff in argv."""
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    out = subprocess.run([os.fsencode(sys.executable), b"-m", b"diffcli", b"-m",
                          os.fsencode(model_path), b"-p", b"\xff hi"], capture_output=True,
                         env=env, timeout=120)
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert err.strip().splitlines() == ["diffcli: error: -p is not UTF-8 text (byte 0xff at "
                                        "character 0); pass UTF-8 text (check the terminal's or "
                                        "the file's encoding)"]


# ---- 4: a full disk -----------------------------------------------------------------------------

def test_trace_on_a_full_disk(model_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    res = run(["-m", model_path, "-p", "hi", *FAST, "--trace", "/dev/full"])
    assert res.exit_code == 1
    assert "cannot write to the --trace file /dev/full: No space left on device" in error_line(res)


@pytest.mark.slow
@pytest.mark.parametrize("json_out", [False, True], ids=["text", "json"])
def test_stdout_on_a_full_disk(model_path, json_out):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "diffcli", "-m", str(model_path), "-p", "hi",
                              *FAST, *(["--json"] if json_out else [])], stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == ("diffcli: error: cannot write to stdout: No space left on device; free "
                         "some disk space, or send the output elsewhere"), out.stderr
    assert "Exception ignored" not in out.stderr and "internal error" not in out.stderr


@pytest.mark.slow
def test_stderr_on_a_full_disk_still_gives_the_answer(model_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    args = ["-m", str(model_path), "-p", "hi", *FAST]
    want = run([*args, "--json"])
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "diffcli", *args], stdout=subprocess.PIPE,
                             stderr=full, text=True, timeout=120)
    assert out.returncode == 0
    assert out.stdout.rstrip("\n") == json.loads(want.stdout)["text"].rstrip("\n")


# ---- 17: one source of truth for the statistics -------------------------------------------------

def test_stats_on_stderr_json_and_trace_are_the_same_figures(model_path, tmp_path):
    trace = tmp_path / "t.jsonl"
    res = run(["-m", model_path, "-p", "hi", "-n", "48", "--diffusion-eb-max-steps", "2",
               "--device", "cpu", "-t", "1", "--json", "--trace", trace])
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    st = out["stats"]
    assert not {"seed", "mode", "prompt_tokens"} & set(st)          # each once, at the top
    assert out["seed"] == 0xFFFFFFFF and out["prompt_tokens"] > 0 and "turn" not in out
    assert st["emitted_tokens"] == len(out["tokens"])
    m = re.search(r"total time: ([\d.]+)ms, time per step: ([\d.]+)ms \((\d+) steps over (\d+) "
                  r"blocks", res.stderr)
    assert m, res.stderr
    assert m.group(1) == f"{st['total_ms']:.2f}" and m.group(2) == f"{st['ms_per_step']:.2f}"
    assert int(m.group(3)) == st["steps"] and int(m.group(4)) == st["canvases"]
    m = re.search(r"throughput: ([\d.]+) tok/s \((\d+) tok in ([\d.]+)ms\)", res.stderr)
    assert m and m.group(1) == f"{st['tokens_per_s']:.1f}"
    assert int(m.group(2)) == st["emitted_tokens"] and m.group(3) == f"{st['total_ms']:.2f}"
    assert st["tokens_per_s"] == pytest.approx(1000 * st["emitted_tokens"] / st["total_ms"])
    assert len(re.findall(r"tok/s", res.stderr)) == 2      # throughput and in-step parallel only
    # the whole turn: preparing the prompt, prefill, the steps, the commits
    assert st["total_ms"] >= st["prepare_ms"] + st["prefill_ms"] + st["step_ms"] + st["commit_ms"]
    assert st["prepare_ms"] + st["prefill_ms"] <= st["first_canvas_ms"] <= st["total_ms"]  # one origin
    assert trace_records(trace)[-1]["stats"] == st


def test_chat_json_counts_turns_and_is_not_labelled_cli(model_path):
    res = run(["-m", model_path, "-cnv", *FAST, "--json"], input="one\ntwo\n")
    assert res.exit_code == 0, res.stderr
    replies = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [r["turn"] for r in replies] == [1, 2]
    assert all("mode" not in r and "mode" not in r["stats"] for r in replies)


# ---- 18: chat commands ---------------------------------------------------------------------------

@pytest.mark.parametrize("line, want", [
    ("/quit", ("/quit", "")), ("/quit extra", ("/quit", "extra")), ("/exit  now ", ("/exit", "now")),
    ("/image a b.png", ("/image", "a b.png")), ("/claer", ("/claer", "")), ("/?", ("/?", "")),
    ("/usr/bin is a path", None), ("//quit", None), ("hello /quit", None), ("/ 2", None),
])
def test_parse_command(line, want):
    from diffcli.cli.chat import parse_command
    assert parse_command(line) == want


def test_malformed_and_unknown_commands_never_reach_the_model(model_path, tmp_path):
    from diffcli.text.tokenizer import Tokenizer
    trace = tmp_path / "chat.jsonl"
    res = run(["-m", model_path, "-cnv", *FAST, "--trace", trace],
              input="/quit extra\n/clear all\n/frob\n//quit is a word\n/exit\nnever\n")
    assert res.exit_code == 0, res.stderr
    assert "/quit takes no argument; commands: /help" in res.stderr
    assert "/clear takes no argument" in res.stderr and "unknown command /frob; commands:" in res.stderr
    tok = Tokenizer.from_gguf(str(model_path))
    prompts = [tok.decode(r["ids"], special=True) for r in trace_records(trace)
               if r["event"] == "prompt"]
    assert len(prompts) == 1, prompts                      # only "//quit ..." was sent, as "/quit ..."
    assert "user\n/quit is a word<turn|>" in prompts[0] and "extra" not in prompts[0]
