"""Tuning loses nothing (issue 19): a torn journal is cut at its last record (never appended to), two
storages, a re-created study, another dataset or another search space never share a tuning folder,
a failed trial is one line on stderr (its traceback in tuning.log), and the running trials of a
killed worker are failed. ``benchmarks/kill_tuning.py`` SIGKILLs whole studies at random points."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from recbole_popprior.errors import PopPriorError
from recbole_popprior.tuning import run_tuning

from test_tuning import _config, _options, _write


def _journal_study(path: Path, name: str) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


@pytest.mark.parametrize("damage", ["a writer killed mid-record", "cut short mid-line"])
def test_a_torn_journal_keeps_its_records_and_the_study_resumes(tiny_data, out_dir, damage):
    """Optuna's reader skips a last line without its newline, and its next append used to land right
    after it: one merged line that is no JSON, and a study no command could read again (issue 19, 3)."""
    config, journal = _config(tiny_data, out_dir, tune_plots=False), out_dir / "j.journal"
    out_dir.mkdir(parents=True)
    run_tuning("SASRec", "tiny", config_dict=config,
               options=_options(n_trials=1, study_name="j", storage=f"journal:{journal}"))
    intact = journal.read_bytes()
    before = _journal_study(journal, "j.SASRec").get_trials()
    if damage == "a writer killed mid-record":
        journal.write_bytes(intact + b'{"op_code":5,"worker_id":"w-1","trial_id":0,"param_na')
    else:  # the last record loses its end: it is gone, every earlier one stays
        journal.write_bytes(intact[:-7])
    torn = journal.read_bytes()
    run_tuning("SASRec", "tiny", config_dict=config,
               options=_options(n_trials=1, study_name="j", storage=f"journal:{journal}"))
    (saved,) = out_dir.glob("j.journal.torn-*")
    assert saved.read_bytes() == torn  # the file as it was is kept
    text = journal.read_bytes()
    assert all(json.loads(line) for line in text.splitlines()) and text.endswith(b"\n")
    cut = torn.rfind(b"\n") + 1
    assert text.startswith(torn[:cut])  # every complete record before the tear is still there
    trials = _journal_study(journal, "j.SASRec").get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 1 + (damage == "a writer killed mid-record")
    if damage == "a writer killed mid-record":
        assert [(t.number, t.state, t.value, t.params) for t in trials[:1]] == \
               [(t.number, t.state, t.value, t.params) for t in before]


def test_a_second_storage_another_dataset_or_space_never_share_a_study_folder(tiny_data, out_dir, tmp_path):
    """Two storages (or a study created again) under one --study-name and --output wrote into the
    same trial folders and summary (issue 19, 4); a resumed study with another dataset or search
    space mixed both in its report."""
    config = _config(tiny_data, out_dir, tune_plots=False)
    run_tuning("SASRec", "tiny", config_dict=config, options=_options(n_trials=1))
    folder = out_dir / "tuning" / "t"
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "tuning.log"}
    assert (folder / "trials" / "SASRec" / "0" / "model.pth") in files
    (tmp_path / "other").mkdir()
    with pytest.raises(PopPriorError, match="holds the trials of the same study name in another storage"):
        run_tuning("SASRec", "tiny", config_dict=config,
                   options=_options(n_trials=1, storage=f"sqlite:///{tmp_path / 'other' / 'b.db'}"))
    (out_dir / "tuning" / "t.db").rename(tmp_path / "moved.db")  # the study is deleted and made again
    with pytest.raises(PopPriorError, match="holds the trials of an earlier study t.SASRec"):
        run_tuning("SASRec", "tiny", config_dict=config, options=_options(n_trials=1))
    (tmp_path / "moved.db").rename(out_dir / "tuning" / "t.db")
    shutil.copytree(tiny_data / "tiny", tiny_data / "tiny2")
    (tiny_data / "tiny2" / "tiny.inter").rename(tiny_data / "tiny2" / "tiny2.inter")
    with pytest.raises(PopPriorError, match="was run on dataset tiny, not tiny2"):
        run_tuning("SASRec", "tiny2", config_dict=config, options=_options(n_trials=1))
    space = _write(tmp_path / "space.yaml", "prior_alpha: ~\n")
    with pytest.raises(PopPriorError, match="was run with the search space"):
        run_tuning("SASRec", "tiny", config_dict=config, options=_options(n_trials=1, search_space=str(space)))
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "tuning.log"} == files
    assert not (tmp_path / "other" / "b.db").exists()  # a refused command leaves no new storage behind
    study = optuna.load_study(study_name="t.SASRec", storage=f"sqlite:///{out_dir / 'tuning' / 't.db'}")
    assert len(study.get_trials()) == 1


def test_a_failed_trial_is_one_line_on_stderr_and_its_traceback_is_in_tuning_log(tiny_data, out_dir, tmp_path, capfd):
    from recbole_popprior.cli import main

    space = _write(tmp_path / "nan.yaml", "prior_tau: {type: categorical, choices: [1.0e39]}\n")
    status = main(["--tune", "--model=SASRec", "--dataset=tiny", "--n-trials=1", "--study-name=e",
                   f"--search-space={space}", f"--data_path={tiny_data}", f"--output={out_dir}", "--tune_plots=False",
                   "--epochs=1", "--hidden_size=8", "--inner_size=16", "--n_layers=1", "--n_heads=1", "--gpu_id=''"])
    err = capfd.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: no trial of SASRec completed: 1 failed")
    assert sum("trial 0 FAIL" in line for line in err.splitlines()) == 1
    log = (out_dir / "tuning" / "e" / "tuning.log").read_text()
    assert "Traceback (most recent call last)" in log and "prior_tau must be a finite float32" in log


def test_the_running_trials_of_a_killed_worker_on_this_machine_are_failed(tmp_path):
    import socket

    from recbole_popprior.tuning.studies import fail_dead_trials

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.create_study(study_name="d", storage=f"sqlite:///{tmp_path / 'd.db'}")
    gone, alive, elsewhere = study.ask(), study.ask(), study.ask()
    gone.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    elsewhere.set_user_attr("worker", f"another-host:{dead.pid}")
    assert fail_dead_trials(study) == [gone.number]
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {gone.number: TrialState.FAIL, alive.number: TrialState.RUNNING,
                      elsewhere.number: TrialState.RUNNING}
    assert "died while it ran" in study.get_trials()[gone.number].user_attrs["fail_reason"]


def test_an_append_after_a_writer_died_mid_record_cuts_the_torn_tail_first(tmp_path):
    from recbole_popprior.tuning.journal import CheckedJournal

    path = tmp_path / "x.journal"
    journal = CheckedJournal(str(path))
    journal.append_logs([{"op_code": 0, "worker_id": "a"}])
    intact = path.read_bytes()
    with open(path, "ab") as handle:  # another process, killed half-way through its record
        handle.write(b'{"op_code": 1, "wor')
    journal.append_logs([{"op_code": 2, "worker_id": "b"}])
    assert path.read_bytes() == intact + b'{"op_code":2,"worker_id":"b"}\n'
    (saved,) = tmp_path.glob("x.journal.torn-*")
    assert saved.read_bytes() == intact + b'{"op_code": 1, "wor'
    assert [log["op_code"] for log in journal.read_logs(0)] == [0, 2]
