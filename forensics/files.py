"""Opening a file the way every reader and verifier must: confined to a directory after resolving symlinks, and only
if it is a regular file (a FIFO or a device named like a model file would otherwise block or read forever)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from forensics.errors import ForensicsError


def model_root(path: Path) -> Path:
    """The directory a model's files must lie in: the model directory itself, or a single-file model's directory."""
    real = Path(path).resolve()
    return real if real.is_dir() else real.parent


def confined(path: Path, root: Path | None) -> Path:
    """`path` with every symlink resolved, refused when that lies outside `root` (a shard index or a symlink naming
    ../../etc/passwd must not make the tool read, hash and record a file that is not part of the model)."""
    real = Path(path).resolve()
    if root is not None and not real.is_relative_to(root):
        raise ForensicsError(path, f"resolves to {real}, outside the model directory {root}: refused")
    return real


FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_regular(path: Path, root: Path | None = None):
    """A regular file inside `root`, opened for reading (unbuffered).

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer, and fstat on the open descriptor
    (not a stat of the name, which could be swapped before the open) decides that it is a regular file.
    """
    real = confined(path, root)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ForensicsError(path, f"cannot open for reading: {e.strerror}") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in FILE_KINDS if test(mode)), "of unknown type")
        raise ForensicsError(path, f"cannot open for reading: not a regular file ({kind})")
    os.set_blocking(fd, True)
    f = os.fdopen(fd, "rb", buffering=0)
    f.name = str(real)  # fdopen names it by its descriptor; libraries that open the file again need the path
    return f
