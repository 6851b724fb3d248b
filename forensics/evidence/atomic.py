"""Atomic file writes: a reader of the final name sees either the old file or the complete new one, never a part.

Every failure to write (no space, a read-only file system, no permission, a parent that is a file, a directory in
the way) is a ForensicsError naming the path, and leaves no temporary file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from forensics.errors import ForensicsError


def _cannot_write(path: Path, e: OSError) -> ForensicsError:
    return ForensicsError(path, f"cannot write: {e.strerror or e}")


@contextmanager
def atomic_writer(path: str | Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temp file in the same directory (same filesystem, so os.replace is
    atomic), moved into place when the block ends without an error and removed when it does not."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _cannot_write(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _cannot_write(path, e) from e
        raise


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically (`atomic_writer`)."""
    with atomic_writer(path, mode) as f:
        f.write(data)
    return Path(path)


@contextmanager
def staged_directory(final: str | Path) -> Iterator[Path]:
    """A directory to assemble ``final`` in: `.NAME.partial-PID` beside it, swapped into place (the old ``final``
    removed only after the swap) when the block ends without an error, removed when it does not. Staging folders
    left by processes that no longer run (killed mid-write) are removed first."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.partial-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        staging = final.parent / f".{final.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as e:
        raise _cannot_write(final, e) from e
    try:
        yield staging
        os.chmod(staging, 0o755)
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise _cannot_write(final, e) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exclusive_write_bytes(path: str | Path, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` with ``data`` only if it does not exist yet; False if another writer got there first.

    The file appears complete or not at all (written to a temp file, then hard-linked, which fails on an existing
    name instead of overwriting it as os.replace would).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _cannot_write(path, e) from e
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    except OSError as e:
        raise _cannot_write(path, e) from e
    finally:
        Path(tmp).unlink(missing_ok=True)


def check_output(path: str | Path, inputs: Iterable[str | Path]) -> Path:
    """Refuse an output path before any work is done: one that is an input (or a link to one), lies inside an input
    directory (the output would become part of the evidence it describes), is something other than a regular file,
    or whose directory cannot be written."""
    path = Path(path)
    real = path.resolve()
    for given in inputs:
        given = Path(given)
        source = given.resolve()
        if real == source or (path.exists() and given.exists() and os.path.samefile(path, given)):
            raise ForensicsError(path, f"is the input {given}: refusing to overwrite evidence")
        if source.is_dir() and real.is_relative_to(source):
            raise ForensicsError(path, f"lies inside the input model directory {given}: the output would change "
                                       f"the evidence it describes; write it elsewhere")
    if path.exists() and not path.is_file():
        what = "a directory" if path.is_dir() else "a FIFO, a device or a socket"
        raise ForensicsError(path, f"cannot write: it is {what}, not a regular file that may be replaced")
    directory = real.parent
    while not directory.exists():  # the nearest existing ancestor is where the missing folders would be made
        directory = directory.parent
    if not directory.is_dir():
        raise ForensicsError(path, f"cannot write: {directory} is not a directory")
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        raise ForensicsError(path, f"cannot write: {directory} is on a read-only file system")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ForensicsError(path, f"cannot write: permission denied in {directory}")
    return path


def write_output(path: str | Path, data: bytes, inputs: Iterable[str | Path]) -> Path:
    """`check_output` again (the inputs may have become known, or the path changed, while the work ran), then an
    atomic write: the user's output appears complete, or not at all, and never replaces an input."""
    return atomic_write_bytes(check_output(path, inputs), data)
