"""The `diffcli` command: mirrors `llama-diffusion-cli` (llama.cpp PR #24423).

`diffcli -m model.gguf -p "..."` runs the model (the `run` command is the default, so the flags
are the ones llama.cpp users know); `diffcli inspect FILE` and `diffcli convert HF_DIR` are the
other commands. Errors the user can fix print one line on stderr and exit 2 (bad usage or input)
or 1 (runtime failure); `--verbose` adds the traceback.
"""
from __future__ import annotations

import sys
import traceback

import click

from ..errors import EXIT_RUNTIME, DiffcliError

DEFAULT_COMMAND = "run"


class DiffcliCLI(click.Group):
    """A group whose default command is `run`, so `diffcli -m M -p P` works as in llama.cpp."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["verbose"] = "--verbose" in args
        if not args or args[0] not in self.commands:
            if args[:1] != ["--version"]:
                args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)

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
            _fail(ctx, f"internal error: {type(exc).__name__}: {exc}; rerun with --verbose for "
                       "the traceback", EXIT_RUNTIME)


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


@click.group(cls=DiffcliCLI, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffcli", message="diffcli %(version)s")
def cli() -> None:
    """diffcli: run DiffusionGemma block-diffusion GGUF models in the terminal."""


def _register() -> None:
    # Imported here, not at the top: each command module imports the group's error handling.
    from .convert import convert_cmd
    from .inspect import inspect_cmd
    from .run import run_cmd
    from .serve import serve_cmd
    cli.add_command(inspect_cmd, "inspect")
    cli.add_command(serve_cmd, "serve")
    cli.add_command(convert_cmd, "convert")
    cli.add_command(run_cmd, DEFAULT_COMMAND)


_register()


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="diffcli")


if __name__ == "__main__":
    main()
