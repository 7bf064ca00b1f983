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


def test_every_arm_key_is_shipped() -> None:
    """The remedy arms' keys have defaults (DESIGN §7), so no arm of ARMS is refused for a missing key."""
    keys = _shipped_keys()
    for spec in ARMS.values():
        assert {*spec.overrides, *spec.requires} <= keys, spec.name


def test_remedy_arms_run_end_to_end(tmp_path, monkeypatch) -> None:
    """--compare --arms=standard,directspec,directspec_plus,adap_tau,resn,ace on tiny synthetic data: each
    arm trains the plugin's model with its own objective at tau = 0 (ace: the given table, RecBole's
    loss), every arm is measured on the standard arm's contexts and reported against it."""
    import numpy as np

    from recbole_popprior import compare

    trained = {}
    original = compare.train_arm

    def spy(name, config, **kwargs):
        arm = original(name, config, **kwargs)
        objective = getattr(arm.pipe.model, "training_objective", None)
        trained[name] = (type(objective).__name__, config["prior_tau"], config["remedy"], config["ace_init"],
                         config["directspec_plus"] if name.startswith("directspec") else None)
        return arm

    monkeypatch.setattr(compare, "train_arm", spy)
    table = tmp_path / "items.npy"
    np.save(table, np.random.default_rng(0).standard_normal((20, 12)) * np.geomspace(2.0, 0.1, 12))
    arms = "standard,directspec,directspec_plus,adap_tau,resn,ace"
    payload = run_compare("SASRec", "synthetic", config_dict=_settings(tmp_path, epochs=1, ace_init=str(table)),
                          seeds=1, output=tmp_path / "o", arms=arms)
    assert trained == {
        "standard": ("NoneType", 0.0, None, None, None),
        "directspec": ("DirectSpecObjective", 0.0, "directspec", None, False),
        "directspec_plus": ("DirectSpecObjective", 0.0, "directspec", None, True),
        "adap_tau": ("AdapTauObjective", 0.0, "adap_tau", None, None),
        "resn": ("ReSNObjective", 0.0, "resn", None, None),
        "ace": ("NoneType", 0.0, None, str(table), None),
    }
    assert (tmp_path / "o" / "compare.json").is_file()
    reductions = payload["per_seed"][0]["reductions"]
    assert set(reductions) == set(arms.split(",")) - {"standard"}
    for name, red in reductions.items():
        assert np.isfinite(red["R_dir"]) and np.isfinite(red["R_shared"]) and 0 < red["p_value_dir"] <= 1, name
    rows = {row["arm"]: row for row in payload["summary"]}
    assert all(0.0 <= rows[name]["dir_frac"]["mean"] <= 1.0 for name in arms.split(","))


def test_compare_with_sampled_softmax_trains_the_plugins_standard_arm(tmp_path) -> None:
    """With softmax_negatives > 0 the training objective is the plugin's, so the standard arm is the
    plugin's class at tau = 0 (RecBole's own class cannot take it)."""
    payload = run_compare("SASRec", "synthetic", config_dict=_settings(tmp_path, epochs=1, softmax_negatives=6),
                          seeds=1, output=tmp_path / "o", arms="standard,separated")
    standard = next(arm for arm in payload["arms"] if arm["name"] == "standard")
    assert standard["baseline"] is False and "plugin's objective" in standard["label"]
    assert set(payload["per_seed"][0]["reductions"]) == {"separated"}
