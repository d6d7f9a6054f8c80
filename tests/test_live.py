"""The live canvas view, rendered to a recording Rich console, and the plain progress line."""
from __future__ import annotations

import io
import json
import unicodedata

import pytest
import torch
from rich.console import Console

from diffcli.generation.loop import CanvasEvent, StepEvent
from diffcli.cli.live import (STYLE_ACCEPTED, STYLE_SETTLED, STYLE_THINKING, LiveView, ProgressLine,
                          renoised_style)

PIECES = {0: "", 1: "A", 2: "B", 3: "C", 4: "D", 5: "<|channel>", 6: "x", 7: "<channel|>", 8: "\n"}


def piece(i: int) -> str:
    return PIECES[i]


def step(ids, accepted, entropy, k=0, canvas=0, steps=48, ms=12.5):
    n = len(ids)
    acc = torch.tensor(accepted, dtype=torch.bool)
    return StepEvent(canvas=canvas, step=k, steps=steps, argmax=torch.tensor(ids), accepted=acc,
                     renoised=~acc, entropy=torch.tensor(entropy, dtype=torch.float32),
                     temperature=0.8, stable=False, elapsed_ms=ms)


def recording_console() -> Console:
    return Console(record=True, force_terminal=True, width=100, color_system="standard",
                   file=io.StringIO())


def styles_by_char(text) -> list[str]:
    out = [""] * len(text.plain)
    for span in text.spans:
        for i in range(span.start, span.end):
            out[i] = str(span.style)
    return out


def test_position_states_are_styled():
    view = LiveView(recording_console(), piece, n_canvases=2)
    first = step([1, 2, 3, 4], [True, True, False, False], [0.0, 0.01, 0.2, 5.0])
    text = view.styled_canvas(first)
    assert text.plain == "ABCD"
    # first step: nothing is settled yet; renoised positions are shaded by their entropy
    assert styles_by_char(text) == [STYLE_ACCEPTED, STYLE_ACCEPTED, renoised_style(0.2),
                                    renoised_style(5.0)]
    assert renoised_style(0.2) != renoised_style(5.0)
    view.on_step(first)
    second = step([1, 3, 3, 4], [True, True, True, False], [0.0, 0.0, 0.0, 3.0], k=1)
    # A unchanged + accepted = settled; B->C changed + accepted = accepted; C now accepted and
    # unchanged = settled; D still renoised
    assert styles_by_char(view.styled_canvas(second)) == [STYLE_SETTLED, STYLE_ACCEPTED,
                                                          STYLE_SETTLED, renoised_style(3.0)]


def test_thinking_is_dimmed():
    view = LiveView(recording_console(), piece)
    text = view.styled_canvas(step([1, 5, 6, 7, 2], [True] * 5, [0.0] * 5))
    assert text.plain == "A<|channel>x<channel|>B"
    styles = styles_by_char(text)
    assert styles[0] == STYLE_ACCEPTED and styles[-1] == STYLE_ACCEPTED
    assert set(styles[1:-1]) == {STYLE_THINKING}


def test_live_region_status_line_and_no_screen_clear():
    console = recording_console()
    with LiveView(console, piece, n_canvases=2, progress=True) as view:
        assert view.enabled
        view.on_step(step([1, 2, 3, 4], [True, False, True, False], [0.0, 1.0, 0.0, 4.0], k=2))
    text = console.export_text()
    assert "ABCD" in text
    assert "canvas 1/2 · step 3/48 · 12.5 ms/step" in text and "accepted 2/4" in text
    assert "diffusion canvas 1, step 3/48 [===" in text
    raw = console.file.getvalue()
    assert "\x1b[32m" in raw                              # green accepted positions
    assert "\x1b[2J" not in raw and "\x1b[?1049h" not in raw   # no full clear, no alt screen


def test_interval_redraws_every_nth_step(monkeypatch):
    console = recording_console()
    view = LiveView(console, piece, interval=3)
    view.start()
    drawn = []
    real_update = view._live.update
    monkeypatch.setattr(view._live, "update", lambda r, refresh=False: (drawn.append(1), real_update(r, refresh=refresh)))
    for k in range(7):
        view.on_step(step([1, 2], [True, True], [0.0, 0.0], k=k))
    view.stop()
    assert len(drawn) == 3                                # steps 0, 3, 6


def test_committed_lines_go_above_the_region():
    console = recording_console()
    view = LiveView(console, piece, n_canvases=2)
    view.start()
    view.on_step(step([1, 8, 2], [True] * 3, [0.0] * 3))
    done = CanvasEvent(canvas=0, tokens=[1, 8, 2], canvas_ids=[1, 8, 2], steps=1, ended=False,
                       reason=None, elapsed_ms=1.0)
    view.on_canvas(done, "first line\nsecond")
    view.on_step(step([3, 4], [True, False], [0.0, 2.0], canvas=1))
    canvas_text = view.styled_canvas(step([3, 4], [True, True], [0.0, 0.0], canvas=1)).plain
    view.stop()
    assert "first line" in console.export_text()
    assert canvas_text.startswith("second")              # the unfinished line stays in the region
    assert view.pending_text() == "second"


def test_switches_off_without_a_terminal():
    out = io.StringIO()
    view = LiveView(Console(file=out), piece)
    assert not view.enabled
    with view:
        view.on_step(step([1], [True], [0.0]))
    assert out.getvalue() == ""


def test_progress_line():
    out = io.StringIO()
    line = ProgressLine(out, enabled=True)
    line.step(step([1], [True], [0.0], k=3, steps=8))
    line.close()
    assert out.getvalue().startswith("\rdiffusion step: 4/8 [" + "=" * 25 + " " * 25 + "] 50%")
    assert out.getvalue().endswith("\r\x1b[K")
    quiet = io.StringIO()                                 # StringIO is not a TTY: nothing drawn
    ProgressLine(quiet).step(step([1], [True], [0.0]))
    assert quiet.getvalue() == ""


@pytest.mark.slow
def test_cli_visual_on_a_terminal(tmp_path, monkeypatch):
    from _cli_fixtures import FAST, make_model, run
    model = make_model(tmp_path / "m.gguf")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    res = run(["-m", model, "-p", "x", *FAST, "--diffusion-visual", "--diffusion-visual-progress",
               "-s", "3"])
    assert res.exit_code == 0, res.stderr
    assert "step 2/2" in res.stdout and "\x1b[" in res.stdout      # the region was drawn
    monkeypatch.delenv("TTY_COMPATIBLE")
    ref = json.loads(run(["-m", model, "-p", "x", *FAST, "-s", "3", "--json"]).stdout)
    # then the answer in flow, its control characters (category Cc) shown as U+FFFD
    shown = "".join("\ufffd" if unicodedata.category(c) == "Cc" and c not in "\t\n" else c
                    for c in ref["text"])
    assert res.stdout.rstrip("\n").endswith(shown.rstrip("\n"))
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    sparse = run(["-m", model, "-p", "x", *FAST, "--diffusion-visual", "--diffusion-visual-interval",
                  "2", "-s", "3"])
    assert "step 1/2" in sparse.stdout and "step 2/2" not in sparse.stdout


def test_control_bytes_never_reach_the_terminal():
    pieces = {1: "ok", 2: "\x1b[2J", 3: "\x07", 4: "a\nb\tc"}
    view = LiveView(recording_console(), pieces.__getitem__)
    text = view.styled_canvas(step([1, 2, 3, 4], [True] * 4, [0.0] * 4)).plain
    assert "\x1b" not in text and "\x07" not in text
    assert text == "ok\ufffd[2J\ufffda\nb\tc"


def test_progress_bar_fits_a_narrow_terminal():
    console = Console(record=True, force_terminal=True, width=60, file=io.StringIO())
    view = LiveView(console, piece, progress=True)
    first = view.render(step([1], [True], [0.0], k=0)).renderables[0]
    assert len(first.plain) <= 60
