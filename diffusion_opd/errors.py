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

import errno
import os
import re
import sys
from typing import Callable, Optional, Sequence


FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # OS errors that are the user's to fix


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


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def disk_error(err: BaseException) -> Optional[int]:
    """The errno when ``err`` (or what caused it) is a full disk, a quota or a read-only file
    system, else None. Writers in Rust (safetensors) report it only in the message: "(os error 28)"."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in FULL_OR_READ_ONLY:
            return e.errno
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m and int(m.group(1)) in FULL_OR_READ_ONLY:
            return int(m.group(1))
    return None


def run_cli(main: Callable[..., Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Call ``main(argv)`` and turn a :class:`UserError` into one line on stderr + its exit code,
    and a full disk / quota / read-only file system (:func:`disk_error`) into one line + exit 2.

    Scripts end with ``sys.exit(run_cli(main))``. A second Ctrl-C (the first one asks a
    training run to stop cleanly) ends without a traceback too.
    """
    try:
        code = main(argv) if argv is not None else main()
    except UserError as err:
        print_user_error(err)
        return err.exit_code
    except Exception as err:
        code = disk_error(err)
        if code is None:
            raise
        # Not a bug: the disk. Checkpoints are written atomically, so rerunning with
        # resume_from=latest once there is room loses at most the current round.
        where = next((f" writing {e.filename}" for e in _chain(err) if getattr(e, "filename", None)), "")
        print(f"error: {errno.errorcode[code]} ({os.strerror(code)}){where}; free space (or make it writable), "
              "then rerun (a training run: with resume_from=latest)", file=sys.stderr, flush=True)
        return 2
    return int(code or 0)
