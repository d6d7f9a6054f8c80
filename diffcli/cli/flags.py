"""llama.cpp-style command lines on top of Click: the parser, the help groups and the log switches.

llama.cpp matches every argument whole: `-sysf`, `-no-cnv`, `-cmoe` and `-hf` are options of
their own, never short-option bundles, and an argument that is no option is an error. Click
would split an unknown `-sysf` into `-s ysf` (and `-hf x/y` into `-h`, printing the help), so
`FlagCommand` checks the arguments against its options first and refuses what is not one of them,
in one line. Its help lists the options in groups (`GROUPS`; an option says its group with
`group=`) instead of one flat list.

Nothing here imports torch or the model: `diffcli --help` and `--version` stay fast.
"""
from __future__ import annotations

import difflib
import io
import re
import sys
from typing import Any, Iterable

import click

GROUPS = ("model and placement", "generation", "sampler (entropy-bound)", "display and output",
          "chat and thinking", "server", "accepted for compatibility (no effect)")
_NUMBER = re.compile(r"-\d[\d.eE+-]*")      # a negative number: a value, not an option


class FlagOption(click.Option):
    """A Click option that knows which help group it belongs to."""

    def __init__(self, *args, group: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group


def takes_value(opt: click.Option) -> bool:
    return not opt.is_flag and not opt.count


def option_names(params: Iterable[click.Parameter]) -> dict[str, click.Option]:
    names: dict[str, click.Option] = {}
    for p in params:
        if isinstance(p, click.Option):
            for name in (*p.opts, *p.secondary_opts):
                names[name] = p
    return names


def check_args(ctx: click.Context, params: Iterable[click.Parameter], args: list[str]) -> bool:
    """Refuse an argument that is no option (llama.cpp: "invalid argument"), before Click could
    read it as bundled short options. Returns whether -v/--verbose/--log-verbose is among them."""
    names = option_names(params)
    verbose = False
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-" or _NUMBER.fullmatch(arg):
            continue
        name = arg.split("=", 1)[0] if "=" in arg else arg
        opt = names.get(name)
        if opt is None:
            close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise click.UsageError(f"unknown option {arg}{hint}", ctx=ctx)
        if opt.name == "verbose" and name in opt.opts:
            verbose = True
        if "=" in arg or not takes_value(opt):
            continue
        if getattr(opt, "_flag_needs_value", False):
            # an optional value (-fit [on|off]): the next argument, unless it is an option
            nxt = args[i] if i < len(args) else None
            if nxt is not None and not (nxt.startswith("-") and len(nxt) > 1):
                i += 1
            continue
        i += max(opt.nargs, 1)
    return verbose


class FlagCommand(click.Command):
    """A command parsed the llama.cpp way (`check_args`) whose help lists its options by group.
    `default_group`: the group of options that name none."""

    def __init__(self, *args, default_group: str = "display and output", **kwargs):
        super().__init__(*args, **kwargs)
        self.default_group = default_group

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if check_args(ctx, self.get_params(ctx), args):
            ctx.meta["verbose"] = True
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        lv = ctx.params.get("log_verbosity")
        if lv is not None and lv >= 4:
            ctx.params["verbose"] = True
        if ctx.params.get("verbose"):
            ctx.meta["verbose"] = True
        quiet = bool(ctx.params.get("log_disable")) or (lv is not None and lv <= 2)
        log_file = ctx.params.get("log_file")
        if log_file is not None:
            check_log_file(log_file, ctx.params)
        with LogRedirect(quiet, log_file):
            return super().invoke(ctx)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        format_groups(ctx, self.get_params(ctx), formatter, self.default_group)


def check_log_file(path: str, params: dict) -> None:
    """--log-file appends; still, it must not name a directory or a file the run reads."""
    import os
    from ..errors import InputError
    if os.path.isdir(path):
        raise InputError("is a directory", path=path, fix="give --log-file a file name")
    inputs = [params.get(k) for k in ("model", "file", "system_file", "mmproj",
                                      "chat_template_file", "trace")]
    inputs += list(params.get("image") or ())
    for other in inputs:
        if other and os.path.exists(other) and os.path.exists(path) \
                and os.path.samefile(other, path):
            raise InputError(f"--log-file names {other}, which this run reads or writes",
                             path=path, fix="give --log-file another file name")


def format_groups(ctx: click.Context, params: Iterable[click.Parameter],
                  formatter: click.HelpFormatter, default_group: str = "display and output",
                  title: str = "{} options") -> None:
    """One help section per group, in GROUPS order (unknown groups after)."""
    rows: dict[str, list[tuple[str, str]]] = {}
    for p in params:
        record = p.get_help_record(ctx)
        if record is None:
            continue
        group = getattr(p, "group", None) or default_group
        rows.setdefault(group, []).append(record)
    order = [g for g in GROUPS if g in rows] + [g for g in rows if g not in GROUPS]
    for group in order:
        with formatter.section(title.format(group.capitalize())):
            formatter.write_dl(rows[group])


def version() -> str:
    """The installed package's version (the root package is not the front end's to import)."""
    from importlib.metadata import PackageNotFoundError, version as installed
    try:
        return installed("diffcli")
    except PackageNotFoundError:
        return "(not installed)"


# ---- option value types ------------------------------------------------------------------

class LayerCount(click.ParamType):
    """-ngl: a number of layers, `all`, or `auto` (llama.cpp's forms); all and auto are -1."""
    name = "N|all|auto"

    def convert(self, value: Any, param, ctx) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text in ("all", "auto"):
            return -1
        try:
            return int(text)
        except ValueError:
            self.fail(f"{value!r} is not a number of layers, all or auto", param, ctx)


class Switch(click.ParamType):
    """llama.cpp's on/off values (on, enabled, true, 1 / off, disabled, false, 0) -> "on"/"off"."""
    name = "on|off"
    TRUTHY = ("on", "enabled", "true", "1")
    FALSEY = ("off", "disabled", "false", "0")

    def convert(self, value: Any, param, ctx) -> str:
        text = str(value).strip().lower()
        if text in self.TRUTHY:
            return "on"
        if text in self.FALSEY:
            return "off"
        self.fail(f"{value!r} is not on or off", param, ctx)


# ---- --log-disable, --log-file, -lv -----------------------------------------------------

# diffcli's informational lines (logs, statistics) start with one of these; answers, the chat
# prompt and error lines do not (an error line is "diffcli: error: ...")
LOG_PREFIXES = ("diffcli", "diffusion", "total time:", "throughput:")


def is_log_line(text: str) -> bool:
    return text.startswith("\r") or (text.startswith(LOG_PREFIXES)
                                     and not text.startswith("diffcli: error:"))


class LogStream(io.TextIOBase):
    """Stands in for sys.stderr while a command runs: drops the informational lines when quiet
    (--log-disable; the progress line too), and appends every line but the progress line to a
    log file (--log-file), as llama.cpp's log does."""

    def __init__(self, console, quiet: bool = False, file=None):
        super().__init__()
        self.console, self.quiet, self.file = console, quiet, file

    @property
    def encoding(self):
        return getattr(self.console, "encoding", "utf-8")

    @property
    def errors(self):
        return getattr(self.console, "errors", "strict")

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False if self.quiet else _isatty(self.console)

    def fileno(self) -> int:
        return self.console.fileno()

    def write(self, text: str) -> int:
        if self.file is not None and not text.startswith("\r"):
            self.file.write(text)
            self.file.flush()
        if not (self.quiet and is_log_line(text)):
            self.console.write(text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LogRedirect:
    """`with LogRedirect(quiet, path):` puts a LogStream in place of sys.stderr and restores it."""

    def __init__(self, quiet: bool, path: str | None):
        self.quiet, self.path, self.saved, self.file = quiet, path, None, None

    def __enter__(self):
        if not self.quiet and self.path is None:
            return self
        if self.path is not None:
            from ..errors import InputError
            try:
                self.file = open(self.path, "a", encoding="utf-8")    # appends: never truncates
            except OSError as exc:
                raise InputError(f"cannot write the log file: {exc.strerror}", path=self.path,
                                 fix="check the --log-file path") from None
        self.saved = sys.stderr
        sys.stderr = LogStream(self.saved, quiet=self.quiet, file=self.file)
        return self

    def __exit__(self, kind, exc, tb):
        if self.saved is not None:
            sys.stderr = self.saved
        if self.file is not None:
            from ..errors import DiffcliError
            if isinstance(exc, DiffcliError):     # the line main prints after this
                self.file.write(f"diffcli: error: {exc.message}\n")
            self.file.close()
        return False
