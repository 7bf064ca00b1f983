"""The command line and its settings: RecBole conventions, results on disk, warnings for misspelled
plugin settings, derived defaults. Bad input to the command line is one table in test_bad_input.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import recbole
import yaml

from recbole_popprior.cli import main, parse_args
from recbole_popprior.config import PLUGIN_PREFIXES, properties_file, unknown_key_warnings
from recbole_popprior.errors import PopPriorError
from recbole_popprior.quick_start import build_config, build_pipeline

TINY_ARGS = ["--epochs=1", "--hidden_size=8", "--inner_size=16", "--n_layers=1", "--n_heads=1",
             "--MAX_ITEM_LIST_LENGTH=8", "--train_batch_size=64", "--show_progress=False", "--gpu_id=''"]


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


def test_cli_trains_saves_results_json_and_warns_about_a_misspelled_setting(tiny_data, tmp_path, monkeypatch, capfd):
    """One in-process run of the CLI: results on disk, the configured beta in results.json, and one
    warning line (on stderr and in run.log) for a plugin-prefixed key that does not exist."""
    monkeypatch.chdir(tmp_path)  # RecBole's trainer writes log_tensorboard/ under the cwd
    out = tmp_path / "saved"
    status = main(["--model=SASRec", "--dataset=tiny", f"--data_path={tiny_data}", f"--output={out}",
                   "--prior_beta=0.5", "--prior_tua=0.3", *TINY_ARGS])
    err = capfd.readouterr().err
    assert status == 0, err[-2000:]
    results = list(out.glob("SASRec-tiny-*/results.json"))
    assert len(results) == 1
    record = json.loads(results[0].read_text())
    assert set(record["test_result"]) >= {"recall@10", "mrr@10", "ndcg@10"}
    assert 0.0 <= record["test_result"]["recall@10"] <= 1.0
    assert record["prior_beta"] == 0.5 and record["prior_tau"] == 1.0
    assert Path(record["checkpoint"]).is_file()
    assert not list(out.rglob("*.tmp"))
    warned = [line for line in err.splitlines() if "unknown setting" in line]
    assert len(warned) == 1 and "WARNING" in warned[0] and "'prior_tua' has no effect; did you mean 'prior_tau'" in warned[0]
    assert "did you mean 'prior_tau'" in (results[0].parent / "run.log").read_text()


# --- settings: unknown keys, derived defaults, safe yaml ------------------------------------------
def _shipped_keys() -> set[str]:
    """The keys of the plugin's yaml files, read here independently of the code under test."""
    roots = [properties_file(), properties_file().parent / "dataset_configs"]
    keys = set()
    for root in roots:
        for path in root.rglob("*.yaml"):
            keys |= set(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    return keys


def test_every_shipped_plugin_key_is_known_and_a_one_letter_typo_of_it_warns():
    shipped = {k for k in _shipped_keys() if k.startswith(PLUGIN_PREFIXES)}
    assert {"prior_tau", "energy_permutations", "tune_beta_grid", "synthetic_users"} <= shipped
    assert unknown_key_warnings({key: 1 for key in shipped}) == []
    for key in sorted(shipped):
        typo = key[:-1] + ("x" if key[-1] != "x" else "y")
        if not typo.startswith(PLUGIN_PREFIXES):  # a bare family key such as 'remedy'
            typo = key + "s"
        (line,) = unknown_key_warnings({typo: 1})
        assert repr(typo) in line and f"did you mean {key!r}" in line and "\n" not in line


@pytest.mark.parametrize("key", ["softmax_tmpx", "eval_score_modee", "compare_confidnce", "directspec_alpah",
                                 "adap_tau_rhoo", "ace_lambdda", "resn_wieght", "remedyy", "sequence_dat"])
def test_unknown_keys_of_every_plugin_family_warn(key):
    assert key not in _shipped_keys()
    (line,) = unknown_key_warnings({key: 1})
    assert line.startswith(f"unknown setting {key!r}")


def test_recbole_and_model_keys_never_warn():
    assert unknown_key_warnings({"learning_rate": 1, "n_layers": 2, "reranker_CAN_NUM": "10", "priority": 1}) == []


def test_s3rec_pretraining_follows_epochs_unless_set(tiny_data):
    def config(**overrides):
        return build_config("S3Rec", "tiny", None, {"data_path": str(tiny_data), "gpu_id": "", **overrides})

    recbole_yaml = yaml.safe_load((Path(recbole.__file__).parent / "properties/model/S3Rec.yaml").read_text())
    assert recbole_yaml["pretrain_epochs"] == 500  # what the plugin's default replaces
    assert (config(epochs=3)["pretrain_epochs"], config(epochs=3)["save_step"]) == (3, 3)
    assert (config(epochs=120)["pretrain_epochs"], config(epochs=120)["save_step"]) == (120, recbole_yaml["save_step"])
    assert config(epochs=3, pretrain_epochs=7)["pretrain_epochs"] == 7
    with pytest.raises(PopPriorError, match="pretrain_epochs must be >= 1"):
        config(pretrain_epochs=0)


def test_yaml_python_tags_are_refused_not_built(tiny_data, tmp_path):
    path = tmp_path / "tag.yaml"
    path.write_text("learning_rate: !!python/name:os.system\n", encoding="utf-8")
    with pytest.raises(PopPriorError, match="python/name:os.system"):
        build_config("SASRec", "tiny", [str(path)], {"data_path": str(tiny_data)})
    path.write_text("learning_rate: 1e-3\nweight_decay: .5\n", encoding="utf-8")  # RecBole's float rules kept
    config = build_config("SASRec", "tiny", [str(path)], {"data_path": str(tiny_data), "gpu_id": ""})
    assert config["learning_rate"] == 1e-3 and config["weight_decay"] == 0.5


def test_a_failed_start_removes_the_run_folder_it_made_but_keeps_an_existing_one(tiny_data, tmp_path):
    bad = {"data_path": str(tiny_data), "gpu_id": "", "load_col": {"inter": ["user_id", "item_id"]}}
    with pytest.raises(PopPriorError, match="time field"):
        build_pipeline(build_config("SASRec", "tiny", None, {**bad, "output": str(tmp_path / "a" / "b")}))
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(PopPriorError, match="time field"):
        build_pipeline(build_config("SASRec", "tiny", None, {**bad, "run_dir": str(kept)}))
    assert kept.is_dir()
