# Over 500 lines: one table of every bad input, so that each case runs through the same checks of stderr and disk.
"""Bad input to the command lines, as one table: each case must end with exactly one ``error:``
line on stderr (no traceback), its exit status, and nothing written or changed on disk.

The entry points: ``convert`` (``python -m recbole_popprior.convert``), ``cli``
(``recbole_popprior.cli:main``), ``console`` (the ``recbole-popprior`` console script, found
through the installed entry points) and ``script`` (``run_recbole_popprior.py``). Cases run in
this process (``main(argv)``, stderr captured, ``SystemExit`` taken as the status; any other
exception fails the test with its traceback), except those that need a real process (a signal):
``process`` runs those.

To add a case, append a :class:`Case` to ``CASES`` (converters) or ``CLI_CASES``; ``setup``
makes its files under ``{tmp}``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import io
import json
import logging
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import free_port, tiny_rows, write_inter

ROOT = Path(__file__).resolve().parent.parent
CONVERT = "recbole_popprior.convert"
GOOD = b"".join(f"{u},{u % 7 + 1},3,pv,{1511539200 + 60 * u}\n".encode() for u in range(1, 201))
ALIBABA_HEADER = b"user_id,item_id,behavior_type,user_geohash,item_category,time\n"


# ----------------------------------------------------------------------------- the table


def files(contents: dict[str, bytes]) -> Callable[[Path], None]:
    """A setup writing ``{tmp}/<name>`` for each entry."""
    def make(tmp: Path) -> None:
        for name, data in contents.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return make


#: the default setup: a good tianchi log ``{tmp}/u.csv`` and a good alibaba log ``{tmp}/a.csv``
good_logs = files({"u.csv": GOOD, "a.csv": ALIBABA_HEADER + b"1,2,1,,3,2014-12-01 10\n"})


def good_logs_and(make: Callable[[Path], None]) -> Callable[[Path], None]:
    def both(tmp: Path) -> None:
        good_logs(tmp)
        make(tmp)
    return both


@dataclass(frozen=True)
class Case:
    """One bad invocation: ``{tmp}`` in ``argv`` is the test's own directory."""

    name: str
    argv: tuple[str, ...]
    status: int
    words: tuple[str, ...]  # each must appear (case-insensitive) in the one error line
    setup: Callable[[Path], None] = good_logs
    entry: str = "convert"  # convert | cli | console | script
    may_leave: tuple[str, ...] = field(default=())  # fnmatch globs of files the run may create
    process: Callable[[Case, Path], tuple[int, str]] | None = None  # runs the case in a real process
    logs: bool = False  # log lines may precede the error line (the error line is then the last)
    check: Callable[[Path], None] | None = None  # more checks of what is on disk afterwards


def _zip(*members: tuple[str, bytes]) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        with zipfile.ZipFile(tmp / "log.zip", "w") as archive:
            for name, data in members:
                archive.writestr(name, data)
    return make


def _corrupt_gzip(tmp: Path) -> None:
    raw = bytearray(gzip.compress(GOOD * 20))
    raw[len(raw) // 2: len(raw) // 2 + 32] = bytes(32)
    (tmp / "log.csv.gz").write_bytes(bytes(raw))


def _truncated_gzip(tmp: Path) -> None:
    raw = gzip.compress(GOOD * 20)
    (tmp / "log.csv.gz").write_bytes(raw[: len(raw) // 2])


def _output_is_input(link: str, target: str = "tianchi.inter") -> Callable[[Path], None]:
    """The raw log stored where the output would go (``{tmp}/d/tianchi/<target>``), given as
    ``{tmp}/raw.csv`` through a symlink, a hard link, or (``link="none"``) by that path."""
    def make(tmp: Path) -> None:
        path = tmp / "d" / "tianchi" / target
        path.parent.mkdir(parents=True)
        path.write_bytes(GOOD)
        if link == "symlink":
            (tmp / "raw.csv").symlink_to(path)
        elif link == "hardlink":
            (tmp / "raw.csv").hardlink_to(path)
    return make


def _mkdir(*names: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        for name in names:
            (tmp / name).mkdir(parents=True)
    return make


def tianchi(*extra: str, src: str = "{tmp}/u.csv") -> tuple[str, ...]:
    return ("tianchi", "--input", src, "--output", "{tmp}/out", "--no-progress", *extra)


SAMPLE_WORDS = ("--sample-users", "fraction in (0, 1]")
CASES = [  # the converters (python -m recbole_popprior.convert)
    # the input file
    Case("missing input", tianchi(src="{tmp}/nope.csv"), 2, ("input file not found", "nope.csv")),
    Case("empty input", tianchi(src="{tmp}/e.csv"), 2, ("empty",), files({"e.csv": b""})),
    Case("directory as input", tianchi(src="{tmp}/dir"), 2, ("not a regular file",), _mkdir("dir")),
    Case("blank lines only", tianchi(), 2, ("no data rows",), files({"u.csv": b"\n \n\n"})),
    Case("binary input without newlines", tianchi(), 2, ("not a csv log",), files({"u.csv": bytes(range(1, 10)) * 250_000})),
    Case("zip with two csv files", tianchi(src="{tmp}/log.zip"), 2, ("exactly one .csv", "a.csv", "b.csv"),
         _zip(("a.csv", GOOD), ("b.csv", GOOD))),
    Case("zip without a csv file", tianchi(src="{tmp}/log.zip"), 2, ("exactly one .csv", "readme.txt"),
         _zip(("readme.txt", b"hello"))),
    Case("corrupt zip", tianchi(src="{tmp}/log.zip"), 2, ("cannot read zip",),
         files({"log.zip": b"PK\x03\x04" + bytes(100)})),
    Case("corrupt gzip", tianchi(src="{tmp}/log.csv.gz"), 2, ("cannot read input", "corrupt"), _corrupt_gzip),
    Case("truncated gzip", tianchi(src="{tmp}/log.csv.gz"), 2, ("cannot read input",), _truncated_gzip),
    Case("header-only alibaba file", ("alibaba", "--input", "{tmp}/a.csv", "--output", "{tmp}/out"), 2,
         ("no data rows", "after its header"), files({"a.csv": ALIBABA_HEADER})),
    Case("alibaba file without its header", ("alibaba", "--input", "{tmp}/u.csv", "--output", "{tmp}/out"), 2,
         ("unexpected header", "user_id,item_id,behavior_type"), files({"u.csv": GOOD})),
    Case("all rows malformed", tianchi(), 2,
         ("no valid rows", "all 3 data rows are malformed", "column_count 2", "bad_id 1", "first at line 1",
          "column count", "'1,2,3'"), files({"u.csv": b"1,2,3\nx,2,3,pv,1511539300\n4,5\n"})),
    Case("a RecBole atomic file as input", tianchi(), 2, ("all 3 data rows are malformed", "column_count 3"),
         files({"u.csv": b"user_id:token\titem_id:token\ttimestamp:float\n1\t2\t1511539300\n3\t4\t1511539301\n"})),
    Case("too many bad rows", tianchi("--max-bad-rows", "2"), 2,
         ("too many bad rows (3 > --max-bad-rows 2)", "first at line 3", "'1,2'"),
         files({"u.csv": b"".join(GOOD.splitlines(keepends=True)[:2]) + b"1,2\n" * 3 + GOOD})),
    Case("every row filtered out by the window", tianchi("--start", "2017-12-05", "--end", "2017-12-06"), 2,
         ("no rows left after filtering", "out of window 200", "--start/--end")),
    Case("the k-core empties the log", tianchi("--k-core", "1000"), 2, ("no rows left", "k core 200")),
    # options
    Case("unknown kind", ("taobao", "--input", "{tmp}/u.csv", "--output", "{tmp}/out"), 2,
         ("invalid choice", "taobao")),
    Case("missing --input", ("tianchi", "--output", "{tmp}/out"), 2, ("required", "--input")),
    Case("unknown option", tianchi("--frobnicate"), 2, ("unrecognized arguments", "--frobnicate")),
    Case("bad --behaviors", tianchi("--behaviors", "pv,view"), 2, ("unknown tianchi behaviour", "'view'")),
    Case("empty --behaviors", tianchi("--behaviors", ","), 2, ("--behaviors is empty",)),
    Case("alibaba code out of range", ("alibaba", "--input", "{tmp}/a.csv", "--output", "{tmp}/out",
                                       "--behaviors", "5"), 2, ("unknown alibaba behaviour", "'5'")),
    Case("unreadable --start", tianchi("--start", "yesterday"), 2, ("cannot read time", "'yesterday'")),
    Case("impossible --end date", tianchi("--end", "2017-02-30"), 2, ("cannot read time", "2017-02-30")),
    Case("--start after --end", tianchi("--start", "2017-12-02", "--end", "2017-12-01"), 2,
         ("empty time window", "2017-12-02T00:00:00+08:00")),
    Case("--start beyond any date", tianchi("--start", "99999999999999999999"), 2, ("out of range",)),
    Case("negative --k-core", tianchi("--k-core", "-1"), 2, ("--k-core", "non-negative", "-1")),
    Case("non-integer --k-core", tianchi("--k-core", "abc"), 2, ("--k-core", "invalid int value")),
    Case("negative --max-bad-rows", tianchi("--max-bad-rows", "-1"), 2, ("--max-bad-rows", "non-negative")),
    Case("--workers 0", tianchi("--workers", "0"), 2, ("--workers", "from 1 to 64")),
    Case("--workers too many", tianchi("--workers", "100000"), 2, ("--workers", "from 1 to 64")),
    Case("bad --name", tianchi("--name", "../x"), 2, ("bad dataset name", "'../x'")),
    Case("--sample-users 0", tianchi("--sample-users", "0"), 2, SAMPLE_WORDS + ("'0'",)),
    Case("--sample-users 1.5", tianchi("--sample-users", "1.5"), 2, SAMPLE_WORDS + ("'1.5'",)),
    Case("--sample-users nan", tianchi("--sample-users", "nan"), 2, SAMPLE_WORDS + ("'nan'",)),
    Case("--sample-users inf", tianchi("--sample-users", "inf"), 2, SAMPLE_WORDS),
    Case("--sample-users negative", tianchi("--sample-users=-0.5"), 2, SAMPLE_WORDS),
    Case("--sample-users abc", tianchi("--sample-users", "abc"), 2, SAMPLE_WORDS + ("'abc'",)),
    Case("--sample-users keeps nobody", tianchi("--sample-users", "1e-30"), 2,
         ("no rows left", "sample users 200", "--sample-users")),
    # the output
    Case("output is the input", ("tianchi", "--input", "{tmp}/d/tianchi/tianchi.inter", "--output", "{tmp}/d"),
         2, ("would overwrite the input", "tianchi.inter"), _output_is_input("none")),
    Case("output is the input through a symlink", ("tianchi", "--input", "{tmp}/raw.csv", "--output", "{tmp}/d"),
         2, ("would overwrite the input", "tianchi.inter"), _output_is_input("symlink")),
    Case("output is the input through a hard link", ("tianchi", "--input", "{tmp}/raw.csv", "--output", "{tmp}/d"),
         2, ("would overwrite the input", "tianchi.inter"), _output_is_input("hardlink")),
    Case("summary is the input", ("tianchi", "--input", "{tmp}/d/tianchi/tianchi.summary.json", "--output", "{tmp}/d"),
         2, ("would overwrite the input", "tianchi.summary.json"), _output_is_input("none", "tianchi.summary.json")),
    Case("a file in the way of the output directory", tianchi()[:3] + ("--output", "{tmp}/blocker/sub"), 2,
         ("cannot write output directory", "blocker"), good_logs_and(files({"blocker": b"a file, not a directory"}))),
    Case("output .inter is a directory", tianchi(), 2, ("not a regular file", "tianchi.inter"),
         good_logs_and(_mkdir("out/tianchi/tianchi.inter"))),
]


# ----------------------------------------------------------------------------- the plugin's command line

INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
GOOD_ROWS = "".join(f"{u}\t{i}\t{10 * u + i}\n" for u in range(1, 6) for i in range(1, 6))
LEAVE_ONE_OUT = ("leave-one-out gives a user's first example to train",)
MALFORMED = {  # name -> (.inter text, words of the error line)
    "badfloat": (f"{INTER_HEADER}\n{GOOD_ROWS}6\t1\tabc\n", ("badfloat.inter line 27", "timestamp", "'abc'")),
    # (rows with more or fewer fields than the header are read as RecBole reads them, with a warning:
    # tests/test_atomic_files.py)
    "unknowntype": ("user_id:token\titem_id:tokn\ttimestamp:float\n" + GOOD_ROWS,
                    ("unknowntype.inter", "column 'item_id'", "unknown type 'tokn'")),
    "headeronly": (f"{INTER_HEADER}\n", ("headeronly.inter", "no data rows")),
    "commas": (INTER_HEADER.replace("\t", ",") + "\n" + GOOD_ROWS.replace("\t", ","),
               ("commas.inter", "not name:type", "tab-separated")),
    # issue 19, 5: RecBole fails later on these with AttributeError: 'NoneType' object has no attribute ...
    "noitem": ("user_id:token\tproduct:token\ttimestamp:float\n" + GOOD_ROWS,
               ("noitem.inter has no column 'item_id' (ITEM_ID_FIELD)", "product:token")),
    "othernames": ("uid:token\tiid:token\tts:float\n" + GOOD_ROWS,
                   ("othernames.inter has no column 'user_id' (USER_ID_FIELD)", "uid:token, iid:token, ts:float")),
    "bom": ("\ufeff" + INTER_HEADER + "\n" + GOOD_ROWS, ("bom.inter starts with a byte-order mark", "utf-8-sig")),
    "floatitem": (INTER_HEADER.replace("item_id:token", "item_id:float") + "\n" + GOOD_ROWS,
                  ("floatitem.inter", "'item_id' (ITEM_ID_FIELD) must be of type token, got float")),
    "sequser": (INTER_HEADER.replace("user_id:token", "user_id:token_seq") + "\n" + GOOD_ROWS,
                ("sequser.inter", "'user_id' (USER_ID_FIELD) must be of type token, got token_seq")),
    # issue 19, 5 and 13: one event per user fails in torch's sampler; two train on nothing and test nothing
    "oneevent": (INTER_HEADER + "\n" + "".join(f"{u}\t{u % 5 + 1}\t{u}\n" for u in range(1, 40)),
                 ("dataset 'oneevent': the train split is empty", *LEAVE_ONE_OUT, "2 interactions")),
    "twoevents": (INTER_HEADER + "\n" + "".join(f"{u}\t{u % 5 + 1}\t{u}\n{u}\t{u % 3 + 1}\t{u + 1}\n" for u in range(1, 40)),
                  ("dataset 'twoevents': the valid split is empty (39/0/0", *LEAVE_ONE_OUT, "4 interactions")),
}
READERS = {  # the three ways the plugin reads an .inter file
    "lean": (),
    "recbole data": ("--sequence_data=recbole",),
    "recbole reader": ("--sequence_data=recbole", "--fast_loader=False"),
}
SMALL = {"data_path": "{tmp}/data", "output": "{tmp}/out", "epochs": "1", "MAX_ITEM_LIST_LENGTH": "5",
         "train_batch_size": "64", "show_progress": "False", "gpu_id": "''"}
#: a tiny model of each kind, in the model's own settings (another model's keys would be warned about)
TINY_MODEL = {"SASRec": {"hidden_size": "8", "inner_size": "16", "n_layers": "1", "n_heads": "1"},
              "recurrent": {"embedding_size": "8", "hidden_size": "8", "num_layers": "1"}}


def cli_setup(*extra: Callable[[Path], None]) -> Callable[[Path], None]:
    """``{tmp}/data/tiny/tiny.inter`` (60 users x 10 steps), the malformed datasets, then ``extra``."""
    def make(tmp: Path) -> None:
        write_inter(tmp / "data" / "tiny" / "tiny.inter", tiny_rows())
        for name, (text, _) in MALFORMED.items():
            (tmp / "data" / name).mkdir(parents=True)
            (tmp / "data" / name / f"{name}.inter").write_text(text, encoding="utf-8")
        for make_more in extra:
            make_more(tmp)
    return make


def run(*extra: str, model: str = "SASRec", dataset: str = "tiny") -> tuple[str, ...]:
    """The argv of one small run; ``--key=value`` in ``extra`` replaces the small defaults."""
    given = {arg.split("=", 1)[0] for arg in extra}
    tiny = TINY_MODEL["recurrent" if model in ("KSR", "GRU4RecKG", "GRU4Rec") else "SASRec"]
    small = tuple(f"--{k}={v}" for k, v in {**SMALL, **tiny}.items() if f"--{k}" not in given)
    return (f"--model={model}", f"--dataset={dataset}", *small, *extra)


def tune(*extra: str, model: str = "SASRec") -> tuple[str, ...]:
    return ("--tune", "--n-trials=1", "--tune_plots=False", *run(*extra, model=model))


def _interrupt_after_first_trial(case: Case, tmp: Path) -> tuple[int, str]:
    """Run ``case`` as a real process in its own session; Ctrl-C (SIGINT to the whole group, as a
    terminal sends it) once a trial has completed. Returns the status and stderr."""
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_recbole_popprior.py"), *argv], cwd=tmp,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if " COMPLETE " in line:
                os.killpg(proc.pid, signal.SIGINT)
                break
        lines.append(proc.stderr.read())
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, "".join(lines)


def _interrupt_ddp_rendezvous(case: Case, tmp: Path) -> tuple[int, str]:
    """Ctrl-C (SIGINT to the process group) once rank 0 listens for a rendezvous that the
    missing third rank never completes (``--nproc=2 --world_size=3``); the command must end within
    60 s, with nothing of its process group left alive (issue 19, 8)."""
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    port = int(next(a for a in argv if a.startswith("--port=")).split("=", 1)[1])
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_recbole_popprior.py"), *argv], cwd=tmp,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:  # until rank 0 serves the rendezvous
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.5)
        time.sleep(3)  # rank 1 joins it too
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        with contextlib.suppress(ProcessLookupError):  # no worker outlives the command
            for _ in range(20):
                os.killpg(proc.pid, 0)
                time.sleep(0.5)
            raise AssertionError("a process of the command's group is still alive")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def _interrupt_while_importing(case: Case, tmp: Path) -> tuple[int, str]:
    """Ctrl-C while the command still imports torch (its shared library is mapped, the import is not
    done): one line and status 130, not Python's KeyboardInterrupt traceback (issue 19, 10)."""
    command = ([str(Path(sys.executable).parent / "recbole-popprior")] if case.entry == "console"
               else [sys.executable, str(ROOT / "run_recbole_popprior.py")])
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    proc = subprocess.Popen([*command, *argv], cwd=tmp, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, start_new_session=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                if "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text():
                    break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def _sigterm_when_staging(case: Case, tmp: Path) -> tuple[int, str]:
    """SIGTERM (a scheduler's stop) once a comparison trains into its staging folder: handled as
    Ctrl-C is, the staging folder removed, status 143 (issue 19, interrupts)."""
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_recbole_popprior.py"), *argv], cwd=tmp,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not list(tmp.glob("out/.compare-*/runs/*")):
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def _report_of_finished_trials(tmp: Path) -> None:
    folder = tmp / "out" / "tuning" / "popprior-tiny"
    summary = json.loads((folder / "summary.json").read_text())
    row = summary["models"][0]
    assert row["complete"] >= 1 and row["best_trial"] is not None
    assert (folder / "summary.csv").is_file() and (folder / "summary.md").is_file()
    assert not [p for p in tmp.rglob("*") if p.name.endswith(".tmp")]


def files_at(contents: dict[str, bytes]) -> Callable[[Path], None]:
    return files(contents)


def _npy(shape: tuple, dtype: str = "<f8", body: bytes = b"") -> bytes:
    """A ``.npy`` file whose header claims ``shape`` (followed by ``body`` only)."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body


def _npz(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(f"{name}.npy", data)
    return buffer.getvalue()


def _object_npz(tmp: Path) -> None:
    tokens = np.array(["1", "2"], dtype=object)
    np.savez(tmp / "objects.npz", tokens=tokens, embeddings=np.ones((2, 4)))


def _corrupt_sqlite(tmp: Path) -> None:
    """A SQLite file whose schema pages are overwritten with garbage."""
    import sqlite3

    path = tmp / "corrupt.db"
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute("create table t (x)")
        con.executemany("insert into t values (?)", [(k,) for k in range(1000)])
        con.commit()
    raw = bytearray(path.read_bytes())
    raw[100:4096] = bytes((7 * k) % 256 for k in range(3996))
    path.write_bytes(bytes(raw))


def _checkpoint_without_digest(tmp: Path) -> None:
    """A plugin checkpoint whose digest was deleted and a weight changed (issue 19, 9)."""
    import torch

    from recbole_popprior import checkpoint

    path = checkpoint.save_checkpoint(tmp / "pretrained.pth", torch.nn.Linear(2, 2))
    state = torch.load(path, weights_only=True)
    meta = json.loads(state["meta"])
    del meta["digest"]
    state["state_dict"]["weight"] = state["state_dict"]["weight"] * 2
    torch.save({**state, "meta": json.dumps(meta)}, path)


NOT_FINITE = ("finite",)
BOMB = ("a: &a [" + ",".join(["x"] * 9) + "]\n" + "".join(  # 271 bytes: 9^8 values when expanded
    f"{k}: &{k} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, k in zip("abcdefg", "bcdefgh"))).encode()
CLI_CASES = [
    # settings that are not finite numbers (issue 14, 3): refused before anything runs
    Case("prior_tau=1e999", run("--prior_tau=1e999"), 2, ("prior_tau",) + NOT_FINITE, cli_setup(), "cli"),
    Case("prior_tau: .nan in a yaml file", run("--config_files={tmp}/nan.yaml"), 2, ("prior_tau", "nan") + NOT_FINITE,
         cli_setup(files_at({"nan.yaml": b"prior_tau: .nan\n"})), "script"),
    Case("prior_beta=1e999", run("--prior_beta=1e999"), 2, ("prior_beta",) + NOT_FINITE, cli_setup(), "console"),
    Case("learning_rate=inf", run("--learning_rate=float('inf')"), 2, ("learning_rate", "must be a number"),
         cli_setup(), "cli"),
    # values are literals, never code (issue 14, 4): the marker file would show up as a new file
    Case("a plugin value that is code", run("--prior_tau=__import__('os').system('touch {tmp}/pwned')"), 2,
         ("prior_tau", "must be a number", "__import__"), cli_setup(), "script"),
    Case("a RecBole value that is code", run("--learning_rate=__import__('os').system('touch {tmp}/pwned')"), 2,
         ("learning_rate", "must be a number"), cli_setup(), "cli"),
    Case("a list value that is code", run("--topk=[__import__('os').system('touch {tmp}/pwned')]"), 2,
         ("invalid setting", "topk"), cli_setup(), "cli"),
    Case("a python tag in a yaml file", run("--config_files={tmp}/tag.yaml"), 2,
         ("tag.yaml", "not valid yaml", "python/name:os.system"),
         cli_setup(files_at({"tag.yaml": b"learning_rate: !!python/name:os.system\n"})), "cli"),
    # settings that failed after the data loaded or after an epoch (issue 19, 6 and 13)
    Case("prior_tau=1e300 (infinite in float32)", run("--prior_tau=1e300"), 2, ("prior_tau", "finite float32"),
         cli_setup(), "cli"),
    Case("weight_decay=1e300 (infinite in float32)", run("--weight_decay=1e300"), 2, ("weight_decay", "finite float32"),
         cli_setup(), "cli"),
    Case("topk larger than the catalogue", run("--topk=[10,100]"), 2,
         ("topk [10, 100] asks for 100 items", "ranks 30 (the catalogue)"), cli_setup(), "cli"),
    Case("topk larger than the catalogue, recbole data", run("--topk=[10,100]", "--sequence_data=recbole"), 2,
         ("topk [10, 100] asks for 100 items",), cli_setup(), "cli"),
    Case("a valid_metric that is not computed", run("--valid_metric=NDCG@20", "--topk=[10]"), 2,
         ("valid_metric NDCG@20 needs 20 in topk",), cli_setup(), "cli"),
    Case("n_heads that does not divide hidden_size", run("--n_heads=3"), 2,
         ("n_heads (3) must divide hidden_size (8)",), cli_setup(), "cli"),
    Case("hidden_size=0", run("--hidden_size=0"), 2, ("hidden_size must be >= 1", "got 0"), cli_setup(), "cli"),
    Case("n_layers=0", run("--n_layers=0"), 2, ("n_layers must be >= 1",), cli_setup(), "cli"),
    Case("a dropout rate of 2", run("--hidden_dropout_prob=2"), 2, ("hidden_dropout_prob", "dropout rate in [0, 1]"),
         cli_setup(), "cli"),
    Case("num_layers=0 for GRU4Rec", run("--num_layers=0", model="GRU4Rec"), 2, ("num_layers must be >= 1",),
         cli_setup(), "cli"),
    Case("--compare on two events per user", ("--compare", *run(dataset="twoevents")), 2,
         ("the valid split is empty",), cli_setup(), "cli"),
    # RecBole's own checks of its settings
    Case("an unknown metric", run("--metrics=['Recall','Nope']", "--valid_metric=Recall@10"), 2,
         ("invalid setting", "no metric named 'Nope'"), cli_setup(), "cli"),
    Case("topk=0", run("--topk=0"), 2, ("invalid setting", "topk must be a positive integer"), cli_setup(), "cli"),
    Case("seed=abc", run("--seed=abc"), 2, ("seed must be an integer", "'abc'"), cli_setup(), "console"),
    Case("seed=-1 (numpy takes 0 .. 2**32 - 1)", run("--seed=-1"), 2, ("seed must be >= 0",), cli_setup(), "cli"),
    Case("seed=2**40", run("--seed=1099511627776"), 2, ("seed must be <= 4294967295",), cli_setup(), "cli"),
    Case("metrics=[]", run("--metrics=[]"), 2, ("metrics is empty",), cli_setup(), "cli"),
    Case("energy_permutations=10**9 (16 GB of null draws, after training)", run("--energy_permutations=1000000000"), 2,
         ("energy_permutations must be <= 1000000",), cli_setup(), "cli"),
    Case("epochs=0", run("--epochs=0"), 2, ("epochs must be >= 1", "got 0"), cli_setup(), "cli"),
    Case("epochs=-1", run("--epochs=-1"), 2, ("epochs must be >= 1", "got -1"), cli_setup(), "script"),
    Case("nproc=0", run("--nproc=0"), 2, ("--nproc must be >= 1",), cli_setup(), "cli"),
    Case("world_size=0", run("--world_size=0"), 2, ("--world_size must be >= 1",), cli_setup(), "cli"),
    Case("prior_alpha=-1", run("--prior_alpha=-1"), 2, ("prior_alpha must be > 0",), cli_setup(), "cli"),
    Case("prior_mode=sometimes", run("--prior_mode=sometimes"), 2, ("prior_mode must be one of",), cli_setup(), "cli"),
    Case("prior_tau=abc", run("--prior_tau=abc"), 2, ("prior_tau must be a number",), cli_setup(), "cli"),
    Case("prior_source=truth without known truth", run("--prior_source=truth"), 2,
         ("prior_source: truth needs a data set with known truth", "synthetic"), cli_setup(), "cli"),
    Case("prior_source=true (a boolean)", run("--prior_source=true"), 2,
         ("prior_source must be one of estimate, truth", "write truth"), cli_setup(), "script"),
    Case("remedy=magic", run("--remedy=magic"), 2, ("remedy must be one of",), cli_setup(), "cli"),
    Case("a missing ace_init file", run("--ace_init={tmp}/missing.npy"), 2, ("ace_init: no such file",),
         cli_setup(), "cli"),
    Case("adap_tau_base=2", run("--adap_tau_base=2"), 2, ("adap_tau_base must be mean or a quantile",),
         cli_setup(), "cli"),
    Case("a remedy with a prior", run("--remedy=directspec", "--prior_tau=1"), 2,
         ("remedy: directspec", "prior_tau: 0"), cli_setup(), "cli"),
    # the command line itself
    Case("no --model", run()[1:], 2, ("--model is required",), cli_setup(), "console"),
    Case("an unknown model", run(model="NoSuchNet"), 2, ("unsupported model 'NoSuchNet'", "SASRec"), cli_setup(), "cli"),
    Case("a model without a pairwise form", run("--loss_type=BPR", model="CORE"), 2,
         ("CORE cannot train with loss_type BPR",), cli_setup(), "cli"),
    Case("a stray argument", ("stray", *run()), 2, ("unexpected argument 'stray'",), cli_setup(), "cli"),
    Case("a value given twice", run("--learning_rate=0.1", "--learning_rate=0.2"), 2, ("given twice",), cli_setup(), "cli"),
    Case("--compare=maybe", ("--compare=maybe", *run()), 2, ("--compare is a flag",), cli_setup(), "cli"),
    Case("--beta-sweep=a,b", ("--beta-sweep=a,b", *run()), 2, ("--beta-sweep takes numbers",), cli_setup(), "cli"),
    Case("--timeout=nan", ("--timeout=nan", *tune()), 2, ("--timeout must be a positive number",), cli_setup(), "cli"),
    # config files
    Case("a missing config file", run("--config_files={tmp}/missing.yaml"), 2, ("config file not found",),
         cli_setup(), "cli"),
    Case("a folder as a config file", run("--config_files={tmp}/data"), 2, ("config file", "is a directory"),
         cli_setup(), "cli"),
    Case("a yaml alias bomb", run("--config_files={tmp}/bomb.yaml"), 2,
         ("bomb.yaml is refused", "aliases expand it to more than 1,000,000"), cli_setup(files_at({"bomb.yaml": BOMB})),
         "cli"),
    Case("a yaml file with more aliases than any config needs", run("--config_files={tmp}/many.yaml"), 2,
         ("many.yaml is refused", "more than 1000 yaml aliases"),
         cli_setup(files_at({"many.yaml": b"a: &a 1\nb: [" + b",".join([b"*a"] * 1001) + b"]\n"})), "cli"),
    Case("a yaml file nested too deeply", run("--config_files={tmp}/deep.yaml"), 2,
         ("deep.yaml is refused", "more than 64 levels deep"),
         cli_setup(files_at({"deep.yaml": b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n"})), "script"),
    Case("a malformed yaml file", run("--config_files={tmp}/bad.yaml"), 2, ("bad.yaml", "not valid yaml", "line"),
         cli_setup(files_at({"bad.yaml": b"epochs: [1, 2\n  nope: :\n"})), "cli"),
    Case("a yaml file that is a list", run("--config_files={tmp}/list.yaml"), 2,
         ("list.yaml", "must map settings to values", "list"), cli_setup(files_at({"list.yaml": b"- a\n- b\n"})), "cli"),
    Case("a yaml file that is not UTF-8", run("--config_files={tmp}/latin.yaml"), 2,
         ("latin.yaml", "not UTF-8"), cli_setup(files_at({"latin.yaml": "epochs: 1  # dÃ©j\xe0\n".encode("latin-1")})),
         "script"),
    Case("a yaml file with a number as a key", run("--config_files={tmp}/keys.yaml"), 2,
         ("keys.yaml", "setting names must be strings", "1"), cli_setup(files_at({"keys.yaml": b"1: 2\n"})), "cli"),
    # datasets
    Case("a missing dataset", run(dataset="nosuchdata"), 2, ("dataset 'nosuchdata' not found",), cli_setup(), "cli"),
    *[Case(f"{name} .inter, {reader}", run(*flags, dataset=name), 2, words, cli_setup(), "cli")
      for name, (_, words) in MALFORMED.items() for reader, flags in READERS.items()],
    Case("KSR without its .kg and .link", run(model="KSR"), 2, ("KSR needs the knowledge-graph", "tiny.kg", "tiny.link"),
         cli_setup(), "cli"),
    Case("GRU4RecKG without its .kg and .link", run(model="GRU4RecKG"), 2,
         ("GRU4RecKG needs the knowledge-graph", "missing: tiny.kg, tiny.link"), cli_setup(), "console"),
    *[Case(f"windowed prior without the timestamp, {reader}",
           run("--prior_mode=windowed", "--load_col={'inter':['user_id','item_id']}", *flags), 2,
           ("sequential models need the time field 'timestamp'",), cli_setup(), "cli")
      for reader, flags in READERS.items()],
    # the model's other input files, checked before the data loads (issue 19, 5 and 9)
    Case("S3Rec fine-tune without its pre_model_path", run("--train_stage=finetune",
                                                           "--pre_model_path={tmp}/missing.pth", model="S3Rec"), 2,
         ("checkpoint not found", "missing.pth"), cli_setup(), "cli"),
    Case("S3Rec fine-tune from a checkpoint without its digest", run(
        "--train_stage=finetune", "--pre_model_path={tmp}/pretrained.pth", model="S3Rec"), 2,
         ("pretrained.pth", "records no content digest"), cli_setup(_checkpoint_without_digest), "cli"),
    Case("ace_init: an object array in an npz", run("--ace_init={tmp}/objects.npz"), 2,
         ("objects.npz (tokens) holds Python objects", "without pickle"), cli_setup(_object_npz), "cli"),
    Case("ace_init: a corrupt npz", run("--ace_init={tmp}/bad.npz"), 2,
         ("ace_init: cannot read", "bad.npz"), cli_setup(files_at({"bad.npz": b"PK\x03\x04" + bytes(200)})), "cli"),
    Case("ace_init: an npy header claiming a huge shape", run("--ace_init={tmp}/huge.npy"), 2,
         ("huge.npy claims a 1000000000x1000000 array", "more than the file holds"),
         cli_setup(files_at({"huge.npy": _npy((10**9, 10**6), body=bytes(64))})), "cli"),
    Case("ace_init: an npz member claiming a huge shape", run("--ace_init={tmp}/huge.npz"), 2,
         ("huge.npz (embeddings) claims",), cli_setup(files_at({"huge.npz": _npz(
             tokens=_npy((2,), "<U1", "12".encode("utf-32-le")), embeddings=_npy((10**12, 8)))})), "cli"),
    # outputs
    Case("--output is a file", run("--output={tmp}/afile"), 2, ("cannot create the run folder", "afile is a file"),
         cli_setup(files_at({"afile": b"x"})), "cli"),
    Case("--output is a file, --compare", ("--compare", *run("--output={tmp}/afile")), 2,
         ("cannot create the run folder", "afile is a file"), cli_setup(files_at({"afile": b"x"})), "cli"),
    Case("--output is a file, --tune", tune("--output={tmp}/afile"), 2,
         ("cannot create the tuning folder", "afile is a file"), cli_setup(files_at({"afile": b"x"})), "cli"),
    # tuning
    Case("--storage in a missing folder", tune("--storage=sqlite:///{tmp}/nonexistent/dir/x.db"), 2,
         ("storage file", "nonexistent/dir does not exist"), cli_setup(), "cli"),
    Case("--storage under a file", tune("--storage=sqlite:///{tmp}/afile/x.db"), 2,
         ("storage file", "afile is a file"), cli_setup(files_at({"afile": b"x"})), "cli"),
    Case("--storage in a folder that cannot be written", tune("--storage=sqlite:////proc/self/x.db"), 2,
         ("storage file", "cannot write in /proc/self"), cli_setup(), "console"),
    Case("--storage journal in a missing folder", tune("--storage=journal:{tmp}/nope/x.journal"), 2,
         ("storage file", "does not exist"), cli_setup(), "cli"),
    # issue 19, 3 and 5: storages that cannot hold a study, or are corrupt
    Case("--storage sqlite:///:memory:", tune("--storage=sqlite:///:memory:"), 2, ("keeps the study in memory",),
         cli_setup(), "cli"),
    Case("--storage sqlite:/// (no file)", tune("--storage=sqlite:///"), 2, ("keeps the study in memory",),
         cli_setup(), "cli"),
    Case("--storage journal: (no file)", tune("--storage=journal:"), 2, ("names no journal file",), cli_setup(), "cli"),
    Case("--storage journal:/dev/null", tune("--storage=journal:/dev/null"), 2,
         ("storage file /dev/null is not a regular file",), cli_setup(), "cli"),
    Case("--storage on a corrupt SQLite file", tune("--storage=sqlite:///{tmp}/corrupt.db"), 2,
         ("corrupt.db", "malformed"), cli_setup(_corrupt_sqlite), "cli"),
    Case("--storage on a file that is not SQLite", tune("--storage=sqlite:///{tmp}/text.db"), 2,
         ("text.db", "file is not a database"), cli_setup(files_at({"text.db": b"not a database\n" * 300})), "cli"),
    Case("--storage on a journal with a corrupt line", tune("--storage=journal:{tmp}/bad.journal"), 2,
         ("bad.journal is corrupt at line 2", "its 1 records before it are intact", "head -n 1"),
         cli_setup(files_at({"bad.journal": b'{"op_code": 0, "worker_id": "w"}\n{"op_code": 0, "wor{"op_code"\n'})),
         "cli"),
    Case("a search space file with a Latin-1 byte", tune("--search-space={tmp}/space.yaml"), 2,
         ("space.yaml is not UTF-8 text", "byte"),
         cli_setup(files_at({"space.yaml": "prior_tau: {type: float, low: 0, high: 1}  # d\xe9j\xe0\n".encode("latin-1")})),
         "cli"),
    Case("a search space file that is an alias bomb", tune("--search-space={tmp}/space.yaml"), 2,
         ("space.yaml is refused", "aliases expand"), cli_setup(files_at({"space.yaml": BOMB})), "cli"),
    Case("a study in which every trial failed", tune("--n-trials=2", "--search-space={tmp}/space.yaml",
                                                     "--tune_max_failures=0"), 2,
         ("no trial of SASRec completed: 2 failed", "prior_tau must be a finite float32", "summary.md"),
         cli_setup(files_at({"space.yaml": b"prior_tau: {type: categorical, choices: [1.0e39]}\n"})), "cli",
         may_leave=("out*",), logs=True),
    Case("a search space key nobody knows", tune("--search-space={tmp}/space.yaml"), 2,
         ("search space entry 'learnig_rate'", "did you mean 'learning_rate'"),
         cli_setup(files_at({"space.yaml": b"learnig_rate: {type: float, low: 0.001, high: 0.01}\n"})), "cli"),
    Case("a bad search space entry", tune("--search-space={tmp}/space.yaml"), 2, ("above high",),
         cli_setup(files_at({"space.yaml": b"x: {type: float, low: 2, high: 1}\n"})), "cli"),
    Case("--n-workers=0", ("--n-workers=0", *tune()), 2, ("--n-workers must be >= 1",), cli_setup(), "cli"),
    # under DDP (issue 19, 8): bad input is one line and leaves no run folder; Ctrl-C ends it
    Case("badfloat .inter under DDP", run("--nproc=2", "--ddp_backend=gloo", f"--port={free_port()}",
                                          dataset="badfloat"), 2, ("badfloat.inter line 27", "'abc'"), cli_setup(), "cli"),
    Case("Ctrl-C under DDP waiting for a rank that never comes",
         run("--nproc=2", "--world_size=3", "--ddp_backend=gloo", f"--port={free_port()}"), 130, ("interrupted",),
         cli_setup(), "script", process=_interrupt_ddp_rendezvous),
    Case("SIGTERM during --compare", ("--compare", "--seeds=1", *run("--epochs=50")), 143,
         ("interrupted by SIGTERM",), cli_setup(), "script", process=_sigterm_when_staging, logs=True,
         may_leave=("log_tensorboard*",)),  # (issue 20 moves it under --output)
    Case("Ctrl-C while the script imports torch", run(), 130, ("interrupted",), cli_setup(), "script",
         process=_interrupt_while_importing),
    Case("Ctrl-C while the console script imports torch", run(), 130, ("interrupted",), cli_setup(), "console",
         process=_interrupt_while_importing),
    Case("Ctrl-C while tuning reports the finished trials", tune("--n-trials=50", "--epochs=2", "--state=WARNING"),
         130, ("interrupted", "completed trial(s)", "summary.md"), cli_setup(), "script",
         may_leave=("out*", "log_tensorboard*"), process=_interrupt_after_first_trial, logs=True, check=_report_of_finished_trials),
]
ALL_CASES = CASES + CLI_CASES


# ----------------------------------------------------------------------------- runner


def snapshot(tmp: Path) -> dict[str, bytes]:
    """Every file under ``tmp`` (symlinks as their target path) and its bytes."""
    out = {}
    for path in sorted(tmp.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(tmp))] = os.readlink(path).encode()
        elif path.is_file():
            out[str(path.relative_to(tmp))] = path.read_bytes()
    return out


def _folders(tmp: Path) -> list[str]:
    return [str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_dir() and not p.is_symlink()]


def _console_main(argv: list[str]) -> int:
    (point,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "recbole-popprior"]
    assert point.value == "recbole_popprior.cli:main"
    return point.load()(argv)


def _script_main(argv: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [str(ROOT / "run_recbole_popprior.py"), *argv])
    runpy.run_path(str(ROOT / "run_recbole_popprior.py"), run_name="__main__")
    return 0


def _in_process(case: Case, argv: list[str], monkeypatch, capfd) -> tuple[int, str]:
    """``main(argv)`` of the case's entry point here; any exception but ``SystemExit`` propagates
    (and fails the test with its traceback)."""
    from recbole_popprior.cli import main as cli_main
    from recbole_popprior.converters.cli import main as convert_main

    entries = {"convert": convert_main, "cli": cli_main, "console": _console_main,
               "script": lambda args: _script_main(args, monkeypatch)}
    capfd.readouterr()
    try:
        status = entries[case.entry](argv)
    except SystemExit as exc:
        status = exc.code
    return status, capfd.readouterr().err


@pytest.fixture()
def _no_leftover_log_handlers():
    """In-process runs add RecBole-style handlers on captured streams: drop them afterwards."""
    yield
    for name in ("", "recbole_popprior.tuning"):
        log = logging.getLogger(name)
        for handler in [h for h in log.handlers if getattr(h, "_recbole_popprior", False)
                        or getattr(h, "_recbole_popprior_tuning", False)]:
            log.removeHandler(handler)
            handler.close()


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_bad_input_is_one_error_line_and_leaves_the_disk_as_it_was(case, tmp_path, monkeypatch, capfd,
                                                                   _no_leftover_log_handlers):
    case.setup(tmp_path)
    before, folders_before = snapshot(tmp_path), set(_folders(tmp_path))
    monkeypatch.chdir(tmp_path)  # anything written to the working directory would be seen
    if case.process is not None:
        status, stderr = case.process(case, tmp_path)
    else:
        status, stderr = _in_process(case, [a.replace("{tmp}", str(tmp_path)) for a in case.argv], monkeypatch, capfd)
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and lines, stderr[-3000:]
    assert len(lines) == 1 or case.logs, stderr[-3000:]
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, stderr[-3000:]
    for word in case.words:
        assert word.lower() in lines[-1].lower(), (word, lines[-1])
    assert status == case.status, (status, lines[-1])
    after = snapshot(tmp_path)
    new = {p for p in set(after) - set(before) if not any(fnmatch.fnmatch(p, g) for g in case.may_leave)}
    assert not new, f"left behind: {sorted(new)}"
    assert {p: after.get(p) for p in before} == before, "an existing file was changed or removed"
    if case.entry != "convert":  # a failed start leaves no run folder (the converters may leave --output)
        folders = {p for p in set(_folders(tmp_path)) - folders_before
                   if not any(fnmatch.fnmatch(p, g) for g in case.may_leave)}
        assert not folders, f"folders left behind: {sorted(folders)}"
    if case.check is not None:
        case.check(tmp_path)


def test_the_table_has_unique_names():
    assert len({c.name for c in ALL_CASES}) == len(ALL_CASES)
