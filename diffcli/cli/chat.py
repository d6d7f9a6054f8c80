"""Conversation mode (-cnv): llama-diffusion-cli's loop (spec §C.8) with the prompt cache kept.

The `> ` prompt and command output go to stderr (and the prompt only when stdin is a terminal),
so `diffcli -m M -cnv < questions.txt > answers.txt` leaves only the answers in answers.txt.
Ctrl-C during a reply stops it and returns to the prompt; at the prompt it ends the session.
Each turn re-renders the template over the whole history; the model proxy (`PrefixCachedModel`)
encodes only what the cache does not hold yet.
"""
from __future__ import annotations

import sys
import time

import click

from ..errors import DiffcliError
from .images import read_images
from .session import Session, log, report, run_turn

HELP = """commands:
  /help, /?     this help
  /clear        forget the conversation (the system prompt stays)
  /image PATH   add an image to your next message (needs --mmproj)
  /exit, /quit  leave (Ctrl-D / EOF too)
  Ctrl-C        stop the current reply"""


def chat_loop(session: Session) -> None:
    stdin = sys.stdin
    interactive = _isatty(stdin)
    visual = session.opts.diffusion_visual and not session.opts.json
    first = session.opts.prompt_text
    if interactive:
        log("diffcli chat: type /help for commands")
    pending = read_images(session, session.opts.image)    # --image: part of the first message
    while True:
        if first is not None:
            line, first = first, None
        else:
            if interactive:
                click.echo("> ", err=True, nl=False)
            line = stdin.readline()
            if not line:                       # EOF
                if interactive:
                    click.echo("", err=True)
                return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text in ("/help", "/?"):
            log(HELP)
            continue
        if text == "/clear":
            session.conversation.clear()
            pending.clear()
            log("diffcli: conversation cleared")
            continue
        if text == "/image" or text.startswith("/image "):
            path = text[len("/image"):].strip()
            if not path:
                log("diffcli: /image needs a file: /image PATH")
                continue
            try:        # decoded now, so a bad file is reported before the question is typed
                pending += read_images(session, [path])
            except DiffcliError as exc:
                log(f"diffcli: error: {exc.message}")
                continue
            log(f"diffcli: {path} ({pending[-1].n_tokens} soft tokens) goes with your next message")
            continue
        if text.startswith("/") and text[1:].isalpha():
            # a mistyped command, not a question: sending "/claer" to the model helps no one
            log(f"diffcli: unknown command {text}; /help lists them")
            continue
        t0 = time.perf_counter()
        conv = session.conversation
        conv.add_user(line.rstrip("\n"), images=pending)
        pending = []
        try:
            ids, slots = conv.prompt()
        except DiffcliError as exc:     # e.g. <__media__> markers that do not match the images
            conv.drop_last_user()
            log(f"diffcli: error: {exc.message}")
            continue
        try:
            result = run_turn(session, ids, visual=visual, t_start=t0, images=slots)
        except KeyboardInterrupt:
            conv.drop_last_user()
            click.echo("", err=False)
            log("diffcli: reply stopped")
            continue
        conv.add_reply(result.answer.strip())
        report(session, result)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
