"""Conversation mode (-cnv): llama-diffusion-cli's loop (spec §C.8) with the prompt cache kept.

The `> ` prompt and command output go to stderr (and the prompt only when stdin is a terminal),
so `diffcli -m M -cnv < questions.txt > answers.txt` leaves only the answers in answers.txt.
When stdin and stdout are both the terminal, lines are read with Python's readline: the arrow
keys edit the line and up/down recall earlier ones (history in memory only; nothing typed is
written to disk). Ctrl-C during a reply stops it and returns to the prompt; at the prompt it ends
the session. A line that is not UTF-8 is reported and skipped; the chat goes on.
Each turn re-renders the template over the whole history; the model proxy (`PrefixCachedModel`)
encodes only what the cache does not hold yet.
"""
from __future__ import annotations

import re
import sys
import time

import click

from ..errors import DiffcliError, InputError
from .images import read_images
from .text_input import not_utf8
from .session import Session, _isatty, decode_utf8, log, report, run_turn, utf8_text

HELP = """commands:
  /help, /?     this help
  /clear        forget the conversation (the system prompt stays)
  /image PATH   add an image to your next message (needs --mmproj)
  /exit, /quit  leave (Ctrl-D / EOF too)
  //text        send a message that starts with '/' ("/text")
  Ctrl-C        stop the current reply
On a terminal the arrow keys edit the line and up/down recall earlier lines."""
USAGE = ("commands: /help, /clear, /image PATH, /exit or /quit; "
         "start a line with // to send one that begins with /")
NO_ARGUMENT = ("/help", "/?", "/clear", "/exit", "/quit")
COMMANDS = (*NO_ARGUMENT, "/image")
_COMMAND_LIKE = re.compile(r"/[A-Za-z?][\w?-]*")     # "/claer" is a command; "/usr/bin" is not


def parse_command(text: str) -> tuple[str, str] | None:
    """(name, argument) when the stripped line is a slash command (known or not), else None: a
    message, such as "/usr/bin is a path" or "//x" (sent as "/x")."""
    if not text.startswith("/") or text.startswith("//"):
        return None
    parts = text.split(None, 1)
    name, arg = parts[0], (parts[1].strip() if len(parts) > 1 else "")
    if name in COMMANDS or _COMMAND_LIKE.fullmatch(name):
        return name, arg
    return None


class LineReader:
    """Where chat lines come from. readline's editing and history when stdin and stdout are both
    terminals (Python's input() uses readline only then, and prints its prompt on stdout, which
    is then the screen); otherwise the prompt goes to stderr (stdin a terminal only) and stdin is
    read line by line as bytes, each line decoded here, so one bad line costs only itself."""

    def __init__(self, stdin=None, stdout=None):
        self.stdin = stdin if stdin is not None else sys.stdin
        stdout = stdout if stdout is not None else sys.stdout
        self.interactive = _isatty(self.stdin)
        self.editing = self.interactive and _isatty(stdout) and _load_readline()
        self.n = 0

    def read(self) -> str | None:
        """The next line (without its newline), None at end of input. A line that is not UTF-8
        raises InputError (after it has been consumed)."""
        self.n += 1
        what = "the line" if self.interactive else f"line {self.n} of stdin"
        if self.editing:
            try:
                line = input("> ")
            except EOFError:
                return None
            except UnicodeDecodeError as exc:
                raise not_utf8(what, exc, note="; it was not sent", fix="type it again in UTF-8") from None
            return utf8_text(line, what)
        if self.interactive:
            try:
                click.echo("> ", err=True, nl=False)
            except OSError:     # a stderr that cannot be written: the chat still works
                pass
        buffer = getattr(self.stdin, "buffer", None)
        if buffer is None:
            line = self.stdin.readline()
            if not line:
                return None
            return utf8_text(line, what).rstrip("\r\n")
        data = buffer.readline()
        if not data:
            return None
        return decode_utf8(data, what).rstrip("\r\n")


def _load_readline() -> bool:
    try:
        import readline  # noqa: F401  (importing it is what gives input() line editing)
    except ImportError:   # e.g. Windows without pyreadline: plain lines
        return False
    return True


def chat_loop(session: Session, reader: LineReader | None = None) -> None:
    reader = reader or LineReader()
    visual = session.opts.diffusion_visual and not session.opts.json
    first = session.opts.prompt_text
    if reader.interactive:
        log("diffcli chat: type /help for commands")
    pending = read_images(session, session.opts.image)    # --image: part of the first message
    while True:
        if first is not None:
            line, first = first, None
        else:
            try:
                line = reader.read()
            except InputError as exc:
                log(f"diffcli: error: {exc.message}")
                continue
            if line is None:                       # EOF
                if reader.interactive:
                    click.echo("", err=True)
                return
        text = line.strip()
        if not text:
            continue
        command = parse_command(text)
        if command is not None:
            name, arg = command
            if name not in COMMANDS:
                # a mistyped command, not a question: sending "/claer" to the model helps no one
                log(f"diffcli: unknown command {name}; {USAGE}")
                continue
            if name in NO_ARGUMENT and arg:
                log(f"diffcli: {name} takes no argument; {USAGE}")
                continue
            if name in ("/exit", "/quit"):
                return
            if name in ("/help", "/?"):
                log(HELP)
                continue
            if name == "/clear":
                session.conversation.clear()
                pending.clear()
                log("diffcli: conversation cleared")
                continue
            if not arg:                             # /image
                log("diffcli: /image needs a file: /image PATH")
                continue
            try:        # decoded now, so a bad file is reported before the question is typed
                pending += read_images(session, [arg])
            except DiffcliError as exc:
                log(f"diffcli: error: {exc.message}")
                continue
            log(f"diffcli: {arg} ({pending[-1].n_tokens} soft tokens) goes with your next message")
            continue
        message = text[1:] if text.startswith("//") else line.rstrip("\n")
        t0 = time.perf_counter()
        conv = session.conversation
        conv.add_user(message, images=pending)
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
            if not session.opts.json:
                session.stdout.write("\n")      # the stopped reply's line stays as it was
                session.stdout.flush()
            log("diffcli: reply stopped")
            continue
        conv.add_reply(result.answer.strip())
        report(session, result)
