"""The converters' output pair, ``NAME.inter`` + ``NAME.summary.json``, committed as one.

**Invariant.** Whenever ``NAME.summary.json`` exists, it describes the ``NAME.inter`` beside it:
its ``inter_bytes`` and ``inter_sha256`` are that file's size and SHA-256 (``sha256sum``
prints the same digest). A ``NAME.inter`` without a summary is not a finished conversion.

The commit keeps it at every instant, also under SIGKILL between any two steps:

1. the rows go to a temporary file beside ``NAME.inter``, hashed as they are written (about
   0.3 CPU-seconds per 10M rows, some 6% of a conversion: cheap for a digest that
   ``sha256sum`` can check);
2. an older ``NAME.summary.json`` is removed (from here on no summary claims the old ``.inter``);
3. the temporary file is renamed to ``NAME.inter`` and the directory synced;
4. the new summary is written to a temporary file and renamed to ``NAME.summary.json``:
   its appearance is the commit.

An interruption before step 3 leaves the previous ``.inter`` (if any) and no summary; one
between steps 3 and 4 leaves the new, complete ``.inter`` and no summary.
:meth:`OutputPair.left_behind` says which, for the command line's last line, and
:func:`verify_output` lets a reader check a pair.

**Temporary files.** A conversion holds ``.NAME.convert.lock`` (``flock``, released by the
kernel when the process dies, even by SIGKILL) while it writes. Holding it, it removes what an
earlier conversion of ``NAME`` that was killed left: its work folder ``.NAME.convert-*`` (the
sorted buckets: up to hundreds of MB) and the temporary ``.NAME.inter.*.tmp`` and
``.NAME.summary.json.*.tmp``. A second conversion into the same folder while one runs is refused
(:meth:`OutputPair.exclusive`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Iterator

from recbole_popprior.errors import PopPriorError
from recbole_popprior.utils import LockBusy, atomic_write, exclusive_lock, write_json

__all__ = ["OutputPair", "verify_output", "file_digest"]


class _DigestWriter:
    """Counts and SHA-256-hashes the bytes written through it (polars writes in ~1 MB pieces)."""

    def __init__(self, handle: BinaryIO):
        self._handle, self._sha = handle, hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self._sha.update(data)
        self.bytes += len(data)
        return self._handle.write(data)

    def flush(self) -> None:
        self._handle.flush()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class OutputPair:
    """``out_dir/NAME.inter`` and ``out_dir/NAME.summary.json`` (see the module docstring)."""

    def __init__(self, out_dir: Path, name: str):
        self.inter = out_dir / f"{name}.inter"
        self.summary = out_dir / f"{name}.summary.json"
        self.stage = "nothing"  # nothing -> old summary removed -> inter renamed -> committed
        self._had_summary = False
        self._digest: tuple[int, str] | None = None

    def refuse_to_overwrite(self, input: Path) -> None:
        """A one-line error when an output would replace the input (by path, symlink or hard
        link) or when an output name is taken by something that is not a regular file."""
        for path in (self.inter, self.summary):
            with contextlib.suppress(OSError):  # either side missing: not the same file
                if os.path.samefile(path, input):
                    raise PopPriorError(f"the output {path} would overwrite the input {input}: "
                                        f"choose another --output or --name")
            if path.exists() and not path.is_file():
                raise PopPriorError(f"cannot write output {path}: it exists and is not a regular file")

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the pair's lock (see the module docstring) and remove a killed conversion's
        temporary files; one line when another conversion holds it."""
        folder, name = self.inter.parent, self.inter.stem
        try:
            with exclusive_lock(folder / f".{name}.convert.lock", wait=False):
                for leftover in [*folder.glob(f".{name}.convert-*"), *folder.glob(f".{self.inter.name}.*.tmp"),
                                 *folder.glob(f".{self.summary.name}.*.tmp")]:
                    if leftover.is_dir() and not leftover.is_symlink():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink(missing_ok=True)
                yield
        except LockBusy:
            raise PopPriorError(f"another conversion is writing {self.inter.name} in {folder} right now; "
                                "wait for it, or choose another --output or --name") from None

    @contextlib.contextmanager
    def writing_inter(self) -> Iterator[_DigestWriter]:
        """Steps 1-3: a hashing handle on the temporary ``.inter``; on a clean exit, remove
        the old summary, then rename the ``.inter`` into place."""
        with atomic_write(self.inter, "wb") as raw:
            writer = _DigestWriter(raw)
            yield writer
            self._had_summary = self.summary.exists()
            self.summary.unlink(missing_ok=True)
            self.stage = "old summary removed"
            self._digest = writer.bytes, writer.hexdigest()
        self.stage = "inter renamed"
        _fsync_dir(self.inter.parent)  # the rename reaches the disk before the summary's

    def commit(self, summary: dict) -> dict:
        """Step 4: add the ``.inter``'s size and digest to ``summary`` and write it."""
        if self._digest is None:
            raise RuntimeError("commit() before writing_inter() finished")
        summary["inter_bytes"], summary["inter_sha256"] = self._digest
        write_json(self.summary, summary)
        self.stage = "committed"
        return summary

    def left_behind(self) -> str:
        """What an interrupted run left under the final names, in a few words."""
        if self.stage == "inter renamed":
            return f"wrote {self.inter} but not its summary: the conversion is incomplete, run it again"
        if self.stage == "old summary removed" and self._had_summary:
            return f"no output written; the previous {self.summary.name} was removed"
        if self.stage == "committed":
            return f"the output {self.inter} is complete"
        return "no output written"


def file_digest(path: str | os.PathLike, block: int = 1 << 22) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of a file."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while data := handle.read(block):
            sha.update(data)
            size += len(data)
    return size, sha.hexdigest()


def verify_output(inter_path: str | os.PathLike) -> dict:
    """The summary of ``NAME.inter`` if it describes that file; else a one-line error."""
    inter = Path(inter_path)
    summary_path = inter.with_suffix(".summary.json")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PopPriorError(f"{inter} has no summary {summary_path.name}: an unfinished conversion?") from None
    except (OSError, ValueError) as exc:
        raise PopPriorError(f"cannot read {summary_path}: {exc}") from None
    try:
        found = file_digest(inter)
    except OSError as exc:
        raise PopPriorError(f"cannot read {inter}: {exc.strerror or exc}") from None
    if (summary.get("inter_bytes"), summary.get("inter_sha256")) != found:
        raise PopPriorError(f"{summary_path.name} does not describe {inter} (size or SHA-256 differ)")
    return summary


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
