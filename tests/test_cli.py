"""The command line: RecBole conventions, results on disk, one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recbole_popprior.cli import parse_args
from recbole_popprior.errors import PopPriorError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "run_recbole_popprior.py"
TINY_ARGS = ["--epochs=1", "--hidden_size=8", "--inner_size=16", "--n_layers=1", "--n_heads=1",
             "--MAX_ITEM_LIST_LENGTH=8", "--train_batch_size=64", "--show_progress=False", "--gpu_id=''"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600)


def test_parse_args_splits_plugin_options_from_recbole_overrides():
    options, overrides = parse_args(["--model=SASRec", "--dataset=ml-100k", "--learning_rate=0.01",
                                     "--compare", "--seeds=2", "--beta-sweep=-1,0,0.5"])
    assert options["model"] == "SASRec" and options["compare"] is True and options["seeds"] == 2
    assert options["beta_sweep"] == [-1.0, 0.0, 0.5]
    assert overrides == {"learning_rate": "0.01"}


@pytest.mark.parametrize("argv", [["--seeds=x"], ["stray"], ["--compare=maybe"], ["--unknownflag"],
                                  ["--beta-sweep=a,b"], ["--lr=1", "--lr=2"]])
def test_parse_args_rejects_bad_input(argv):
    with pytest.raises(PopPriorError):
        parse_args(argv)


def test_cli_trains_and_saves_results_json(tiny_data, tmp_path):
    out = tmp_path / "saved"
    proc = run_cli("--model=SASRec", "--dataset=tiny", f"--data_path={tiny_data}", f"--output={out}", *TINY_ARGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = list(out.glob("SASRec-tiny-*/results.json"))
    assert len(results) == 1
    record = json.loads(results[0].read_text())
    assert set(record["test_result"]) >= {"recall@10", "mrr@10", "ndcg@10"}
    assert 0.0 <= record["test_result"]["recall@10"] <= 1.0
    assert Path(record["checkpoint"]).is_file()
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("args, message", [
    (["--model=SASRec", "--dataset=nosuchdata"], "not found"),
    (["--model=SASRec", "--dataset=tiny", "--prior_alpha=-1"], "prior_alpha"),
    (["--model=SASRec", "--dataset=tiny", "--prior_mode=sometimes"], "prior_mode"),
    (["--model=SASRec", "--dataset=tiny", "--prior_tau=abc"], "prior_tau"),
    (["--model=SASRec", "--dataset=tiny", "--config_files=missing.yaml"], "config file not found"),
    (["--model=CORE", "--dataset=tiny", "--loss_type=BPR"], "CORE cannot train with loss_type BPR"),
    (["--model=NoSuchNet", "--dataset=tiny"], "supported models"),
    (["--dataset=tiny"], "--model"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_data, tmp_path, args, message):
    proc = run_cli(*args, f"--data_path={tiny_data}", f"--output={tmp_path}", *TINY_ARGS)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_yaml_config_is_one_line(tiny_data, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n  nope: :\n")
    proc = run_cli("--model=SASRec", "--dataset=tiny", f"--config_files={bad}", f"--data_path={tiny_data}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
