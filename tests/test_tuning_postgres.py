"""Two worker processes share one study on a REAL PostgreSQL server; one is killed with
SIGKILL mid-trial.

Needs ``POPPRIOR_TEST_POSTGRES_URL`` (``.ci/run`` sets it from ``scripts/start_postgres.sh``).
The storage is read through Optuna's API; each completed trial is cross-checked against the
``tuning_trial.json`` its own worker wrote into its run folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

URL = os.environ.get("POPPRIOR_TEST_POSTGRES_URL")
ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT, GRACE = 1, 3
HAS_FAST_LOADER = importlib.util.find_spec("recbole_popprior.data.fast_loader") is not None

pytestmark = pytest.mark.skipif(
    not URL, reason="POPPRIOR_TEST_POSTGRES_URL is unset: start a server with "
                    "`export POPPRIOR_TEST_POSTGRES_URL=$(bash scripts/start_postgres.sh)`")


def _storage() -> optuna.storages.RDBStorage:
    from recbole_popprior.tuning.storage import make_storage

    return make_storage(URL, heartbeat_interval=HEARTBEAT, grace_period=GRACE)


def _worker(study: str, data_path: Path, output: Path, n_trials: int, epochs: int = 1) -> subprocess.Popen:
    args = [sys.executable, "run_recbole_popprior.py", "--tune", "--model=SASRec", "--dataset=tiny",
            f"--n-trials={n_trials}", f"--storage={URL}", f"--study-name={study}", f"--output={output}",
            f"--data_path={data_path}", f"--epochs={epochs}", f"--stopping_step={epochs}", "--hidden_size=8", "--inner_size=16", "--n_layers=1",
            "--n_heads=1", "--MAX_ITEM_LIST_LENGTH=8", "--train_batch_size=64", "--show_progress=False",
            "--state=WARNING", f"--fast_loader={HAS_FAST_LOADER}", "--gpu_id=", "--tune_plots=False",
            f"--tune_heartbeat_interval={HEARTBEAT}", f"--tune_grace_period={GRACE}",
            "--metrics=['Recall','MRR','NDCG']", "--valid_metric=MRR@10", "--topk=[10]"]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _trials(study_name: str):
    storage = _storage()
    try:
        return optuna.load_study(study_name=study_name, storage=storage).get_trials()
    except KeyError:  # the study does not exist yet
        return []


def test_two_workers_share_a_postgres_study_and_survive_a_sigkill(tiny_data, tmp_path):
    study = f"pg-{uuid.uuid4().hex[:10]}"
    optuna_name = f"{study}.SASRec"
    n_trials = 3
    # the victim's trials train for 100000 epochs, so the kill lands mid-trial
    victim = _worker(study, tiny_data, tmp_path / "victim", 5, epochs=100_000)
    survivor = _worker(study, tiny_data, tmp_path / "survivor", n_trials)
    try:
        deadline, victim_trial = time.time() + 120, None
        while victim_trial is None:
            assert time.time() < deadline, "the victim never started a trial"
            assert victim.poll() is None, f"the victim exited early: {victim.stderr.read()[-2000:]}"
            running = [t for t in _trials(optuna_name) if t.state == TrialState.RUNNING
                       and t.user_attrs.get("worker", "").endswith(f":{victim.pid}")]
            victim_trial = running[0].number if running else None
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
        _, err = survivor.communicate(timeout=240)
        assert survivor.returncode == 0, err[-3000:]
    finally:
        for proc in (victim, survivor):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    trials = {t.number: t for t in _trials(optuna_name)}
    killed = trials[victim_trial]
    assert killed.state != TrialState.COMPLETE and killed.state in (TrialState.RUNNING, TrialState.FAIL)
    assert killed.user_attrs["worker"].endswith(f":{victim.pid}")

    # every completed trial is the survivor's, once each, and matches what its worker wrote
    complete = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials
    assert all(t.user_attrs["worker"].endswith(f":{survivor.pid}") for t in complete)
    for trial in complete:
        record = json.loads((Path(trial.user_attrs["run_dir"]) / "tuning_trial.json").read_text())
        assert (record["study"], record["trial"], record["value"]) == (optuna_name, trial.number, trial.value)
        assert record["params"] == trial.params
    assert len({t.user_attrs["run_dir"] for t in complete}) == n_trials

    # the heartbeat marks the dead worker's trial FAIL (the survivor may already have done it)
    time.sleep(GRACE + HEARTBEAT)
    storage = _storage()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(optuna.load_study(study_name=optuna_name, storage=storage))
    assert storage.get_trial(killed._trial_id).state == TrialState.FAIL

    # the survivor's report counts the completed trials and never the killed one as complete
    summary = json.loads((tmp_path / "survivor" / "tuning" / study / "summary.json").read_text())
    row = summary["models"][0]
    assert row["complete"] == n_trials and row["failed"] + row["running"] == 1
    assert summary["storage"].startswith("postgresql://") and "***" in summary["storage"]
