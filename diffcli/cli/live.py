"""The live canvas view (`--diffusion-visual`) and the plain progress line, fed by generation events.

LiveView redraws the canvas of the current step in place with Rich `Live(transient=True,
auto_refresh=False)`: a region under the cursor, refreshed only when an event arrives, erased at
the end of the turn; no alternate screen and no full-screen clear, so scrollback survives. Unlike
llama-diffusion-cli's monochrome view (spec §E) each position is styled by its state:

    settled   argmax unchanged since the previous step and accepted   default style
    accepted  took its sampled token this step, argmax changed        green
    renoised  replaced by noise for the next step                     yellow -> red as its entropy
                                                                       rises (dim when very uncertain)
    thinking  inside a `<|channel>...<channel|>` thought channel      dim italic

A status line shows canvas b/B, step k/S, ms/step, emitted tokens/s and how many positions were
accepted. Text of committed canvases is printed above the region in normal flow (whole lines
only; the unfinished last line stays in the region). The view switches itself off when its
console is not a terminal.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from ..text.chat import CHANNEL_CLOSE, CHANNEL_OPEN

STYLE_SETTLED = ""
STYLE_ACCEPTED = "green"
STYLE_THINKING = "dim italic"
# renoised positions: (entropy upper bound in nats, style)
RENOISED_SHADES = ((0.5, "yellow"), (2.0, "dark_orange"), (float("inf"), "dim red"))


def renoised_style(entropy: float) -> str:
    for bound, style in RENOISED_SHADES:
        if entropy < bound:
            return style
    return RENOISED_SHADES[-1][1]


# Raw control bytes (byte-fallback tokens can be ESC) must never reach the terminal from the view.
_CONTROL = {c: "\ufffd" for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)] if c not in (0x09, 0x0A)}


def safe_piece(text: str) -> str:
    return text.translate(_CONTROL)


def progress_bar(done: int, total: int, width: int = 50) -> tuple[str, int]:
    pct = int(100 * done / total) if total else 100
    filled = int(width * done / total) if total else width
    return "=" * filled + " " * (width - filled), pct


class ProgressLine:
    """Without --diffusion-visual: llama.cpp's single self-overwriting line on the log stream,
    `\rdiffusion step: k/S [bar] pct%`, shown only when that stream is a terminal.

    When the answer streams to the same terminal (`below=True`), the answer's last line is
    unfinished while the next canvas is denoised, so the bar must not go on that line (a `\r` and
    an erase there would wipe the text printed so far). It is drawn on the line below instead:
    index down (scrolling if the cursor is on the bottom row) and back up, save the cursor, index
    down, draw, restore; `close()` erases that line the same way. Only VT100 basics are used (IND,
    RI, DECSC, DECRC, EL). The caller passes each piece of answer text it prints to `answer()`, so
    the line knows when the cursor sits after the last column (a pending autowrap that a cursor
    movement would cancel) and moves it to the next row first.
    """

    def __init__(self, stream=None, enabled: bool | None = None, below: bool = False,
                 width: Callable[[], int] | None = None):
        self.stream = stream or sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.below = below
        self._width = width or (lambda: _terminal_width(self.stream))
        self._shown = False
        self._line = ""                    # answer text after its last newline (below mode)

    def step(self, event) -> None:
        if not self.enabled:
            return
        width = self._width()
        bar, pct = progress_bar(event.step + 1, event.steps, max(10, min(50, width - 30)))
        text = f"diffusion step: {event.step + 1}/{event.steps} [{bar}] {pct}%"[:max(1, width - 1)]
        if self.below:
            if self._line and _wrap_pending(self._line, width):
                self.stream.write("\r\n")         # where the next character would have wrapped to
                self._line = ""
            self.stream.write(f"\x1bD\x1bM\x1b7\x1bD\r{text}\x1b[K\x1b8")
        else:
            self.stream.write(f"\r{text}")
        self.stream.flush()
        self._shown = True

    def answer(self, text: str) -> None:
        """The caller printed `text` of the answer on the same terminal."""
        if self.below:
            head, nl, tail = text.rpartition("\n")
            self._line = tail if nl else self._line + tail

    def close(self) -> None:
        if self._shown:
            self.stream.write("\x1b7\x1bD\r\x1b[K\x1b8" if self.below else "\r\x1b[K")
            self.stream.flush()
            self._shown = False


def same_terminal(a, b) -> bool:
    """Both streams are terminals and the same one (stdout and stderr of an interactive shell)."""
    if not (_isatty(a) and _isatty(b)):
        return False
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError, AttributeError):
        return True            # terminals whose device cannot be told apart: assume the same
    return (sa.st_rdev, sa.st_dev, sa.st_ino) == (sb.st_rdev, sb.st_dev, sb.st_ino)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _terminal_width(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return 80


def _wrap_pending(line: str, width: int) -> bool:
    """Whether a terminal `width` cells wide that printed `line` from column 0 has its cursor
    past the last column (the next character wraps; a cursor movement first would overwrite the
    last cell instead). Tabs go to the next multiple of 8, wide characters take two cells."""
    from rich.cells import get_character_cell_size
    col, pending = 0, False
    for ch in line:
        if ch == "\r":
            col, pending = 0, False
            continue
        if ch == "\t":            # a tab never wraps; it stops at the last column
            if not pending:
                col = min(width - 1, (col // 8 + 1) * 8)
            continue
        w = get_character_cell_size(ch)
        if w == 0:
            continue
        if pending or col + w > width:
            col = 0
        col += w
        pending = col >= width
        if pending:
            col = width
    return pending


@contextmanager
def held_interrupt():
    """Hold Ctrl-C back until the block ends. A redraw of the live region cut halfway leaves
    Rich believing the region has a height it never reached on screen, and erasing it then
    wipes lines above it (the chat's prompt line); the interrupt is raised once the redraw is
    whole. Outside the main thread (no signal handlers there) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, None)      # Python's default handler raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


class LiveView:
    """Consumes StepEvent / CanvasEvent / Done (duck-typed) and draws the canvas in place."""

    def __init__(self, console: Console, piece: Callable[[int], str], *, n_canvases: int = 1,
                 interval: int = 1, progress: bool = False, show_thinking: bool = False,
                 enabled: bool | None = None):
        self.console = console
        self._raw_piece = piece            # token id -> its visible text (control tokens empty)
        self._pieces: dict[int, str] = {}
        self.n_canvases = max(1, n_canvases)
        self.interval = max(1, interval)
        self.progress = progress
        self.show_thinking = show_thinking
        self.enabled = console.is_terminal if enabled is None else enabled
        self._live: Live | None = None
        self._prev: list[int] | None = None
        self._tail = ""                    # committed text after the last printed newline
        self._in_thought = False           # committed text ended inside a thought channel
        self._emitted = 0
        self._step_ms: list[float] = []
        self._t0 = time.perf_counter()

    # ---- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "LiveView":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._t0 = time.perf_counter()
        if self.enabled and self._live is None:
            self._live = Live(console=self.console, auto_refresh=False, transient=True,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            with held_interrupt():
                self._live.stop()
            self._live = None

    # ---- events ------------------------------------------------------------------------------
    def on_step(self, event: Any) -> None:
        self._step_ms.append(float(event.elapsed_ms))
        ids = [int(i) for i in event.argmax.tolist()]
        if self._live is not None and event.step % self.interval == 0:
            view = self.render(event, ids)
            with held_interrupt():
                self._live.update(view, refresh=True)
        self._prev = ids

    def on_canvas(self, event: Any, committed_text: str = "", in_thought: bool = False) -> None:
        """A canvas finished; `committed_text` is what it adds to the printed answer and
        `in_thought` whether the reply so far ends inside an open thought channel."""
        self._prev = None
        self._emitted += len(event.tokens)
        text = self._tail + committed_text
        head, nl, tail = text.rpartition("\n")
        if self._live is not None and nl and not event.ended:
            with held_interrupt():
                self.console.print(Text(head), soft_wrap=True)   # goes above the live region
            self._tail = tail
        else:
            self._tail = text
        self._in_thought = in_thought

    def pending_text(self) -> str:
        """Committed text not yet printed above the region (the caller prints it after stop())."""
        out, self._tail = self._tail, ""
        return out

    # ---- rendering ---------------------------------------------------------------------------
    def piece(self, tok: int) -> str:
        if tok not in self._pieces:
            self._pieces[tok] = safe_piece(self._raw_piece(tok))
        return self._pieces[tok]

    def styled_canvas(self, event: Any, ids: list[int] | None = None) -> Text:
        ids = [int(i) for i in event.argmax.tolist()] if ids is None else ids
        accepted = event.accepted.tolist()
        entropy = event.entropy.tolist()
        prev = self._prev
        out = Text(safe_piece(self._tail), style=STYLE_THINKING if self._in_thought else "")
        thinking = self._in_thought
        for pos, tok in enumerate(ids):
            piece = self.piece(tok)
            if piece == CHANNEL_OPEN:
                thinking = True
            stable = prev is not None and prev[pos] == tok
            if thinking:
                style = STYLE_THINKING
            elif not accepted[pos]:
                style = renoised_style(entropy[pos])
            elif stable:
                style = STYLE_SETTLED
            else:
                style = STYLE_ACCEPTED
            out.append(piece, style=style)
            if piece == CHANNEL_CLOSE:
                thinking = False
        return out

    def status(self, event: Any) -> Text:
        ms = self._step_ms[-1] if self._step_ms else 0.0
        elapsed = time.perf_counter() - self._t0
        tps = self._emitted / elapsed if elapsed > 0 else 0.0
        n_acc = int(sum(event.accepted.tolist()))
        line = (f"canvas {event.canvas + 1}/{self.n_canvases} · step {event.step + 1}/{event.steps}"
                f" · {ms:.1f} ms/step · {tps:.1f} tok/s · accepted {n_acc}/{len(event.accepted)}"
                f" · T={event.temperature:.3f}")
        return Text(line, style="bold")

    def legend(self) -> Text:
        t = Text("settled ")
        t.append("accepted ", style=STYLE_ACCEPTED)
        t.append("renoised", style=RENOISED_SHADES[0][1])
        t.append("→", style=RENOISED_SHADES[1][1])
        t.append("uncertain ", style=RENOISED_SHADES[2][1])
        t.append("thinking", style=STYLE_THINKING)
        return t

    def render(self, event: Any, ids: list[int] | None = None) -> Group:
        parts = []
        if self.progress:
            head = f"diffusion canvas {event.canvas + 1}, step {event.step + 1}/{event.steps} "
            width = max(10, min(50, self.console.width - len(head) - 8))
            bar, pct = progress_bar(event.step + 1, event.steps, width)
            parts.append(Text(f"{head}[{bar}] {pct}%"))
        parts += [self.styled_canvas(event, ids), Text(""), self.status(event), self.legend()]
        return Group(*parts)
