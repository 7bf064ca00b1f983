"""benchmarks/gpu_check.py does not rot: its CPU dry run (``--device=cpu --quick``) runs every part
end to end and writes the report; without CUDA the real run refuses with one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = ["env", "zoo", "softmax", "evaluation", "ddp", "energy"]


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run(f"--output={out}", "--device=cpu", "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_part_runs_and_reports(dry_run):
    out, report, markdown = dry_run
    assert list(report["parts"]) == PARTS
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert statuses == {name: "ok" for name in PARTS}, {n: report["parts"][n].get("failures") or
                                                        report["parts"][n].get("error") for n in PARTS}
    for name in PARTS:
        assert f"**{name}**: ok" in markdown


def test_the_dry_run_measures_what_the_gpu_run_will(dry_run):
    _, report, _ = dry_run
    parts = report["parts"]
    zoo = parts["zoo"]["models"]
    assert {row["model"] for row in zoo} == {"SASRec", "BERT4Rec", "GRU4RecCPR"}
    for row in zoo:
        for precision in ("fp32", "bf16"):
            assert row[precision]["finite"] and row[precision]["train_seconds"] > 0, row
    scales = parts["softmax"]["scales"]
    assert [s["n_items"] for s in scales] == [1000, 3000]
    for scale in scales:
        assert set(scale["variants"]) == {"full fp32", "full amp", "sampled fp32", "sampled amp"}
        assert all(v["rows_per_s"] > 0 for v in scale["variants"].values())
    assert parts["evaluation"]["contexts"] > 0 and parts["evaluation"]["energy_path"] == "factorised"
    assert parts["ddp"]["returncode"] == 0 and parts["ddp"]["ranks_in_step"] is True
    assert parts["energy"]["max_rel_gap_device_vs_cpu"] < 1e-9
    assert parts["energy"]["tf32_factor_check"] == "passed"


def test_without_cuda_it_refuses_with_one_line(tmp_path):
    proc = _run(f"--output={tmp_path / 'out'}", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: gpu_check needs a CUDA device")
    assert not (tmp_path / "out").exists()


def test_an_unknown_part_is_a_one_line_error(tmp_path):
    proc = _run(f"--output={tmp_path}", "--device=cpu", "--parts=env,warp", timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: unknown part 'warp'"
