"""The arms of a comparison and ``--arms`` (recbole_popprior/arms.py; docs/DESIGN.md §3.2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from recbole_popprior.arms import ARMS, DEFAULT_ARMS, ArmSpec, arm_overrides, check_arms, parse_arms
from recbole_popprior.cli import parse_args
from recbole_popprior.compare import run_compare
from recbole_popprior.config import properties_file
from recbole_popprior.errors import PopPriorError
from conftest import synthetic_settings as _settings

ROOT = Path(__file__).resolve().parent.parent


def test_parse_arms_default_order_and_errors() -> None:
    assert parse_arms(None) == DEFAULT_ARMS == ("standard", "separated")
    assert parse_arms("separated, standard") == ("standard", "separated")  # the reference goes first
    with pytest.raises(PopPriorError, match="unknown arm 'sep'.*known arms: standard, separated, directspec"):
        parse_arms("standard,sep")
    for bad, message in (("separated", "must include standard"), ("standard", "at least one arm"),
                         ("standard,separated,separated", "twice")):
        with pytest.raises(PopPriorError, match=message):
            parse_arms(bad)


def test_cli_arms_option() -> None:
    options, overrides = parse_args(["--model=SASRec", "--dataset=x", "--compare", "--arms=standard,separated"])
    assert options["arms"] == ("standard", "separated") and overrides == {}
    assert parse_args(["--compare"])[0]["arms"] is None  # run_compare's default: standard,separated
    with pytest.raises(PopPriorError, match="add --compare"):
        parse_args(["--arms=standard,separated"])
    with pytest.raises(PopPriorError, match="known arms"):
        parse_args(["--compare", "--arms=standard,nope"])


def test_cli_unknown_arm_is_one_line_and_exit_2() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "run_recbole_popprior.py"), "--model=SASRec",
                           "--dataset=ml-100k", "--compare", "--arms=standard,bogus"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: unknown arm 'bogus'") and "separated" in lines[0]


DEFAULTS = {"prior_tau": 1.0, "energy_subspace": 0.95, "energy_max_contexts": None}
TABLE = {"standard": ArmSpec("standard", "std", {"prior_tau": 0.0}, baseline=True),
         "sub": ArmSpec("sub", "sub", {"prior_tau": 0.0, "energy_subspace": 0.5}),
         "needs": ArmSpec("needs", "needs", {"prior_tau": 0.0}, requires=("energy_max_contexts",)),
         "ghost": ArmSpec("ghost", "ghost", {"no_such_key": 1})}


def test_check_arms_one_line_errors() -> None:
    config = dict(DEFAULTS)
    check_arms(["standard", "sub"], TABLE, DEFAULTS, config)
    with pytest.raises(PopPriorError, match="arm 'ghost' needs config key.*no_such_key.*properties/overall.yaml"):
        check_arms(["standard", "ghost"], TABLE, DEFAULTS, config)
    with pytest.raises(PopPriorError, match="arm 'needs' needs --energy_max_contexts="):
        check_arms(["standard", "needs"], TABLE, DEFAULTS, config)
    check_arms(["standard", "needs"], TABLE, DEFAULTS, {**config, "energy_max_contexts": 5})
    with pytest.raises(PopPriorError, match="energy_subspace is chosen per arm"):
        check_arms(["standard", "sub"], TABLE, DEFAULTS, {**config, "energy_subspace": 0.9})


def test_arm_overrides_keep_arm_keys_to_their_arm() -> None:
    table = {k: v for k, v in TABLE.items() if k != "ghost"}
    std = arm_overrides(table["standard"], table, DEFAULTS)
    needs = arm_overrides(table["needs"], table, DEFAULTS)
    sub = arm_overrides(table["sub"], table, DEFAULTS)
    # the user's energy_max_contexts reaches "needs" only; energy_subspace is "sub"'s own
    assert std == {"energy_max_contexts": None, "energy_subspace": 0.95, "prior_tau": 0.0, "popprior_baseline": True}
    assert needs == {"energy_subspace": 0.95, "prior_tau": 0.0, "popprior_baseline": False}
    assert sub == {"energy_max_contexts": None, "energy_subspace": 0.5, "prior_tau": 0.0, "popprior_baseline": False}
    assert "prior_tau" not in arm_overrides(ArmSpec("sep", "sep"), table, DEFAULTS)  # the user's tau


def _shipped_keys() -> set[str]:
    import yaml

    return set(yaml.safe_load(properties_file("overall.yaml").read_text()))


@pytest.mark.parametrize("name", [n for n in ARMS if n not in DEFAULT_ARMS])
def test_remedy_arms_fail_before_training_while_their_keys_are_unknown(name, tmp_path) -> None:
    spec = ARMS[name]
    missing = [k for k in (*spec.overrides, *spec.requires) if k not in _shipped_keys()]
    if not missing:
        pytest.skip(f"{name}: its config keys are shipped")
    with pytest.raises(PopPriorError, match=f"arm '{name}' needs config key.*{missing[0]}") as info:
        run_compare("SASRec", "synthetic", config_dict=_settings(tmp_path), seeds=1, output=tmp_path / "o",
                    arms=f"standard,{name}")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()  # nothing trained, nothing written
