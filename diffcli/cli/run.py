"""`diffcli run` (the default command): llama-diffusion-cli's flags (spec §C.8) -> options
dataclasses -> a session (model + tokenizer + sampler) -> one prompt, or the chat loop (-cnv).

Shell contract: the answer alone on stdout; logs, progress and statistics on stderr; exit 0 ok,
1 runtime error, 2 bad usage or input. The prompt comes from -p, -f, `-p -` (stdin) or stdin when it
is a pipe.
"""
from __future__ import annotations

import os
import sys
import time

import click

from .chat import chat_loop
from .flags import FlagCommand
from .images import read_images
from .options import RunOptions
from .run_flags import click_options
from .session import OutputError, Session, open_session, report, run_turn


@click.command("run", cls=FlagCommand, context_settings={"help_option_names": ["-h", "--help"],
                                        "ignore_unknown_options": False})
@click_options
def run_cmd(**kwargs) -> None:
    """Run a DiffusionGemma GGUF: one prompt (-p/-f/stdin) or a chat (-cnv).

    \b
    Examples:
      diffcli -m model.gguf -p "Why is the sky blue?"
      echo "Summarise: ..." | diffcli -m model.gguf -n 512 > answer.txt
      diffcli -m model.gguf -cnv --diffusion-visual
      diffcli -m model.gguf -p "2+2?" --json | jq .text

    The answer goes to stdout; logs, progress and statistics go to stderr. Exit codes: 0 ok,
    1 runtime error, 2 bad usage or input. The default seed is 4294967295 (0xFFFFFFFF, as in
    llama.cpp), so runs are reproducible; pass -s N for another one.

    Other commands: `diffcli inspect FILE.gguf`, `diffcli convert HF_DIR -o OUT.gguf`,
    `diffcli serve -m FILE.gguf` (an OpenAI-compatible server).
    """
    opts = RunOptions.from_click(kwargs)
    session = open_session(opts)
    try:
        try:
            if opts.conversation:
                chat_loop(session)
            else:
                run_single(session)
        finally:
            if session.trace is not None:
                session.trace.close()
    except BrokenPipeError:      # `diffcli ... | head -1`: the reader left; not an error
        _silence_stdout()
    except OutputError as exc:   # `> /dev/full`: one line (main's handler); Python's flush of
        if exc.stdout:           # stdout at exit must not fail a second time
            _silence_stdout()
        raise


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; point it at /dev/null so that raises nothing.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def run_single(session: Session) -> None:
    t0 = time.perf_counter()
    conv = session.conversation
    conv.add_user(session.opts.prompt_text, images=read_images(session, session.opts.image))
    ids, images = conv.prompt()
    result = run_turn(session, ids, visual=session.opts.diffusion_visual and not session.opts.json,
                      t_start=t0, images=images)
    report(session, result)

