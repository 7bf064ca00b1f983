"""Bad input to the command lines, as one table: each case must end with exactly one ``error:``
line on stderr (no traceback), its exit status, and nothing written or changed on disk.

To add a case, append a :class:`Case` to ``CASES``; ``module`` names the entry point run as
``python -m MODULE ARGV...`` in a fresh interpreter, ``setup`` makes its files under ``{tmp}``.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

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
    module: str = CONVERT
    may_leave: tuple[str, ...] = field(default=())  # globs of files the run may create (logs, ...)


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
CASES = [
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


def run(case: Case, tmp: Path) -> subprocess.CompletedProcess:
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    return subprocess.run([sys.executable, "-m", case.module, *argv], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_error_line_and_leaves_the_disk_as_it_was(case, tmp_path):
    case.setup(tmp_path)
    before = snapshot(tmp_path)
    proc = run(case, tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    for word in case.words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    assert proc.returncode == case.status, (proc.returncode, lines[0])
    after = snapshot(tmp_path)
    new = {p for p in set(after) - set(before) if not any(Path(p).match(g) for g in case.may_leave)}
    assert not new, f"left behind: {sorted(new)}"
    assert {p: after.get(p) for p in before} == before, "an existing file was changed or removed"


def test_the_table_has_unique_names():
    assert len({c.name for c in CASES}) == len(CASES)
