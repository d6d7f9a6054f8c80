"""diffcli on a real terminal: a pseudo-terminal receives what the CLI writes (stdout and stderr
on the same tty, as in an interactive shell) and pyte, a VT100 emulator, replays it; the screen
plus its scrollback must show every token of the answer, whatever the progress line or the live
view drew in between. Chat line editing runs the CLI as a child process on a pty, since Python's
readline only serves the process's own stdin/stdout."""
from __future__ import annotations

import fcntl
import io
import json
import os
import select
import struct
import subprocess
import sys
import termios
import threading
import time
import unicodedata
from pathlib import Path

import pytest

pyte = pytest.importorskip("pyte")

from diffcli.cli import cli                               # noqa: E402
from _cli_fixtures import FAST as _FAST, make_model, one_thread, run, trace_records   # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = ["--diffusion-eb-max-steps", "3", "--device", "cpu", "-t", "1"]   # see one_thread
FAST = [*_FAST, "-t", "1"]


class Pty:
    """A cols x rows pseudo-terminal: `tty` is a text stream on its slave side (what a program
    writes to), `data` everything the master side has read so far (what a terminal would show;
    the line discipline turns "\\n" into "\\r\\n" as for a real one)."""

    def __init__(self, cols: int, rows: int = 24):
        self.cols, self.rows = cols, rows
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.slave = slave
        self.tty = io.TextIOWrapper(io.FileIO(slave, "w", closefd=False), encoding="utf-8",
                                    line_buffering=True)
        self.data = bytearray()
        self._stop = False
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                self.data += chunk

    def close(self) -> bytes:
        self.tty.flush()
        time.sleep(0.1)                      # let the reader take what is still in the pty
        self._stop = True
        self._reader.join()
        os.close(self.slave)
        os.close(self.master)
        return bytes(self.data)


def screen_lines(data: bytes, cols: int, rows: int) -> list[str]:
    """The rows a terminal shows after `data`, the scrolled-off ones (scrollback) first."""
    screen = pyte.HistoryScreen(cols, rows, history=100000, ratio=0.001)
    pyte.ByteStream(screen).feed(data)

    def text(line) -> str:
        return "".join(line[x].data for x in range(cols)).rstrip()
    return [text(line) for line in screen.history.top] + [text(screen.buffer[y]) for y in range(rows)]


def squeeze(text: str) -> str:
    return "".join(text.split())


def as_shown(text: str) -> str:
    """What a terminal shows of an answer: control characters (category Cc: C0, DEL, C1) other
    than newline and tab are written as U+FFFD, never as the raw bytes."""
    return "".join("\ufffd" if unicodedata.category(c) == "Cc" and c not in "\t\n" else c
                   for c in text)


def run_on_pty(monkeypatch, args, cols: int, rows: int = 24) -> tuple[int, list[str], bytes]:
    """Run the CLI in this process with stdout and stderr on one pty; (exit code, screen rows,
    raw bytes the terminal received)."""
    term = Pty(cols, rows)
    monkeypatch.setattr(sys, "stdout", term.tty)
    monkeypatch.setattr(sys, "stderr", term.tty)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))   # no more chat lines
    monkeypatch.setenv("TERM", "xterm-256color")
    # Rich sizes its console from fds 0-2 (pytest's, here), else from these
    monkeypatch.setenv("COLUMNS", str(cols))
    monkeypatch.setenv("LINES", str(rows))
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    code = 0
    try:
        cli.main(args=[str(a) for a in args], prog_name="diffcli")
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        term.tty.flush()
        monkeypatch.undo()
    data = term.close()
    return code, screen_lines(data, cols, rows), data


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("term") / "tiny.gguf")


def reference(model_path, args) -> dict:
    res = run(["-m", model_path, *args, "--json", "--no-perf"])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("visual", [False, True], ids=["progress-line", "live-view"])
def test_every_canvas_of_a_long_answer_stays_on_screen(model_path, monkeypatch, visual):
    args = ["-p", "Write a long story.", "-n", "64", "-s", "5", *STEPS]
    want = reference(model_path, args)
    assert len(want["tokens"]) > 16, "needs an answer longer than one 16-token canvas"
    extra = ["--diffusion-visual", "--diffusion-visual-progress"] if visual else []
    code, lines, data = run_on_pty(monkeypatch, ["-m", model_path, *args, *extra], cols=80)
    assert code == 0
    if not visual:
        assert b"diffusion step: 3/3" in data            # the progress line was drawn
    else:
        assert b"step 3/3" in data                       # and so was the live region
    shown = squeeze("\n".join(lines))
    assert squeeze(as_shown(want["text"])) in shown, (want["text"], lines)


def test_progress_line_after_a_line_filled_to_the_last_column(model_path, monkeypatch, tmp_path):
    # A canvas whose text ends exactly at the right margin leaves the cursor waiting to wrap; a
    # cursor movement there would make the next canvas's first character overwrite the last one.
    args = ["-p", "Write a long story.", "-n", "64", "-s", "5", *STEPS]
    trace = tmp_path / "t.jsonl"
    want = reference(model_path, [*args, "--trace", trace])
    from diffcli.text.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(str(model_path))
    canvases = [r["tokens"] for r in trace_records(trace) if r["event"] == "canvas"]
    first = as_shown(tok.decode(canvases[0]))
    assert len(canvases) > 1 and "\n" not in first and "\t" not in first and len(first) >= 20
    from wcwidth import wcswidth
    code, lines, _ = run_on_pty(monkeypatch, ["-m", model_path, *args], cols=wcswidth(first))
    assert code == 0
    assert squeeze(as_shown(want["text"])) in squeeze("".join(lines)), (want["text"], lines)


def test_chat_reply_stopped_by_ctrl_c_stays_on_screen(model_path, monkeypatch):
    """-cnv, Ctrl-C after two canvases: the text of those canvases is still there."""
    import diffcli
    args = ["-p", "Tell me a story.", "-n", "64", "-s", "5", *STEPS]
    real = diffcli.stream
    seen = []

    def interrupted(*a, **k):
        for event in real(*a, **k):
            yield event
            if type(event).__name__ == "CanvasEvent":
                seen.append(event)
                if len(seen) == 2:
                    raise KeyboardInterrupt
    monkeypatch.setattr(diffcli, "stream", interrupted)
    code, lines, _ = run_on_pty(monkeypatch, ["-m", model_path, *args, "-cnv"], cols=80)
    assert code == 0 and len(seen) == 2
    from diffcli.text.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(str(model_path))
    from diffcli.text.chat import split_thinking
    # what the chat shows of them: the answer, not a (random-model) thought channel
    partial = split_thinking(tok.decode(seen[0].tokens + seen[1].tokens))[1]
    assert len(squeeze(partial)) > 10
    shown = "\n".join(lines)
    assert squeeze(as_shown(partial)) in squeeze(shown) and "reply stopped" in shown, lines


def test_ctrl_c_in_the_middle_of_a_live_redraw_keeps_the_lines_above(model_path, monkeypatch):
    """-cnv --diffusion-visual, Ctrl-C arriving while Rich redraws the region (here: sent from
    inside its render of a taller region, after the first segment): the region is still erased
    exactly, so the lines above it (logs, the chat's prompt line) stay."""
    import signal
    from rich.live_render import LiveRender
    original = LiveRender.__rich_console__
    calls = []

    def render(self, console, options):
        before = self._shape
        for i, segment in enumerate(original(self, console, options)):
            yield segment
            # the first redraw to a taller region: its new height is recorded, nothing written yet
            if i == 0 and not calls and before is not None and self._shape[1] > before[1]:
                calls.append(self._shape)
                os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(LiveRender, "__rich_console__", render)
    args = ["-m", model_path, "-p", "Tell me a story.", "-n", "64", "-s", "5", *STEPS, "-cnv",
            "--diffusion-visual", "--diffusion-visual-progress"]
    code, lines, _ = run_on_pty(monkeypatch, args, cols=60, rows=40)
    assert code == 0 and len(calls) == 1
    shown = "\n".join(lines)
    assert "diffcli: seed 5; thinking off" in lines, lines
    assert "reply stopped" in shown, lines


def test_progress_line_goes_below_the_answer_on_a_shared_terminal():
    """The line's own escape sequences, replayed: answer text, a progress draw, more answer, a
    close, on an emulator; every answer character is where it was written."""
    from diffcli.cli.live import ProgressLine

    class Event:
        step, steps = 1, 4
    for cols, text in [(40, "abc def "), (8, "12345678"), (10, "x" * 25)]:
        out = io.StringIO()
        line = ProgressLine(out, enabled=True, below=True, width=lambda: cols)
        for part in (text, text):
            line.step(Event())
            line.close()
            out.write(part)
            line.answer(part)
        line.step(Event())
        screen = pyte.Screen(cols, 12)
        pyte.Stream(screen).feed(out.getvalue().replace("\n", "\r\n"))
        rows = [r.rstrip() for r in screen.display]
        assert squeeze("".join(rows)).startswith(squeeze(text + text)), (cols, rows)
        assert any(r.startswith("diffusion step: 2/4"[:cols - 1]) for r in rows), rows


# ---- chat line editing (readline), in a child process on a pty -------------------------------

def spawn_on_pty(args, cols=100, rows=30):
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "TERM": "xterm", "INPUTRC": "/dev/null"}
    proc = subprocess.Popen([sys.executable, "-m", "diffcli", *map(str, args)], stdin=slave,
                            stdout=slave, stderr=slave, env=env, start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    return proc, master


def wait_for_prompt(master, buf: bytearray, timeout=60.0) -> None:
    """Read until the output stops with readline's "> " prompt at its end (bracketed-paste or
    other mode switches may follow it)."""
    import re
    at_prompt = re.compile(rb"> (\x1b\[[0-9;?]*[A-Za-z])*\Z")
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no prompt; the terminal got {bytes(buf)[-400:]!r}")
        ready, _, _ = select.select([master], [], [], min(left, 0.3))
        if not ready:
            if at_prompt.search(bytes(buf)):
                return
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            raise AssertionError(f"the chat ended; the terminal got {bytes(buf)[-400:]!r}")
        buf += chunk


@pytest.mark.slow
def test_chat_line_editing_and_history(model_path, tmp_path):
    trace = tmp_path / "chat.jsonl"
    proc, master = spawn_on_pty(["-m", model_path, "-cnv", *FAST, "--trace", trace])
    buf = bytearray()
    try:
        wait_for_prompt(master, buf)
        os.write(master, b"abc\x1b[D\x1b[DX\r")           # left, left, X: "aXbc"
        buf.clear()
        wait_for_prompt(master, buf)
        os.write(master, b"/quit now\r")                   # malformed: help, not the model
        buf.clear()
        wait_for_prompt(master, buf)
        assert b"/quit takes no argument" in buf
        os.write(master, b"\x1b[A\x1b[A\r")               # up, up: "aXbc" again
        buf.clear()
        wait_for_prompt(master, buf)
        os.write(master, b"/exit\r")
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert proc.returncode == 0
    from diffcli.text.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(str(model_path))
    prompts = [tok.decode(r["ids"], special=True) for r in trace_records(trace)
               if r["event"] == "prompt"]
    assert len(prompts) == 2, prompts
    assert "user\naXbc<turn|>" in prompts[0] and "\x1b" not in prompts[0], prompts[0]
    assert prompts[1].count("user\naXbc<turn|>") == 2 and "quit" not in prompts[1], prompts[1]
