"""The `diffcli` command: mirrors `llama-diffusion-cli` (llama.cpp PR #24423).

`diffcli -m model.gguf -p "..."` runs the model (the `run` command is the default, so the flags
are the ones llama.cpp users know); `diffcli inspect FILE`, `diffcli convert HF_DIR` and
`diffcli serve -m FILE` are the other commands. Errors the user can fix print one line on stderr
and exit 2 (bad usage or input) or 1 (runtime failure); -v/--verbose adds the traceback.

Each command's module is imported only when that command runs (`COMMANDS`), so `diffcli --help`,
`--version` and a command's --help start without torch.
"""
from __future__ import annotations

import importlib
import sys
import traceback

import click

from ..errors import EXIT_RUNTIME, DiffcliError
from .flags import format_groups

DEFAULT_COMMAND = "run"
# name: (module, attribute, one line for `diffcli --help`)
COMMANDS = {
    "run": (".run", "run_cmd", "Run a model: one prompt (-p/-f/stdin) or a chat (-cnv); the "
            "default command."),
    "serve": (".serve", "serve_cmd", "Serve a model over the OpenAI API, with a live canvas "
              "page."),
    "inspect": (".inspect", "inspect_cmd", "Show a GGUF's architecture, config, tensors and the "
                "memory it needs."),
    "convert": (".convert", "convert_cmd", "Convert a Hugging Face checkpoint (or its vision "
                "tower) to GGUF."),
}
_GROUP_FLAGS = ("-h", "--help", "--version")


class DiffcliCLI(click.Group):
    """A group whose default command is `run`, so `diffcli -m M -p P` works as in llama.cpp;
    commands are loaded on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module, __package__), attr)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["verbose"] = any(a in ("-v", "--verbose", "--log-verbose") for a in args)
        if not args or (args[0] not in COMMANDS and args[0] not in _GROUP_FLAGS):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write("Usage: diffcli [run] -m FILE.gguf [-p PROMPT | -f FILE | -cnv] [OPTIONS]\n"
                        "       diffcli COMMAND [ARGS]...\n")
        formatter.write_paragraph()
        formatter.write_text("Run DiffusionGemma block-diffusion GGUF models in the terminal, "
                             "with llama-diffusion-cli's flags. The answer goes to stdout; logs, "
                             "progress and statistics go to stderr. Exit codes: 0 ok, 1 runtime "
                             "error, 2 bad usage or input.")
        with formatter.section("Commands"):
            formatter.write_dl([(name, line) for name, (_, _, line) in COMMANDS.items()])
        formatter.write_paragraph()
        formatter.write_text("`diffcli COMMAND --help` shows a command's options. Those of run "
                             "(the default command) follow.")
        format_groups(ctx, run_params(), formatter, title="{} (run)")
        with formatter.section("Examples"):
            formatter.write_text(
                'diffcli -m model.gguf -p "Why is the sky blue?"\n'
                'diffcli -hf unsloth/diffusiongemma-26B-A4B-it-GGUF:Q4_K_M -cnv\n'
                'echo "Summarise: ..." | diffcli -m model.gguf -n 512 > answer.txt\n'
                "diffcli inspect model.gguf\n"
                "diffcli serve -m model.gguf --port 8080")

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DiffcliError as exc:
            _fail(ctx, exc.message, exc.exit_code)
        except KeyboardInterrupt:
            _end_terminal_line()
            click.echo("diffcli: interrupted", err=True)
            ctx.exit(130)
        except click.UsageError as exc:   # bad flag or value: one line, exit 2
            hint = "; see diffcli --help" if exc.ctx is not None else ""
            _fail(ctx, " ".join(exc.format_message().split()).rstrip(".") + hint, 2)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except MemoryError:
            _fail(ctx, "out of memory; try a smaller quantization, a shorter prompt, or fewer "
                       "GPU layers (-ngl)", EXIT_RUNTIME)
        except Exception as exc:  # a bug or an environment problem: one line unless --verbose
            hint = "" if ctx.meta.get("verbose") else "; rerun with --verbose for the traceback"
            _fail(ctx, f"internal error: {type(exc).__name__}: {exc}{hint}", EXIT_RUNTIME)


def run_params() -> list[click.Parameter]:
    """The run command's options, without importing the run module (or torch)."""
    from .run_flags import click_options

    def holder(**kwargs):
        pass
    return list(reversed(click_options(holder).__click_params__))


def _end_terminal_line() -> None:
    # a reply cut by Ctrl-C ends mid-line; on a terminal the message below would be glued to it
    try:
        if sys.stdout.isatty():
            sys.stdout.write("\n")
            sys.stdout.flush()
    except (OSError, ValueError):
        pass


def _fail(ctx: click.Context, message: str, code: int) -> None:
    if ctx.meta.get("verbose"):
        traceback.print_exc(file=sys.stderr)
    click.echo(f"diffcli: error: {message}", err=True)
    ctx.exit(code)


def _version(ctx: click.Context, param, value) -> None:
    if value and not ctx.resilient_parsing:
        from .flags import version
        click.echo(f"diffcli {version()}")
        ctx.exit(0)


@click.group(cls=DiffcliCLI, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="Print the version and exit.")
def cli() -> None:
    """diffcli: run DiffusionGemma block-diffusion GGUF models in the terminal."""


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="diffcli")


if __name__ == "__main__":
    main()
