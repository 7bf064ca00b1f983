"""The plugin's checkpoint format (recbole_popprior/checkpoint.py, compat shim 3): state dict plus
JSON metadata, loaded with ``weights_only=True``; damaged or foreign files are one-line errors
and never run code."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from recbole_popprior import checkpoint
from recbole_popprior.errors import PopPriorError
from recbole_popprior.quick_start import build_config, build_pipeline, run_recbole_popprior


def _scores(model, batch):
    model.eval()
    with torch.no_grad():
        return model.full_sort_predict(batch)


def test_checkpoint_round_trip_reproduces_the_run(tiny_data, tmp_path):
    """A trained run's checkpoint loads into fresh models (any seed) and gives its test result."""
    overrides = tiny_config(tiny_data, fast_loader=False, prior_tau=0.9, output=str(tmp_path))
    results = run_recbole_popprior("SASRec", "tiny", config_dict=overrides)
    saved = results["checkpoint"]
    assert Path(saved).is_file()

    fresh = [build_pipeline(build_config("SASRec", "tiny", config_dict={**overrides, "seed": seed,
                                                                        "run_dir": str(tmp_path / f"f{seed}")}),
                            log=False) for seed in (1, 2)]
    batch = next(iter(fresh[0].valid_data))[0]
    before = [_scores(p.model, batch) for p in fresh]
    assert not torch.equal(before[0], before[1])  # different seeds, different untrained weights
    for pipe in fresh:
        pipe.trainer.load_model_file(saved)
    after = [_scores(p.model, batch) for p in fresh]
    assert torch.equal(after[0], after[1])
    assert not torch.equal(after[0], before[0])
    # the loaded model reproduces the test result of the run that wrote the checkpoint
    test_result = fresh[0].trainer.evaluate(fresh[0].test_data, load_best_model=False)
    assert dict(test_result) == pytest.approx(results["test_result"])


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "malicious"])
def test_trainer_refuses_a_bad_checkpoint_and_runs_no_code(tiny_data, tmp_path, damage):
    overrides = tiny_config(tiny_data, fast_loader=False, run_dir=str(tmp_path / "run"))
    pipe = build_pipeline(build_config("SASRec", "tiny", config_dict=overrides), log=False)
    path = tmp_path / "model.pth"
    marker = tmp_path / "pwned"
    if damage == "malicious":
        torch.save({"state_dict": pipe.model.state_dict(), "payload": _Exploit(str(marker))}, path)
    else:
        checkpoint.save_checkpoint(path, pipe.model, config=pipe.config)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\x00not a checkpoint" * 10)
    with pytest.raises(PopPriorError, match="checkpoint"):
        pipe.trainer.load_model_file(str(path))
    assert not marker.exists()
    assert zipfile.is_zipfile(path) or damage != "malicious"
    with pytest.raises(pickle.UnpicklingError if damage == "malicious" else Exception):
        torch.load(path, weights_only=True)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle_payload", "foreign_dict", "empty"])
def test_bad_checkpoint_gives_clear_error_and_runs_no_code(tmp_path, damage):
    path = tmp_path / "m.pth"
    marker = tmp_path / "pwned"
    checkpoint.save_checkpoint(path, _Model())
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 20)
    elif damage == "pickle_payload":
        torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "state_dict": _Evil(marker)}, path)
    elif damage == "foreign_dict":
        torch.save({"state_dict": _Model().state_dict()}, path)
    else:
        path.write_bytes(b"")
    with pytest.raises(PopPriorError) as info:
        checkpoint.load_checkpoint(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "m.pth", _Model())
    other = torch.nn.Sequential(torch.nn.Linear(5, 5))
    with pytest.raises(PopPriorError, match="does not match"):
        checkpoint.restore_model(other, checkpoint.load_checkpoint(path), path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(PopPriorError, match="not found"):
        checkpoint.load_checkpoint(tmp_path / "nope.pth")
