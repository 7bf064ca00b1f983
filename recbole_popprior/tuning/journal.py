"""Optuna's journal file, never appended to when its last record is torn (issue 19, 3).

``JournalFileBackend`` writes one JSON record per line. A writer killed mid-write (or a file cut
short by hand) leaves a last line without its ``\\n``: Optuna's reader skips it, but the next
append lands right after it, and the two records make one line that is no JSON. From then on
every read of the study fails with ``JSONDecodeError``, for every later command, and the records
after the merged line are lost to Optuna.

:class:`CheckedJournal` looks at the file under the journal's own lock (so no live writer is
half-way through a record) when it is opened and before every append:

- a torn last record (bytes after the last ``\\n``) was never a record: no reader has taken it.
  The file as it was is copied to ``<journal>.torn-<UTC time>``, the torn bytes are cut off, and
  one WARNING says so; the intact records are all kept;
- a complete line that is not a JSON record (what the old append left) is refused with one
  line: the records before it are intact, and the message says how to copy them into a new
  journal (``head -n``); nothing is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from optuna.storages.journal import JournalFileBackend

from recbole_popprior.errors import PopPriorError

logger = logging.getLogger("recbole_popprior.tuning")
_TAIL = 1 << 16


def _tail_start(path: Path) -> int:
    """Offset just after the file's last ``\\n`` (0 when it has none)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        end = size
        while end > 0:
            start = max(0, end - _TAIL)
            handle.seek(start)
            cut = handle.read(end - start).rfind(b"\n")
            if cut >= 0:
                return start + cut + 1
            end = start
    return 0


def first_bad_line(path: Path) -> tuple[int, str] | None:
    """``(line number, reason)`` of the first complete line that is not a JSON record, or None."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                return None  # the torn tail: repaired, not refused
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:
                return number, str(exc).splitlines()[0][:80]
            if not isinstance(record, dict):
                return number, f"a JSON {type(record).__name__}, not a record"
    return None


class CheckedJournal(JournalFileBackend):
    """``JournalFileBackend`` that repairs a torn tail and refuses a corrupt line (module docstring)."""

    def __init__(self, file_path: str, lock_obj: Any = None) -> None:
        super().__init__(file_path, lock_obj)
        path = Path(file_path)
        with self._locked():
            bad = first_bad_line(path)
            if bad is not None:
                number, reason = bad
                raise PopPriorError(
                    f"journal {path} is corrupt at line {number} ({reason}); its {number - 1} records before it "
                    f"are intact: copy them into a new journal with `head -n {number - 1} {path} > new.journal` "
                    "and pass --storage=journal:new.journal (the file itself is left as it is)")
            self._repair_tail(path)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Optuna's append, after cutting off a torn tail left by a writer that died since."""
        with self._locked():
            self._repair_tail(Path(self._file_path))
            text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
            with open(self._file_path, "ab") as handle:
                handle.write(text.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The journal's own lock (the one Optuna's appends take)."""
        self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    @staticmethod
    def _repair_tail(path: Path) -> None:
        """Keep the file up to its last ``\\n``; the whole file as it was goes to a ``.torn-`` copy."""
        size = path.stat().st_size
        keep = _tail_start(path) if size else 0
        if keep == size:
            return
        saved = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}")
        shutil.copy2(path, saved)
        with open(path, "r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
        logger.warning(f"journal {path} ended in a torn record ({size - keep} bytes after its last complete line, "
                       f"written by a process that was stopped mid-write?); its complete records are kept, and the "
                       f"file as it was is saved as {saved.name}")
