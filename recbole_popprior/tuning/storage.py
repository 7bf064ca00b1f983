"""Where a study lives: a storage URL, as in Optuna, plus the plugin's default.

- no ``--storage``: ``<output>/tuning/<study>.db`` (SQLite, embedded). With ``--n-workers>1``
  the default is the journal file ``<output>/tuning/<study>.journal`` instead, which Optuna
  recommends for several processes on one machine; once either file exists, later runs of the
  same study keep using it, so resuming never silently starts a second study.
- ``sqlite:///path.db``, ``postgresql://user:pw@host:port/db``, ``mysql+pymysql://...``: an
  Optuna ``RDBStorage`` with a heartbeat, so a worker that dies mid-trial has that trial
  marked FAIL by the next worker that starts a trial (``fail_stale_trials``).
- ``journal:PATH`` or a path ending in ``.journal``: Optuna's ``JournalStorage`` on a file, through
  :class:`~recbole_popprior.tuning.journal.CheckedJournal` (a torn last record is cut off, never
  appended to).

A storage must outlive the command: ``sqlite:///:memory:`` (and ``sqlite:///``, which SQLAlchemy
reads as memory) is refused, and so is a path that is not a regular file (``journal:/dev/null``).

The folder of a storage file must exist: the tuner creates ``<output>/tuning/`` for its
default, never the folders of a URL given with ``--storage``.
"""

from __future__ import annotations

import importlib.util
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalStorage

from recbole_popprior.errors import PopPriorError
from recbole_popprior.tuning.journal import CheckedJournal

_RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "oracle", "mssql")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and reports)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def default_storage(output: str | Path, study_name: str, n_workers: int = 1) -> str:
    """The plugin's default storage URL for ``study_name`` under ``<output>/tuning/``."""
    folder = Path(output) / "tuning"
    db, journal = folder / f"{study_name}.db", folder / f"{study_name}.journal"
    if journal.exists() or (n_workers > 1 and not db.exists()):
        return f"journal:{journal}"
    return f"sqlite:///{db}"


def _with_driver(url: str) -> str:
    """``postgresql://`` -> ``postgresql+psycopg2://`` when only psycopg2 is installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; the plugin's ``postgres`` extra
    installs psycopg2-binary, so a bare URL would otherwise fail with "No module named psycopg".
    """
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres") or not sep:
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql://{rest}"  # SQLAlchemy no longer knows the "postgres" alias


def check_storage_file(path: str | Path) -> None:
    """A storage file can be created at ``path``: its folder exists (folders are never created
    for a storage, so a typo in ``--storage`` cannot scatter databases over the disk), it is
    writable, and ``path`` is not a folder. One :class:`PopPriorError` line otherwise."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist (create it first)"
        raise PopPriorError(f"storage file {path}: the folder {folder} {what}")
    if path.is_dir():
        raise PopPriorError(f"storage file {path} is a folder")
    if path.exists() and not path.is_file():
        raise PopPriorError(f"storage file {path} is not a regular file (a device or a pipe cannot hold a study)")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PopPriorError(f"storage file {path}: cannot write in {folder} ({exc.strerror or exc})") from None


def _scheme(url: str) -> str:
    if url.startswith("journal:") or url.endswith(".journal"):
        return "journal"
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower() if ":" in url else ""
    if scheme not in _RDB_SCHEMES:
        raise PopPriorError(f"--storage must be a database URL (sqlite:///..., postgresql://...) "
                            f"or journal:PATH, got {redact(url)!r}")
    return scheme


def storage_file(url: str) -> Path | None:
    """The file a journal or SQLite storage URL names (``None`` for servers and ``:memory:``)."""
    scheme = _scheme(url)
    if scheme == "journal":
        return Path(url[len("journal:"):] if url.startswith("journal:") else url)
    path = url.split(":///", 1)[1] if scheme == "sqlite" and ":///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def check_storage(url: str) -> None:
    """Check ``url`` without opening it: a known scheme, a study that outlives the command, and, for
    a file, :func:`check_storage_file`."""
    path = storage_file(url)
    if _scheme(url) == "journal" and not str(path or "").strip(". "):
        raise PopPriorError(f"--storage {url!r} names no journal file: journal:path/to/study.journal")
    if _scheme(url) == "sqlite" and (path is None or "mode=memory" in url):
        raise PopPriorError(f"--storage {redact(url)} keeps the study in memory, lost when the command ends (and "
                            "each worker would see another one): give a file, e.g. sqlite:///tuning.db")
    if path is not None:
        check_storage_file(path)


def make_storage(url: str, *, heartbeat_interval: int | None = 60,
                 grace_period: int | None = None) -> optuna.storages.BaseStorage:
    """Open (and create) the storage at ``url``; one-line :class:`PopPriorError` on failure."""
    check_storage(url)
    scheme = _scheme(url)
    if scheme == "journal":
        try:
            return JournalStorage(CheckedJournal(str(storage_file(url))))
        except OSError as exc:
            raise PopPriorError(f"cannot open storage {redact(url)}: {exc.strerror or exc}") from None
    kwargs: dict[str, Any] = {}
    if scheme == "sqlite":
        # several processes may write: wait for SQLite's lock instead of failing at once
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    url = _with_driver(url)
    heartbeat = heartbeat_interval if heartbeat_interval and heartbeat_interval > 0 else None
    grace = (grace_period or 2 * heartbeat) if heartbeat else None
    last_error: Exception | None = None
    for attempt in range(3):  # concurrent first use can race on creating the tables
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" since optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace, **kwargs)
        except ModuleNotFoundError as exc:
            hint = " (pip install 'recbole-popprior[postgres]')" if scheme.startswith("postgres") else ""
            raise PopPriorError(f"storage {redact(url)} needs the {exc.name} package{hint}") from None
        except Exception as exc:  # noqa: BLE001 - sqlalchemy/driver errors of any kind
            last_error = exc
            time.sleep(0.5 * (attempt + 1))
    message = str(last_error).strip().splitlines()[0] if str(last_error).strip() else type(last_error).__name__
    raise PopPriorError(f"cannot open storage {redact(url)}: {message}")
