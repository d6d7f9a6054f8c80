"""User-facing errors: one line that says which file, what is wrong and what to do.

The CLI catches `DiffcliError`, prints `diffcli: error: <message>` on stderr and exits with
`exit_code` (2 = bad usage or input, 1 = runtime failure). Nothing else should be printed unless
`--verbose` asks for the traceback.
"""
from __future__ import annotations

import os

EXIT_RUNTIME = 1
EXIT_INPUT = 2


class DiffcliError(Exception):
    """An error meant for the user, not for a traceback."""

    def __init__(self, problem: str, *, path: str | os.PathLike | None = None,
                 fix: str | None = None, exit_code: int = EXIT_INPUT):
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        self.fix = fix
        self.exit_code = exit_code
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"{self.path}: {self.problem}" if self.path else self.problem
        if self.fix:
            text += f"; {self.fix}"
        return " ".join(text.split())  # always one line


class InputError(DiffcliError):
    """Bad input or usage (exit code 2)."""


class RuntimeFailure(DiffcliError):
    """Something went wrong while running (exit code 1)."""

    def __init__(self, problem: str, **kw):
        kw.setdefault("exit_code", EXIT_RUNTIME)
        super().__init__(problem, **kw)
