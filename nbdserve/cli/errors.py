"""The command line's one error path: a command (or the parser) raises CliError; ``report``
prints it as one line, ``nbdserve: error: ...``, and its status is the exit status (2 bad
usage, 1 at run time).  ``@command`` does that for a subcommand's handler."""

from __future__ import annotations

import functools
import re
import sys

PROG = "nbdserve"
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A one-line failure; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_RUNTIME):
        super().__init__(message)
        self.status = status


def report(error: CliError, prog: str = PROG) -> int:
    """Print ``error`` as one line on stderr; return its exit status."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    return error.status


def command(handler):
    """A subcommand's handler (``args -> exit status``) whose CliError is reported."""

    @functools.wraps(handler)
    def run(args) -> int:
        try:
            return handler(args)
        except CliError as e:
            return report(e)

    return run


def one_line(exc: BaseException) -> str:
    """An error's message in one line; an OSError as ``FILE: STRERROR``, without "[Errno N]"."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = re.sub(r"^\[Errno \d+\] ", "", str(exc)) or type(exc).__name__
    return " ".join(text.split())


def file_error(path: str, exc: BaseException) -> CliError:
    """The run-time CliError for ``path`` that could not be used: ``PATH: WHY``."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return CliError(f"{path}: {' '.join(text.split())}")


def find_error(exc: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``types`` inside ``exc`` (possibly an exception group), if any."""
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_error(inner, types)
            if found is not None:
                return found
    return None
