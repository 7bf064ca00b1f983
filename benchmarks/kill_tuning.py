"""SIGKILL a tuning study at random points, over and over: nothing completed is ever lost (issue 19).

For each storage (SQLite and Optuna's journal file), in one fresh folder:

1. a calibration run adds ``--trials`` trials without being killed; its wall time ``T`` sets the
   range of the kill times;
2. until it has been SIGKILLed ``--kills`` times: the same command (it resumes the study and adds
   ``--trials`` more) is started in its own process group and SIGKILLed, with all its processes,
   at a uniformly random time in ``[0.05 T, 0.95 T]``: while importing, while training, while
   writing a checkpoint, a record or the report (a run that ends first, e.g. when its trials are
   pruned, is checked and counted, and the loop goes on);
3. after every kill the storage is read with Optuna's own API and checked against everything
   seen complete so far: each completed trial is still COMPLETE, with the same value, parameters
   and checkpoint path, and its checkpoint file has the same SHA-256 and loads (digest checked);
4. a last run is not killed: it must resume and exit 0, and the checks run once more.

A run that exits by itself before its kill must exit 0 (a failed resume is counted). The counts
printed at the end: kills, kills that hit a running trial (a trial left RUNNING or failed by the
next run), completed trials, journal tails repaired, and violations (must be 0).

    python benchmarks/kill_tuning.py --quick          # 2 kills of 2-trial runs, journal only (about 2 min)
    python benchmarks/kill_tuning.py                  # the full check: 12 kills per storage (about 15 min)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from optuna.storages.journal import JournalFileBackend, JournalStorage  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from recbole_popprior.checkpoint import load_checkpoint  # noqa: E402
from recbole_popprior.errors import PopPriorError  # noqa: E402

STUDY = "kill"


def write_data(folder: Path, users: int = 60, items: int = 25, length: int = 10, seed: int = 0) -> None:
    """A tiny ``kt.inter``: Zipf-popular items, increasing times (the test suite's tiny shape)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, items + 1)
    p /= p.sum()
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(1, users + 1):
        for t, i in enumerate(rng.choice(items, size=length, p=p) + 1):
            lines.append(f"{u}\t{i}\t{1000 * u + t}")
    (folder / "kt").mkdir(parents=True, exist_ok=True)
    (folder / "kt" / "kt.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")


def command(data: Path, out: Path, storage: str, trials: int) -> list[str]:
    return [sys.executable, str(ROOT / "run_recbole_popprior.py"), "--tune", "--model=SASRec", "--dataset=kt",
            f"--data_path={data}", f"--output={out}", f"--n-trials={trials}", f"--study-name={STUDY}",
            f"--storage={storage}", "--epochs=1", "--hidden_size=8", "--inner_size=16", "--n_layers=1",
            "--n_heads=1", "--MAX_ITEM_LIST_LENGTH=5", "--train_batch_size=64", "--show_progress=False",
            "--tune_plots=False", "--state=WARNING", "--gpu_id=", "--tune_heartbeat_interval=5"]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "ab")
    return subprocess.Popen(cmd, cwd=log.parent, stdout=handle, stderr=handle, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def open_storage(storage: str):
    if storage.startswith("journal:"):
        return JournalStorage(JournalFileBackend(storage[len("journal:"):]))  # read only: no repair here
    return storage


def file_sha(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def snapshot(storage: str) -> dict[int, dict]:
    """Every COMPLETE trial of the study: value, parameters, checkpoint path and file digest."""
    try:
        study = optuna.load_study(study_name=f"{STUDY}.SASRec", storage=open_storage(storage))
    except KeyError:  # killed before the study was created
        return {}
    seen = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.state != TrialState.COMPLETE:
            continue
        checkpoint = trial.user_attrs.get("checkpoint")
        seen[trial.number] = {"value": trial.value, "params": dict(trial.params), "checkpoint": checkpoint,
                              "sha256": file_sha(checkpoint) if checkpoint else None}
    return seen


def states(storage: str) -> dict[str, int]:
    try:
        study = optuna.load_study(study_name=f"{STUDY}.SASRec", storage=open_storage(storage))
    except KeyError:
        return {}
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def check(storage: str, known: dict[int, dict]) -> list[str]:
    """What was lost or replaced since ``known`` (which gains the new complete trials)."""
    now = snapshot(storage)
    problems = []
    for number, before in known.items():
        after = now.get(number)
        if after is None:
            problems.append(f"trial {number} is no longer COMPLETE")
        elif after != before:
            problems.append(f"trial {number} changed: {before} -> {after}")
    for number, record in now.items():
        if record["sha256"] is None:
            problems.append(f"trial {number}: checkpoint {record['checkpoint']} is missing")
            continue
        try:
            load_checkpoint(record["checkpoint"])
        except PopPriorError as exc:
            problems.append(f"trial {number}: {exc}")
        known.setdefault(number, record)
    return problems


def run_storage(kind: str, root: Path, data: Path, kills: int, trials: int, rng: random.Random) -> dict:
    out = root / kind
    out.mkdir()
    storage = f"sqlite:///{out / 'study.db'}" if kind == "sqlite" else f"journal:{out / 'study.journal'}"
    cmd, log = command(data, out, storage, trials), out / "runs.log"
    known: dict[int, dict] = {}
    counts = {"kills": 0, "hit_a_running_trial": 0, "exited_before_the_kill": 0, "failed_resumes": 0,
              "violations": 0, "journal_tails_repaired": 0}
    began = time.perf_counter()
    proc = start(cmd, log)
    if proc.wait(timeout=1800) != 0:
        raise SystemExit(f"{kind}: the calibration run failed, see {log}")
    span = time.perf_counter() - began
    problems = check(storage, known)
    k = 0
    while counts["kills"] < kills and k < 3 * kills:
        k += 1
        at = rng.uniform(0.05, 0.95) * span
        proc = start(cmd, log)
        try:
            status = proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            status = None
        if status is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            counts["kills"] += 1
        else:
            counts["exited_before_the_kill"] += 1
            counts["failed_resumes"] += status != 0
        running = states(storage).get("RUNNING", 0)
        counts["hit_a_running_trial"] += status is None and running > 0
        found = check(storage, known)
        problems += [f"after run {k} (kill at {at:.1f}s): {p}" for p in found]
        print(f"{kind} run {k}, kill {counts['kills']}/{kills} at {at:5.1f}s "
              f"({'killed' if status is None else f'exit {status}'}): {len(known)} complete, {running} running, "
              f"{len(found)} problem(s)", flush=True)
    proc = start(cmd, log)  # the last run is not killed: the study resumes and the command succeeds
    status = proc.wait(timeout=1800)
    counts["failed_resumes"] += status != 0
    problems += check(storage, known)
    counts["violations"] = len(problems)
    counts["complete"] = len(known)
    counts["final_states"] = states(storage)
    counts["journal_tails_repaired"] = len(list(out.glob("study.journal.torn-*")))
    counts["calibration_s"] = round(span, 1)
    counts["problems"] = problems[:10]
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12, help="SIGKILLs per storage (default 12)")
    parser.add_argument("--trials", type=int, default=3, help="trials each run adds (default 3)")
    parser.add_argument("--storages", default="sqlite,journal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 kills of 2-trial runs, on the journal only")
    parser.add_argument("--keep", default=None, help="work in this folder (kept) instead of a temporary one")
    args = parser.parse_args(argv)
    kills = 2 if args.quick else args.kills
    if args.quick:
        args.trials, args.storages = 2, "journal"
    rng = random.Random(args.seed)
    root = Path(args.keep or tempfile.mkdtemp(prefix="kill_tuning-"))
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    write_data(data)
    results = {}
    for kind in args.storages.split(","):
        if kind not in ("sqlite", "journal"):
            parser.error(f"--storages takes sqlite and journal, got {kind!r}")
        results[kind] = run_storage(kind, root, data, kills, args.trials, rng)
        print(json.dumps({kind: results[kind]}, indent=1), flush=True)
    bad = sum(r["violations"] + r["failed_resumes"] for r in results.values())
    print(f"kill test: {'OK' if not bad else 'FAILED'}; " + "; ".join(
        f"{kind}: {r['kills']} kills ({r['hit_a_running_trial']} mid-trial), {r['complete']} complete trials kept, "
        f"{r['violations']} violations, {r['failed_resumes']} failed resumes"
        + (f", {r['journal_tails_repaired']} torn tails repaired" if kind == "journal" else "")
        for kind, r in results.items()) + (f" (work folder {root})" if args.keep else ""))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
