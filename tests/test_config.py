"""The plugin's Config (recbole_popprior/config.py): the precedence its docstring states, literal
parsing of command-line values, the checks of every plugin setting, and the yaml shipped with
the package."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from recbole_popprior import config as config_module
from recbole_popprior.config import Config, parse_literal, properties_file
from recbole_popprior.errors import PopPriorError


def _write(path: Path, values: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


@pytest.fixture()
def layered(tmp_path, monkeypatch):
    """Plugin yaml folders replaced by temporary ones: the real overall.yaml plus probe keys."""
    props, datasets = tmp_path / "properties", tmp_path / "dataset_configs"
    with open(properties_file("overall.yaml"), encoding="utf-8") as handle:
        overall = yaml.safe_load(handle)
    layers = {
        "overall": _write(props / "overall.yaml", {**overall, "eval_step": 7, "repeatable": False,
                                                    "probe_2": "plugin overall"}),
        "model": _write(props / "model" / "SASRec.yaml", {"MAX_ITEM_LIST_LENGTH": 9, "probe_4": "plugin model",
                                                          "probe_2": "plugin model"}),
        "dataset": _write(datasets / "tiny.yaml", {"probe_4": "plugin dataset", "probe_5": "plugin dataset"}),
        "file": _write(tmp_path / "user.yaml", {"probe_5": "config file", "probe_6": "config file"}),
    }
    monkeypatch.setattr(config_module, "properties_file", lambda *parts: props.joinpath(*parts))
    monkeypatch.setattr(config_module, "dataset_config_file", lambda name: datasets / f"{name}.yaml")
    return layers


def test_precedence_is_the_one_the_docstring_states(tiny_data, layered):
    config = Config("SASRec", "tiny", config_file_list=[str(layered["file"])],
                    config_dict=tiny_config(tiny_data, probe_6="config_dict"))
    assert config["eval_step"] == 7                    # 2 > 1: plugin overall over RecBole's overall.yaml
    assert config["repeatable"] is True                # 3 > 2: RecBole's sequential.yaml over plugin overall
    assert config["MAX_ITEM_LIST_LENGTH"] == 8         # 7 > 4: tiny_config sets 8, the plugin model yaml 9
    assert config["probe_2"] == "plugin model"         # 4 > 2: plugin model yaml over plugin overall
    assert config["probe_4"] == "plugin dataset"       # 5 > 4: plugin dataset yaml over plugin model yaml
    assert config["probe_5"] == "config file"          # 6 > 5: --config_files over the plugin dataset yaml
    assert config["probe_6"] == "config_dict"          # 7 > 6: --key=value over --config_files


def test_plugin_model_yaml_beats_recbole_dataset_yaml(tiny_data, layered):
    # RecBole's ml-100k.yaml sets MAX_ITEM_LIST_LENGTH: 50 (level 3); the plugin model yaml says 9 (level 4)
    settings = {k: v for k, v in tiny_config(tiny_data).items() if k not in ("data_path", "MAX_ITEM_LIST_LENGTH")}
    config = Config("SASRec", "ml-100k", config_dict=settings)
    assert config["MAX_ITEM_LIST_LENGTH"] == 9


@pytest.mark.parametrize("text, value", [
    ("[10, 20]", [10, 20]), ("1e-3", 1e-3), ("None", None), ("true", True), ("FALSE", False),
    ("{'LS': 'valid_and_test'}", {"LS": "valid_and_test"}), ("MRR@10", "MRR@10"), ("inf", "inf"),
    ("__import__('os').getcwd()", "__import__('os').getcwd()"),
])
def test_values_are_parsed_as_literals(text, value):
    assert parse_literal(text) == value


def test_a_command_line_value_never_runs_code(tiny_data, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    with pytest.raises(PopPriorError, match="prior_tau must be a number"):
        Config("SASRec", "tiny", config_dict=tiny_config(tiny_data, prior_tau=payload))
    assert not marker.exists()
    config = Config("SASRec", "tiny", config_dict=tiny_config(tiny_data, topk="[5, 10]", learning_rate="0.01"))
    assert config["topk"] == [5, 10] and config["learning_rate"] == 0.01


@pytest.mark.parametrize("key, value, words", [
    ("prior_tau", "1e999", "finite"), ("prior_tau", math.nan, "finite"), ("prior_beta", float("inf"), "finite"),
    ("prior_alpha", 0, "> 0"), ("prior_mode", "sometimes", "prior_mode"), ("prior_windows", 0, ">= 1"),
    ("prior_window_by", "day", "prior_window_by"), ("prior_serve_window", 9, "prior_serve_window"),
    ("energy_permutation_stage", "sometimes", "energy_permutation_stage"), ("energy_permutations", -1, ">= 0"),
    ("energy_max_contexts", 0, ">= 1"), ("energy_subspace", 1.5, "<= 1"), ("energy_seed", 0.5, "integer"),
    ("energy_permutations", float("nan"), "integer"), ("tune_beta_grid", "a,b", "tune_beta_grid"),
    ("tune_beta_grid", [0.0, math.inf], "tune_beta_grid"), ("tune_max_failures", -1, ">= 0"),
    ("tune_plots", "yes", "tune_plots"), ("tune_search_space", [1, 2], "tune_search_space"),
    ("eval_score_dtype", "int8", "bfloat16"), ("eval_score_budget_mb", math.inf, "finite"),
])
def test_bad_plugin_settings_are_one_line_errors(tiny_data, key, value, words):
    with pytest.raises(PopPriorError, match=key) as info:
        Config("SASRec", "tiny", config_dict=tiny_config(tiny_data, **{key: value}))
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("key, value", [("synthetic_users", 0), ("synthetic_rank", 99), ("synthetic_zipf", -1.0),
                                        ("synthetic_items", 1.5), ("synthetic_windows", 10**9)])
def test_bad_synthetic_settings_are_one_line_errors(tmp_path, key, value):
    with pytest.raises(PopPriorError, match=key):
        Config("SASRec", "synthetic", config_dict={"data_path": str(tmp_path), key: value})


def test_every_plugin_default_lives_in_the_shipped_yaml():
    with open(properties_file("overall.yaml"), encoding="utf-8") as handle:
        overall = yaml.safe_load(handle)
    assert {"prior_tau", "energy_permutations", "tune_beta_grid", "tune_search_space", "tune_max_failures"} <= set(overall)
    with open(config_module.dataset_config_file("synthetic"), encoding="utf-8") as handle:
        synthetic = yaml.safe_load(handle)
    from recbole_popprior.data.synthetic import SyntheticSettings

    assert SyntheticSettings.defaults() == SyntheticSettings.from_config(synthetic)


def test_an_unknown_setting_is_warned_about_and_never_carried_whole(tiny_data, tmp_path):
    """A yaml file under the bounds can still alias a big value into a key nothing reads (issue 19,
    2): it is named in one warning and kept as a short summary, so the log, the checkpoint's
    metadata and tensorboard never hold it whole."""
    from recbole_popprior.checkpoint import _plain_config

    levels = "a: &a [" + ",".join(["xxxxxxxxxx"] * 9) + "]\n" + "".join(
        f"{k}: &{k} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, k in zip("abcd", "bcde"))  # 9^5 cells
    path = tmp_path / "aliases.yaml"
    path.write_text(levels + "prior_tau: 0.5\n", encoding="utf-8")
    config = Config(model="SASRec", dataset="tiny", config_file_list=[str(path)], config_dict=tiny_config(tiny_data))
    assert config["prior_tau"] == 0.5 and set("abcde") <= set(config.unknown_keys)
    (line,) = [w for w in config.unknown_key_warnings if "'a'" in w]
    assert "'a', 'b', 'c', 'd', 'e'" in line and "have no effect" in line
    summary = config["e"]
    assert isinstance(summary, str) and summary.startswith("<list of ") and len(summary) < 300
    expanded = 1 + 9 * 11  # a: a list of 9 strings of 10 characters (each entry counts 1 + its characters)
    for _ in "bcde":
        expanded = 1 + 9 * expanded
    assert f"{expanded:,} entries and characters" in summary
    assert len(str(config)) < 20_000 and len(json.dumps(_plain_config(config))) < 20_000
    assert config["a"] == ["xxxxxxxxxx"] * 9  # short values stay as they are


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tiny_data, tmp_path):
    bomb = "a: &a [" + ",".join(["x"] * 9) + "]\n" + "".join(
        f"{k}: &{k} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, k in zip("abcdefg", "bcdefgh"))
    assert len(bomb) == 271  # the file: 9^8 = 43 million values
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb, encoding="utf-8")
    with pytest.raises(PopPriorError, match="refused: its aliases expand it to more than 1,000,000"):
        Config(model="SASRec", dataset="tiny", config_file_list=[str(path)], config_dict=tiny_config(tiny_data))


def test_two_runs_started_in_the_same_second_never_share_a_run_folder(tiny_data, tmp_path, monkeypatch):
    """The run folder is named after the time: a second run into the same --output that picks the
    same name before the first made it must not write into it (issue 19, concurrency)."""
    from recbole_popprior import quick_start

    config = Config(model="SASRec", dataset="tiny", config_dict={**tiny_config(tiny_data), "output": str(tmp_path)})
    taken = tmp_path / "SASRec-tiny-taken"
    taken.mkdir()
    (taken / "model.pth").write_bytes(b"the other run's")
    names = iter([taken, tmp_path / "SASRec-tiny-taken-2"])
    monkeypatch.setattr(quick_start, "run_dir_name", lambda _: next(names))
    run_dir, created = quick_start._make_run_dir(config)
    assert run_dir == tmp_path / "SASRec-tiny-taken-2" and created == [run_dir] and run_dir.is_dir()
    assert (taken / "model.pth").read_bytes() == b"the other run's"
