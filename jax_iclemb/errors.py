"""The one error path of every command-line tool.

Errors whose message is the whole story (a config key, a data file and line, a path, and what is
allowed) are `ReportedError`s; `UserError` is the kind caused by the user's input. A CLI's `main`
wrapped with `@cli` prints such an error as one `error: ...` line on stderr and returns its exit
code (2 for user errors), without a traceback; `--debug` or JAX_ICLEMB_DEBUG=1 adds the traceback.
Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

DEBUG_ENV = "JAX_ICLEMB_DEBUG"
DEBUG_FLAG = "--debug"


class ReportedError(Exception):
    """A failure explained by its message alone: printed without a traceback, exit code 1."""

    exit_code = 1


class UserError(ReportedError):
    """Bad input from the user: a config value, a data file, a path. Exit code 2."""

    exit_code = 2


class BadValue(UserError, ValueError):
    """A value the user gave (config, record, flag) that cannot be used."""


class MissingPath(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or lacks what it must hold)."""


class PathExists(UserError, FileExistsError):
    """An output the user named exists and would be overwritten."""


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Declare `--debug` (read by `cli`) so that `--help` lists it and argparse accepts it."""
    parser.add_argument(
        DEBUG_FLAG, action="store_true",
        help=f"show the traceback of an error (or set {DEBUG_ENV}=1)",
    )


def debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def cli(main: Callable[..., int]) -> Callable[..., int]:
    """`main(argv, **options) -> exit code`, with `ReportedError`s turned into a message and their
    code; argv defaults to the command line."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None, **options: Any) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            return main(argv, **options)
        except ReportedError as e:
            if debug_requested(argv):
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code

    return wrapped
