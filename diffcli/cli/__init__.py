"""The `diffcli` command line: one module per subcommand (`run`, `inspect`, `convert`), the run
options, the chat loop and the live view. `main` is the console entry point."""
from .main import cli, main

__all__ = ["cli", "main"]
