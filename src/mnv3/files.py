"""Atomic file writes: a temporary file in the same folder, then a rename, so a crash never leaves
a half-written result behind."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


class OutputError(ValueError):
    """An output path cannot be written; the message names the path, the flag and why."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` and move the result onto `path` only when it succeeded. The file gets
    the mode `open()` would give it (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cache_dir() -> Path:
    """Where downloads and conversions are kept between runs: $MNV3_CACHE, else ~/.cache/mnv3."""
    return Path(os.environ.get("MNV3_CACHE") or Path.home() / ".cache" / "mnv3")


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_csv(path: str | Path, rows: list[dict]) -> Path:
    """A CSV file with a header from the first row's keys."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def check_writable(path: str | Path, *, kind: str = "file", flag: str = "output") -> Path:
    """Raise OutputError unless `path` can be written as a file (or created as a folder, `kind="dir"`):
    checked by creating a file in the nearest existing folder, so a read-only file system, a
    missing permission or a file where a folder should be are all found before any work starts."""
    path = Path(path)
    where = f"{flag} {path}"
    if kind == "file" and path.is_dir():
        raise OutputError(f"{where}: is a folder; give a file name")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise OutputError(f"{where}: is a file, not a folder; choose another {flag}")
    if path.exists() and kind == "file" and not os.access(path, os.W_OK):
        raise OutputError(f"{where}: the file is not writable; choose another {flag}")
    folder = path if kind == "dir" else path.parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{where}: {existing} is a file, so no folder can be created under it; "
                          f"choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mnv3-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise OutputError(f"{where}: cannot write in {existing} ({why}); choose another {flag}") from None
    return path


def unused_path(path: str | Path) -> Path:
    """`path` if nothing is there yet, else the first free `stem-2.suffix`, `stem-3.suffix`, ...:
    for default output names, which must never silently replace an earlier result."""
    path = Path(path)
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def append_csv(path: str | Path, rows: list[dict]) -> tuple[Path, str]:
    """Add `rows` to the CSV at `path` when its columns are the same; when `path` holds a CSV with
    other columns (or something else), write a new file beside it instead. Returns (the file
    written, "appended" | "written" | "new file")."""
    path = Path(path)
    if not path.exists():
        return atomic_write_csv(path, rows), "written"
    columns = list(rows[0]) if rows else []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            old = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error):
        header, old = [], []
    if header == columns:
        return atomic_write_csv(path, old + rows), "appended"
    return atomic_write_csv(unused_path(path), rows), "new file"
