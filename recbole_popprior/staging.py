"""Outputs that belong together, committed as one (``--compare``, ``--beta-sweep``; issue 19, 7).

A comparison writes its run folders (``runs/seed<k>-<arm>``), tables and figures, and last
``compare.json``, whose presence says the set is complete. Written in place, a rerun with other
settings that is stopped half-way left the old ``compare.json`` beside new checkpoints. Here, as
for the converters' output pair (:mod:`recbole_popprior.converters.commit`):

1. everything is written into a hidden staging folder inside the output folder,
   ``.<kind>-<pid>-<random>``; the set in place is not touched;
2. on success the old marker (``compare.json``) is removed first: from then on no file claims
   that a set is complete;
3. each staged entry replaces its namesake (a folder by one rename, the old one moved aside);
4. the new marker is written, atomically: its appearance is the commit; the staging folder and
   what was moved aside are removed.

An error or Ctrl-C removes the staging folder; after SIGKILL it stays, and the next run in the
same output folder removes every staging folder whose process is gone. Two runs into the same
folder commit one after the other (``.<kind>.lock``): the set in place is always one run's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from recbole_popprior.utils import atomic_write, exclusive_lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out_dir: Path, kind: str) -> list[Path]:
    """Remove ``out_dir/.<kind>-<pid>-*`` staging folders whose process no longer runs."""
    removed = []
    for folder in out_dir.glob(f".{kind}-*"):
        pid = folder.name[len(kind) + 2:].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class StagedSet:
    """A staging folder for one set of outputs in ``out_dir`` (see the module docstring)."""

    def __init__(self, out_dir: Path, kind: str, marker: str):
        self.out_dir, self.kind, self.marker = Path(out_dir), kind, marker
        self.staging: Path | None = None
        self.committed = False

    def __enter__(self) -> StagedSet:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale(self.out_dir, self.kind)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.kind}-{os.getpid()}-", dir=self.out_dir))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)

    def path(self, *parts: str) -> Path:
        """Where to write ``out_dir/<parts>`` until the commit."""
        assert self.staging is not None, "use StagedSet as a context manager"
        return self.staging.joinpath(*parts)

    def final(self, value: Any) -> Any:
        """``value`` (a path, or JSON-like data holding paths) with the staging folder replaced by
        the output folder: what the paths will be once committed."""
        staged, final = str(self.staging), str(self.out_dir)
        if isinstance(value, Path):
            return Path(self.final(str(value)))
        if isinstance(value, str):
            return final + value[len(staged):] if value.startswith(staged) else value
        if isinstance(value, dict):
            return {k: self.final(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.final(v) for v in value)
        return value

    def commit(self, write_marker: Callable[[Any], None]) -> Path:
        """Steps 2-4: ``write_marker(handle)`` writes the marker's text (into a temporary file that is
        renamed over ``out_dir/<marker>``). Returns the marker's path."""
        assert self.staging is not None
        with exclusive_lock(self.out_dir / f".{self.kind}.lock"):  # two runs into one folder commit in turn
            return self._commit(write_marker)

    def _commit(self, write_marker: Callable[[Any], None]) -> Path:
        marker = self.out_dir / self.marker
        marker.unlink(missing_ok=True)
        _fsync(self.out_dir)
        aside = self.staging / ".replaced"
        aside.mkdir()
        for entry in sorted(self.staging.iterdir()):
            if entry == aside:
                continue
            target = self.out_dir / entry.name
            if target.exists() or target.is_symlink():
                os.replace(target, aside / entry.name)
            os.replace(entry, target)
        _fsync(self.out_dir)
        with atomic_write(marker, "w") as handle:
            write_marker(handle)
        self.committed = True
        return marker


def _fsync(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
