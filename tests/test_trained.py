"""Measuring and serving a model that is already trained (``--checkpoint``; recbole_popprior/trained.py),
RecBole's own pickled checkpoints behind ``--trust-pickled-checkpoint``, and the tidy-run rules:
no ``log_tensorboard/`` in the working directory, RecBole's dumps in run.log only, the last log line
naming the outputs' folder."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from recbole.config import Config as RecBoleConfig
from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation as recbole_data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer as RecBoleTrainer

from recbole_popprior.beta_sweep import run_beta_sweep
from recbole_popprior.checkpoint import load_recbole_checkpoint, load_trained_checkpoint
from recbole_popprior.cli import main
from recbole_popprior.errors import PopPriorError

TINY = ["--epochs=1", "--hidden_size=8", "--inner_size=16", "--n_layers=1", "--n_heads=1", "--MAX_ITEM_LIST_LENGTH=8",
        "--train_batch_size=64", "--show_progress=False", "--gpu_id=''", "--metrics=['Recall','NDCG','PopEnergy']",
        "--valid_metric=NDCG@10"]


@pytest.fixture()
def trained(tiny_data, tmp_path, monkeypatch, capfd):
    """One plugin run of the CLI (prior_tau 1, prior_alpha 0.5): its results.json."""
    monkeypatch.chdir(tmp_path)
    assert main(["--model=SASRec", "--dataset=tiny", f"--data_path={tiny_data}", f"--output={tmp_path / 'runs'}",
                 "--prior_alpha=0.5", *TINY]) == 0, capfd.readouterr().err[-2000:]
    (path,) = (tmp_path / "runs").glob("SASRec-tiny-*/results.json")
    capfd.readouterr()
    return json.loads(path.read_text())


def _only_folder(root: Path, pattern: str) -> Path:
    (folder,) = root.glob(pattern)
    return folder


def test_a_checkpoint_is_evaluated_without_training_and_gives_the_runs_own_test_result(trained, tiny_data, tmp_path,
                                                                                       capfd):
    """The settings come from the checkpoint (hidden size, prior_alpha, ...): no --model, no --hidden_size."""
    status = main([f"--checkpoint={trained['checkpoint']}", f"--data_path={tiny_data}", f"--output={tmp_path / 'ev'}",
                   "--gpu_id=''"])
    err = capfd.readouterr().err
    assert status == 0, err[-2000:]
    run = _only_folder(tmp_path / "ev", "eval-SASRec-tiny-*")
    result = json.loads((run / "results.json").read_text())
    assert result["trained"] is False and result["prior_tau"] == trained["prior_tau"] == 1.0
    for key in ("recall@10", "ndcg@10", "pop_dir_frac", "pop_shared_frac", "pop_contexts"):
        assert result["test_result"][key] == pytest.approx(trained["test_result"][key], rel=1e-6), key
    assert "emb_erank" in result["test_result"]  # the energy metrics are added to the saved ones
    assert sorted(os.listdir(run)) == ["results.json", "run.log"]  # nothing trained, no model written
    assert "nothing is trained" in (run / "run.log").read_text()
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert "outputs in" in last and str(run) in last


def test_the_beta_sweep_serves_a_checkpoint_and_its_beta_tau_row_is_the_trained_model(trained, tiny_data, tmp_path):
    rows = run_beta_sweep(None, None, [0.0, 1.0], config_dict={"data_path": str(tiny_data), "gpu_id": ""},
                          output=tmp_path / "sweep", checkpoint=trained["checkpoint"])
    at_tau = next(r for r in rows if r["beta"] == trained["prior_tau"])
    for key in ("recall@10", "ndcg@10", "pop_dir_frac"):
        assert at_tau[key] == pytest.approx(trained["test_result"][key], rel=1e-6), key
    assert rows[0]["pop_dir_frac"] == pytest.approx(rows[1]["pop_dir_frac"], rel=1e-9)  # beta is serving only
    assert not (tmp_path / "sweep" / "run" / "model.pth").exists()
    saved = json.loads((tmp_path / "sweep" / "beta_sweep.json").read_text())
    assert saved["checkpoint"] == trained["checkpoint"] and saved["trained"] is False


def test_a_checkpoint_of_another_model_is_one_line(trained, tiny_data, tmp_path, capfd):
    assert main([f"--checkpoint={trained['checkpoint']}", "--model=GRU4Rec", f"--data_path={tiny_data}",
                 f"--output={tmp_path / 'x'}"]) == 2
    assert re.fullmatch(r"error: checkpoint .* holds a SASRec, not a GRU4Rec: drop --model or change it\n",
                        capfd.readouterr().err)


# --- RecBole's own checkpoints ----------------------------------------------------------------------
@pytest.fixture()
def recbole_checkpoint(tiny_data, tmp_path, monkeypatch):
    """A checkpoint written by RecBole 1.2.1 itself: its Config, its SASRec, its Trainer's pickle.
    Returns the file and RecBole's own test result for that model."""
    for name, alias in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        monkeypatch.setattr(np, name, alias, raising=False)  # RecBole's Config reads these numpy 1 aliases
    monkeypatch.chdir(tmp_path)
    config = RecBoleConfig("SASRec", "tiny", config_dict={
        "data_path": str(tiny_data), "gpu_id": "", "hidden_size": 8, "inner_size": 16, "n_layers": 1, "n_heads": 1,
        "MAX_ITEM_LIST_LENGTH": 8, "train_neg_sample_args": None, "epochs": 1, "train_batch_size": 64,
        "checkpoint_dir": str(tmp_path / "rb"), "show_progress": False, "metrics": ["Recall", "NDCG"],
        "valid_metric": "NDCG@10", "state": "WARNING", "load_col": {"inter": ["user_id", "item_id", "timestamp"]}})
    dataset = recbole_create_dataset(config)
    train, valid, test = recbole_data_preparation(config, dataset)
    trainer = RecBoleTrainer(config, SASRec(config, train._dataset))
    trainer.fit(train, valid, saved=True, show_progress=False)
    expected = trainer.evaluate(test, load_best_model=False, show_progress=False)
    assert not (tmp_path / "log_tensorboard").exists()  # RecBole's own trainer too (compat shim 8)
    return Path(trainer.saved_model_file), dict(expected)


def test_a_recbole_checkpoint_is_refused_unless_trusted_then_served_as_recbole_serves_it(recbole_checkpoint, tiny_data,
                                                                                         tmp_path, capfd):
    path, expected = recbole_checkpoint
    with pytest.raises(PopPriorError, match="pickle of Python objects .* add --trust-pickled-checkpoint"):
        load_trained_checkpoint(path)
    assert main([f"--checkpoint={path}", f"--data_path={tiny_data}", f"--output={tmp_path / 'ev'}"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--trust-pickled-checkpoint" in err
    assert not (tmp_path / "ev").exists()
    status = main([f"--checkpoint={path}", "--trust-pickled-checkpoint", f"--data_path={tiny_data}",
                   f"--output={tmp_path / 'ev'}", "--metrics=['Recall','NDCG']", "--gpu_id=''"])
    assert status == 0, capfd.readouterr().err[-2000:]
    result = json.loads((_only_folder(tmp_path / "ev", "eval-SASRec-tiny-*") / "results.json").read_text())
    assert result["prior_tau"] == 0.0  # RecBole's model: the plugin's class at tau = 0 is RecBole's, bit for bit
    for key in ("recall@10", "ndcg@10"):
        assert result["test_result"][key] == pytest.approx(expected[key], abs=1e-12), key


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_the_trusted_path_still_builds_nothing_but_tensors_and_placeholders(recbole_checkpoint, tmp_path):
    """--trust-pickled-checkpoint reads RecBole's pickle with a restricted unpickler: a file that
    names any other callable (here os.system) is refused, and the callable never runs."""
    path, _ = recbole_checkpoint
    state = load_recbole_checkpoint(path)
    assert state["meta"]["source"] == "recbole" and state["meta"]["config"]["model"] == "SASRec"
    assert all(isinstance(v, torch.Tensor) for v in state["state_dict"].values())
    evil = tmp_path / "evil.pth"
    torch.save({"config": _Boom(), "state_dict": {}}, evil, pickle_protocol=4)
    with pytest.raises(PopPriorError, match=r"names posix\.system|names os\.system"):
        load_trained_checkpoint(evil, trust_pickle=True)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(pickle.UnpicklingError):  # and torch's own reader agrees it is not plain data
        torch.load(evil, weights_only=True)


# --- tidy runs ---------------------------------------------------------------------------------------
def test_no_tensorboard_in_the_working_directory_and_dumps_only_in_run_log(tiny_data, tmp_path, monkeypatch, capfd):
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o555)  # a read-only working directory (issue 19, item 14): nothing may be written there
    monkeypatch.chdir(work)
    try:
        assert main(["--model=SASRec", "--dataset=tiny", f"--data_path={tiny_data}", f"--output={tmp_path / 'a'}",
                     *TINY]) == 0, capfd.readouterr().err[-2000:]
        quiet = capfd.readouterr().err
        assert main(["--model=SASRec", "--dataset=tiny", f"--data_path={tiny_data}", f"--output={tmp_path / 'b'}",
                     "--tensorboard=True", "--verbose", *TINY]) == 0
        loud = re.sub(r"\x1b\[[0-9;]*m", "", capfd.readouterr().err)  # without the console's colours
    finally:
        work.chmod(0o755)
    assert os.listdir(work) == []
    run_a, run_b = _only_folder(tmp_path / "a", "SASRec-tiny-*"), _only_folder(tmp_path / "b", "SASRec-tiny-*")
    assert not (run_a / "log_tensorboard").exists()
    assert list((run_b / "log_tensorboard").rglob("events.out.tfevents.*"))
    dumps = ("hidden_size = 8", "The number of items", "Trainable parameters")  # config, dataset, model dumps
    for text in dumps:
        assert text in (run_a / "run.log").read_text() and text not in quiet, text
        assert text in loud, text
    assert "outputs in" in [line for line in quiet.splitlines() if line.strip()][-1]
