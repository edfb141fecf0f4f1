"""The one user-facing error type, and the one place that prints it.

A :class:`UserError` is something the user can fix (a config key, a file, a value): its message
names what is wrong and what to do. Every script's entry point goes through :func:`run_cli`,
which prints such an error as ONE line on stderr and returns its exit code, so no Python
traceback reaches the user for a mistake of theirs. Anything else is a bug and keeps its
traceback.

Domain errors subclass both ``UserError`` and the built-in they always were
(``ConfigError(UserError, ValueError)``...), so existing ``except ValueError`` still catches them.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence


class UserError(Exception):
    """A mistake the user can fix; printed as one line by :func:`run_cli`."""

    exit_code = 2  # usage error; subclasses may choose another (1: something to fetch first)


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message starts with the key."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined with '; ', or with
    a space after a line ending in ':')."""
    out = ""
    for line in (line.strip() for line in str(err).splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out or type(err).__name__


def print_user_error(err: BaseException, file=None) -> None:
    print(f"error: {one_line(err)}", file=file or sys.stderr, flush=True)


def run_cli(main: Callable[..., Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Call ``main(argv)`` and turn a :class:`UserError` into one line on stderr + its exit code.

    Scripts end with ``sys.exit(run_cli(main))``. A second Ctrl-C (the first one asks a
    training run to stop cleanly) ends without a traceback too.
    """
    try:
        code = main(argv) if argv is not None else main()
    except UserError as err:
        print_user_error(err)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    return int(code or 0)
