"""User errors at the command line: one line on stderr and exit status 2, no traceback.

A user's mistake - a bad or duplicated CSV row, an RLE run past the image, a missing image or file, a flag
value out of range - surfaces in the package as a ``ValueError``, ``KeyError`` or ``OSError`` (e.g.
``FileNotFoundError``) whose message names the file, row or value at fault. ``run`` turns it into

    severjax-<tool>: error: <message>

on stderr and exit status 2 (argparse's status for a bad command line). ``SEVERJAX_DEBUG=1`` in the
environment lets the exception through, traceback and all.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

DEBUG_ENV = "SEVERJAX_DEBUG"
EXIT_USER_ERROR = 2
# What a user's mistake raises; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, KeyError, OSError)


class UsageError(ValueError):
    """A bad command line (unknown flag, flag value of the wrong type or outside its choices)."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose command-line errors raise ``UsageError`` instead of printing the
    usage and exiting, so that ``main(argv)`` raises like every other user error and ``run`` prints one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def parser(tool: str, doc: str | None) -> ArgumentParser:
    """The argument parser of ``severjax-<tool>``, its description the tool's docstring."""
    return ArgumentParser(prog=f"severjax-{tool}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def run(tool: str, main: Callable[[], object]) -> int:
    """Calls ``main()``; returns 0, or ``EXIT_USER_ERROR`` after one line on stderr for a user error."""
    try:
        main()
    except USER_ERRORS as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"severjax-{tool}: error: {message(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def message(err: BaseException) -> str:
    """The error's message on one line (a KeyError's without the quotes ``str`` adds)."""
    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    return " ".join(str(text).split()) or type(err).__name__
