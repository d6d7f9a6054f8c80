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

from .session import Session, log, report, run_turn

HELP = """commands:
  /help, /?     this help
  /clear        forget the conversation (the system prompt stays)
  /exit, /quit  leave (Ctrl-D / EOF too)
  Ctrl-C        stop the current reply"""


def chat_loop(session: Session) -> None:
    stdin = sys.stdin
    interactive = _isatty(stdin)
    visual = session.opts.diffusion_visual and not session.opts.json
    first = session.opts.prompt_text
    if interactive:
        log("diffcli chat: type /help for commands")
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
            log("diffcli: conversation cleared")
            continue
        if text.startswith("/") and text[1:].isalpha():
            # a mistyped command, not a question: sending "/claer" to the model helps no one
            log(f"diffcli: unknown command {text}; /help lists them")
            continue
        t0 = time.perf_counter()
        conv = session.conversation
        conv.add_user(line.rstrip("\n"))
        ids = conv.prompt_ids()
        try:
            result = run_turn(session, ids, visual=visual, t_start=t0)
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
