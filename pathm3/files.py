"""Writing outputs so that nothing half-written ever carries a final name.

Every file is written under ``.<name>.tmp-<pid>`` in the same folder and renamed into place when
complete; on an error the temporary file is removed and an existing file is left untouched.
"""

from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence


def check_writable(path: str | os.PathLike) -> None:
    """Fail now (an OSError naming the path) if ``path`` could not be written later: a folder in its
    place, or a parent that is a file. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "this is a folder; give a file name", str(path))
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(parent))
            if not os.access(parent, os.W_OK):
                raise PermissionError(13, "Permission denied", str(parent))
            return


def temporary_name(path: Path) -> Path:
    """The temporary name :func:`atomic_output` writes ``path`` under (for clean-up of stale ones)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; it becomes ``path`` only if the block completes."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "this is a folder; give a file name", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def read_csv(path: str | os.PathLike, columns: Sequence[str], what: str) -> list[dict[str, str]]:
    """Rows of a small CSV the user names (``what`` says which file it should be); a missing file,
    a binary file or missing ``columns`` is a :class:`~pathm3.errors.DataError` naming the path."""
    from pathm3.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}; {what} has the columns "
                                f"{','.join(columns)}")
            return list(reader)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text CSV file; expected {what} with the columns {','.join(columns)}") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a valid CSV file ({exc}); expected {what}") from None


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping], fields: Sequence[str]) -> Path:
    """Write dict rows as CSV with a header, atomically."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(fields))
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)
