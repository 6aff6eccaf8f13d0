"""User-facing errors and the one place every CLI turns them into `error: ...` lines.

A *user* mistake (bad path, bad config, unreadable or malformed file) is raised as a
:class:`PathM3Error` subclass whose message already names the file and what to do. The CLI
wrapper :func:`run_cli` prints it as a single line on stderr and exits with the error's code:
2 for usage/config problems, 1 for data problems. Anything else is a bug and keeps its
traceback. ``--debug`` shows the traceback for user errors too.
"""

from __future__ import annotations

import argparse
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
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if debug:
            raise
        where = exc.filename if exc.filename is not None else ""
        print(f"error: {where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_DATA
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
