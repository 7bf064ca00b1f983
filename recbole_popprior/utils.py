"""Small shared helpers: atomic file writes, JSON output, an exclusive lock file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path`` and rename it over ``path`` on success.

    An interrupted or failing writer leaves no half file under the final name:
    the temporary file is removed and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def to_jsonable(value: Any) -> Any:
    """Convert numpy / torch scalars and arrays (and non-finite floats) into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as pretty JSON, atomically."""
    with atomic_write(path, "w") as handle:
        json.dump(to_jsonable(payload), handle, indent=2, sort_keys=False)
        handle.write("\n")
    return Path(path)


class LockBusy(Exception):
    """Another process holds the lock (:func:`exclusive_lock` with ``wait=False``)."""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, wait: bool = True) -> Iterator[None]:
    """Hold ``flock`` on ``path`` (created, and removed again on the way out). The kernel releases it
    when the holder dies, even by SIGKILL, so a stale file never blocks. ``wait=False``: raise
    :class:`LockBusy` at once when another process holds it."""
    path = Path(path)
    while True:  # the file may be unlinked by its last holder right after we open it: then retry
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(str(path)) from None
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before the unlock: a waiter then retries on a new file
        os.close(fd)
