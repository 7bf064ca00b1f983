"""Outputs committed as one set (recbole_popprior/staging.py; issue 19, 7)."""

from __future__ import annotations

import json
import threading
import time

from recbole_popprior.staging import StagedSet
from recbole_popprior.utils import exclusive_lock


def _stage(out, text: str) -> StagedSet:
    stage = StagedSet(out, "compare", "compare.json").__enter__()
    (stage.path("runs") / "seed1-standard").mkdir(parents=True)
    stage.path("runs", "seed1-standard", "model.pth").write_text(text)
    stage.path("compare.md").write_text(text)
    return stage


def _commit(stage: StagedSet, text: str) -> None:
    stage.commit(lambda handle: json.dump({"run": text, "model": str(stage.final(stage.path("runs")))}, handle))


def test_a_commit_replaces_the_whole_set_and_writes_the_marker_last(tmp_path):
    out = tmp_path / "out"
    old = _stage(out, "old")
    _commit(old, "old")
    old.__exit__(None, None, None)
    (out / "runs" / "stale-arm").mkdir()  # an entry of the old set only: replaced with its folder
    new = _stage(out, "new")
    assert json.loads((out / "compare.json").read_text())["run"] == "old"  # staged: nothing in place changed
    _commit(new, "new")
    new.__exit__(None, None, None)
    assert json.loads((out / "compare.json").read_text()) == {"run": "new", "model": str(out / "runs")}
    assert (out / "runs" / "seed1-standard" / "model.pth").read_text() == "new"
    assert not (out / "runs" / "stale-arm").exists() and (out / "compare.md").read_text() == "new"
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "runs"]


def test_two_runs_into_one_folder_commit_one_after_the_other(tmp_path):
    out = tmp_path / "out"
    a, b = _stage(out, "a"), _stage(out, "b")
    done = threading.Event()
    with exclusive_lock(out / ".compare.lock"):  # run a is committing
        worker = threading.Thread(target=lambda: (_commit(b, "b"), done.set()))
        worker.start()
        time.sleep(0.5)
        assert not done.is_set() and not (out / "compare.json").exists()  # b waits for a
        a._commit(lambda handle: json.dump({"run": "a"}, handle))
    worker.join(10)
    a.__exit__(None, None, None)
    b.__exit__(None, None, None)
    assert done.is_set()
    assert json.loads((out / "compare.json").read_text())["run"] == "b"
    assert (out / "compare.md").read_text() == (out / "runs" / "seed1-standard" / "model.pth").read_text() == "b"
