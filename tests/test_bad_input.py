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

import fnmatch
import gzip
import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import pytest

from conftest import tiny_rows, write_inter

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
MALFORMED = {  # name -> (.inter text, words of the error line)
    "badfloat": (f"{INTER_HEADER}\n{GOOD_ROWS}6\t1\tabc\n", ("badfloat.inter line 27", "timestamp", "'abc'")),
    "ragged": (f"{INTER_HEADER}\n{GOOD_ROWS}6\t1\n", ("ragged.inter line 27", "2 fields", "header has 3")),
    "longrow": (f"{INTER_HEADER}\n{GOOD_ROWS}6\t1\t2\t9\n", ("longrow.inter line 27", "4 fields", "header has 3")),
    "unknowntype": ("user_id:token\titem_id:tokn\ttimestamp:float\n" + GOOD_ROWS,
                    ("unknowntype.inter", "column 'item_id'", "unknown type 'tokn'")),
    "headeronly": (f"{INTER_HEADER}\n", ("headeronly.inter", "no data rows")),
    "commas": (INTER_HEADER.replace("\t", ",") + "\n" + GOOD_ROWS.replace("\t", ","),
               ("commas.inter", "not name:type", "tab-separated")),
}
READERS = {  # the three ways the plugin reads an .inter file
    "lean": (),
    "recbole data": ("--sequence_data=recbole",),
    "recbole reader": ("--sequence_data=recbole", "--fast_loader=False"),
}
SMALL = {"data_path": "{tmp}/data", "output": "{tmp}/out", "epochs": "1", "hidden_size": "8", "inner_size": "16", "n_layers": "1", "n_heads": "1",
         "MAX_ITEM_LIST_LENGTH": "5", "train_batch_size": "64", "show_progress": "False", "gpu_id": "''"}


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
    small = tuple(f"--{k}={v}" for k, v in SMALL.items() if f"--{k}" not in given)
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


def _report_of_finished_trials(tmp: Path) -> None:
    folder = tmp / "out" / "tuning" / "popprior-tiny"
    summary = json.loads((folder / "summary.json").read_text())
    row = summary["models"][0]
    assert row["complete"] >= 1 and row["best_trial"] is not None
    assert (folder / "summary.csv").is_file() and (folder / "summary.md").is_file()
    assert not [p for p in tmp.rglob("*") if p.name.endswith(".tmp")]


def files_at(contents: dict[str, bytes]) -> Callable[[Path], None]:
    return files(contents)


NOT_FINITE = ("finite",)
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
    # RecBole's own checks of its settings
    Case("an unknown metric", run("--metrics=['Recall','Nope']", "--valid_metric=Recall@10"), 2,
         ("invalid setting", "no metric named 'Nope'"), cli_setup(), "cli"),
    Case("topk=0", run("--topk=0"), 2, ("invalid setting", "topk must be a positive integer"), cli_setup(), "cli"),
    Case("seed=abc", run("--seed=abc"), 2, ("seed must be an integer", "'abc'"), cli_setup(), "console"),
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
    Case("a search space key nobody knows", tune("--search-space={tmp}/space.yaml"), 2,
         ("search space entry 'learnig_rate'", "did you mean 'learning_rate'"),
         cli_setup(files_at({"space.yaml": b"learnig_rate: {type: float, low: 0.001, high: 0.01}\n"})), "cli"),
    Case("a bad search space entry", tune("--search-space={tmp}/space.yaml"), 2, ("above high",),
         cli_setup(files_at({"space.yaml": b"x: {type: float, low: 2, high: 1}\n"})), "cli"),
    Case("--n-workers=0", ("--n-workers=0", *tune()), 2, ("--n-workers must be >= 1",), cli_setup(), "cli"),
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
