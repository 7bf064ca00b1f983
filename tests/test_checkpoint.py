"""The plugin's checkpoint format (recbole_popprior/checkpoint.py, compat shim 3): state dict plus
JSON metadata, loaded with ``weights_only=True``; damaged or foreign files are one-line errors
and never run code."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from recbole.utils import init_seed

from recbole_popprior import checkpoint
from recbole_popprior.config import Config
from recbole_popprior.data import create_dataset, data_preparation
from recbole_popprior.errors import PopPriorError
from recbole_popprior.model import supported_models
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


# --- every supported model round-trips (issue 14: SASRecF/GRU4RecF/FDSA could not be saved) ----
@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory) -> Path:
    from test_model_zoo import write_zoo

    return write_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def s3rec_pretrained(zoo_data, tmp_path_factory) -> Path:
    from test_model_zoo import zoo_config

    config = Config(model="S3Rec", dataset="zoo", config_dict=zoo_config("S3Rec", zoo_data, train_stage="pretrain"))
    train_data, _, _ = data_preparation(config, create_dataset(config))
    path = tmp_path_factory.mktemp("s3rec") / "pretrained.pth"
    checkpoint.save_checkpoint(path, config.model_class(config, train_data._dataset), config=config)
    return path


@pytest.mark.parametrize("name", supported_models())
def test_every_supported_model_scores_the_same_after_a_save_and_load(name, zoo_data, s3rec_pretrained, tmp_path):
    """Train one step, save (with the optimiser, as the trainer does), load into a model built
    with another seed: its scores equal the saved model's exactly, and the file unpickles no code."""
    from test_model_zoo import zoo_config

    extra = {"train_stage": "finetune", "pre_model_path": str(s3rec_pretrained)} if name == "S3Rec" else {}
    config = Config(model=name, dataset="zoo", config_dict=zoo_config(name, zoo_data, **extra))
    train_data, valid_data, _ = data_preparation(config, create_dataset(config))
    batch = next(iter(valid_data))[0]
    init_seed(1, True)
    model = config.model_class(config, train_data._dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    model.calculate_loss(next(iter(train_data))).backward()
    optimizer.step()
    path = checkpoint.save_checkpoint(tmp_path / "m.pth", model, config=config, optimizer=optimizer)

    init_seed(2, True)
    fresh = config.model_class(config, train_data._dataset)
    assert not torch.equal(_scores(fresh, batch), _scores(model, batch))
    state = checkpoint.load_checkpoint(path)
    checkpoint.restore_model(fresh, state, path)
    assert torch.equal(_scores(fresh, batch), _scores(model, batch))
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.05)
    fresh_optimizer.load_state_dict(state["optimizer"])
    # nothing in the file needs unpickling beyond tensors and plain containers
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    globals_used = {op.arg for op in _pickle_ops(pickled) if op.name in ("GLOBAL", "STACK_GLOBAL")}
    assert not {g for g in globals_used if g and not str(g).startswith(("torch", "collections"))}


def _pickle_ops(data: bytes):
    import pickletools
    from dataclasses import dataclass

    @dataclass
    class Op:
        name: str
        arg: object

    strings: list = []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        if opcode.name == "STACK_GLOBAL":
            yield Op(opcode.name, ".".join(strings[-2:]))
        else:
            yield Op(opcode.name, arg)


# --- damaged files -----------------------------------------------------------------------------
def _largest_tensor(path: Path) -> tuple[int, int]:
    """Byte offset and size of the largest tensor member (``.../data/<n>``) of a checkpoint."""
    import struct

    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _saved_sasrec(tiny_data, tmp_path):
    overrides = tiny_config(tiny_data, run_dir=str(tmp_path / "run"))
    pipe = build_pipeline(build_config("SASRec", "tiny", config_dict=overrides), log=False)
    return pipe, checkpoint.save_checkpoint(tmp_path / "model.pth", pipe.model, config=pipe.config)


def test_flipped_bytes_inside_a_tensor_are_a_one_line_error(tiny_data, tmp_path):
    pipe, path = _saved_sasrec(tiny_data, tmp_path)
    start, size = _largest_tensor(path)
    assert size >= 512
    raw = bytearray(path.read_bytes())
    raw[start + size // 2: start + size // 2 + 256] = bytes(b ^ 0xFF for b in raw[start + size // 2: start + size // 2 + 256])
    path.write_bytes(bytes(raw))
    with pytest.raises(PopPriorError, match="corrupt") as info:
        pipe.trainer.load_model_file(str(path))
    assert "\n" not in str(info.value)


def test_the_digest_catches_a_changed_tensor_even_with_valid_zip_crcs(tiny_data, tmp_path):
    """Rewrite the archive with one tensor member changed (fresh CRCs): only the digest can tell."""
    pipe, path = _saved_sasrec(tiny_data, tmp_path)
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    target = max((info for info, _ in members if "/data/" in info.filename), key=lambda i: i.file_size).filename
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in members:
            if info.filename == target:
                data = bytes(b ^ 0x01 for b in data[:64]) + data[64:]
            archive.writestr(info, data)
    assert zipfile.ZipFile(path).testzip() is None
    assert torch.load(path, weights_only=True)["format"] == checkpoint.CHECKPOINT_FORMAT  # torch loads it
    with pytest.raises(PopPriorError, match="digest"):
        checkpoint.load_checkpoint(path)


def test_refusing_pickled_code_does_not_advise_turning_weights_only_off(tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "state_dict": _Evil(tmp_path / "pwned")}, path)
    with pytest.raises(PopPriorError) as info:
        checkpoint.load_checkpoint(path)
    message = str(info.value)
    assert "weights_only" not in message and "False" not in message and "\n" not in message
    assert "system" in message and "could run code" in message
    assert not (tmp_path / "pwned").exists()


def test_mismatch_names_the_missing_unexpected_and_misshaped_keys(tmp_path):
    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)  # 4 outputs where the checkpoint has 2
            self.extra = torch.nn.Linear(2, 2)

    path = checkpoint.save_checkpoint(tmp_path / "m.pth", _Model())
    state = checkpoint.load_checkpoint(path)
    state["state_dict"]["stray.weight"] = torch.zeros(1)
    with pytest.raises(PopPriorError) as info:
        checkpoint.restore_model(Other(), state, path)
    message = str(info.value)
    assert "missing keys extra.weight, extra.bias" in message
    assert "unexpected keys stray.weight" in message
    assert "lin.weight 2x3 (model 4x3)" in message and "lin.bias 2 (model 4)" in message
    assert "\n" not in message


# --- issue 19, 9: the digest is mandatory and the structure is checked before use -------------------
def _saved_state(tmp_path) -> tuple[Path, dict]:
    path = checkpoint.save_checkpoint(tmp_path / "m.pth", _Model(), epoch=3)
    return path, torch.load(path, weights_only=True)


def test_a_checkpoint_without_its_digest_is_refused_even_when_unchanged(tmp_path):
    path, state = _saved_state(tmp_path)
    meta = json.loads(state["meta"])
    del meta["digest"]
    for changed in (False, True):
        if changed:  # the bypass of the issue: no digest, and different weights
            state["state_dict"]["lin.weight"] = state["state_dict"]["lin.weight"] + 1.0
        torch.save({**state, "meta": json.dumps(meta)}, path)
        with pytest.raises(PopPriorError, match="records no content digest"):
            checkpoint.load_checkpoint(path)


@pytest.mark.parametrize("damage, words", [
    ("a list as state dict", "state dict is not a mapping of names to tensors"),
    ("a string in the state dict", "state dict is not a mapping of names to tensors"),
    ("an optimizer that is a list", "optimizer entry is a list"),
    ("metadata that is not text", "metadata is not a JSON string"),
    ("deeply nested metadata", "metadata nests too deeply"),
    ("deeply nested optimizer state", "nest more than 16 levels deep"),
])
def test_a_checkpoint_of_another_structure_is_one_line(tmp_path, damage, words):
    path, state = _saved_state(tmp_path)
    nested: list = []
    for _ in range(100 if damage == "deeply nested optimizer state" else 0):
        nested = [nested]
    state = {**state, **{
        "a list as state dict": {"state_dict": list(state["state_dict"].values())},
        "a string in the state dict": {"state_dict": {"lin.weight": "x"}},
        "an optimizer that is a list": {"optimizer": [1, 2]},
        "metadata that is not text": {"meta": {"digest": "x"}},
        "deeply nested metadata": {"meta": "[" * 100_000 + "]" * 100_000},
        "deeply nested optimizer state": {"optimizer": {"state": nested}},
    }[damage]}
    torch.save(state, path)
    with pytest.raises(PopPriorError, match=words) as info:
        checkpoint.load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_a_compressed_member_is_refused_before_it_is_unpacked(tmp_path):
    """torch.save stores its members uncompressed; a deflated member (a zip bomb: 1 GB of zeros in
    1 MB) is refused before anything reads it."""
    path, state = _saved_state(tmp_path)
    names = zipfile.ZipFile(path).namelist()
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in names:
            archive.writestr(name, source.read(name), compress_type=zipfile.ZIP_STORED)
        with archive.open(f"{names[0].split('/')[0]}/huge", "w") as member:  # deflated, streamed
            for _ in range(1 << 10):
                member.write(bytes(1 << 20))
    assert bomb.stat().st_size < 5 << 20
    with pytest.raises(PopPriorError, match="huge is compressed, which torch.save never does"):
        checkpoint.load_checkpoint(bomb)
