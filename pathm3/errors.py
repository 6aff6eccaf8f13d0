"""User-facing errors and the one place every CLI turns them into `error: ...` lines.

A *user* mistake (bad path, bad config, unreadable or malformed file) is raised as a
:class:`PathM3Error` subclass whose message already names the file and what to do. The CLI
wrapper :func:`run_cli` prints it as a single line on stderr and exits with the error's code:
2 for usage/config problems, 1 for data problems. Anything else is a bug and keeps its
traceback. ``--debug`` shows the traceback for user errors too.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Callable, Sequence

EXIT_DATA = 1
EXIT_USAGE = 2


class PathM3Error(Exception):
    """A mistake the user can fix; the message names the file and the fix."""

    exit_code = EXIT_DATA


class UsageError(PathM3Error):
    """Bad command-line usage or configuration (exit code 2)."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A YAML config or ``--set`` override that does not match the config schema."""


class DataError(PathM3Error):
    """A data file (bag, manifest, slide, checkpoint) that cannot be used (exit code 1)."""


class MissingWeightsError(UsageError):
    """A pretrained part was asked for but its local folder is missing or incomplete."""


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--debug`` (show full tracebacks) to a CLI parser."""
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full Python traceback for errors instead of a one-line message",
    )


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` and map user errors to one ``error:`` line and an exit code.

    Returns the exit code instead of calling :func:`sys.exit`, so tests can call it; the
    console-script entry points wrap it in ``sys.exit``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        code = main(args)
        return 0 if code is None else int(code)
    except PathM3Error as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a path that cannot be read or created: under a file, no permission, disk full
        if debug:
            raise
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return EXIT_DATA
    except UnicodeDecodeError as exc:
        if debug:
            raise
        print(f"error: a file that should be text (CSV, YAML, JSON) is binary or not UTF-8 ({exc.reason} at "
              f"byte {exc.start}); check the paths given", file=sys.stderr)
        return EXIT_DATA
    except re.error as exc:
        if debug:
            raise
        print(f"error: {exc.pattern!r}: not a valid regular expression ({exc.msg})", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def os_error_message(exc: OSError) -> str:
    """``<path>: <reason>; <what to do>`` for an OSError on a user's path."""
    path = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or str(exc)
    hints = {
        NotADirectoryError: "a part of this path is a file, not a folder; choose another location",
        FileExistsError: "a file is in the way of a folder to be created; choose another location",
        IsADirectoryError: "this is a folder; give a file",
        PermissionError: "no permission; choose a location you can write or read",
        FileNotFoundError: "check the path",
    }
    hint = next((h for kind, h in hints.items() if isinstance(exc, kind)), "check the path and the disk")
    return f"{path}: {reason}; {hint}" if path else f"{reason}; {hint}"


# --------------------------------------------------------------------------------------------
# Command-line parsing: one `error:` line for bad flags too, and values checked where they enter


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are :class:`UsageError` (one ``error:`` line, exit 2, traceback
    with ``--debug``) instead of a usage block."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def number(kind: type = int, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, example: str | None = None) -> Callable[[str], float]:
    """An argparse ``type`` that parses a finite ``kind`` and checks ``low <= value <= high`` (open
    ends with ``low_open`` / ``high_open``), e.g. ``number(int, 1)`` or ``number(float, 0, 1)``;
    ``example`` is shown in the message."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    rule = " and ".join(p for p in (lo, hi) if p)
    noun = "a whole number" if kind is int else "a number"
    hint = f", e.g. {example}" if example else ""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        bad = value is None or not math.isfinite(value) or \
            (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and (value >= high if high_open else value > high))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {noun}{' ' + rule if rule else ''}{hint}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
