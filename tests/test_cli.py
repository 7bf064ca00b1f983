"""The command line and its settings: RecBole conventions, results on disk, warnings for misspelled
plugin settings, derived defaults. Bad input to the command line is one table in test_bad_input.py."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import recbole
import yaml

from recbole_popprior.cli import COMMANDS, OPTIONS, main, parse_args
from recbole_popprior.config import PLUGIN_PREFIXES, properties_file, unknown_key_warnings
from recbole_popprior.errors import PopPriorError
from recbole_popprior.quick_start import build_config, build_pipeline

ROOT = Path(__file__).resolve().parent.parent
TINY_ARGS = ["--epochs=1", "--hidden_size=8", "--inner_size=16", "--n_layers=1", "--n_heads=1",
             "--MAX_ITEM_LIST_LENGTH=8", "--train_batch_size=64", "--show_progress=False", "--gpu_id=''"]


def test_parse_args_splits_plugin_options_from_recbole_overrides():
    options, overrides = parse_args(["--model=SASRec", "--dataset=ml-100k", "--learning_rate=0.01",
                                     "--compare", "--seeds=2", "--output=out", "--data-path=data"])
    assert options["command"] == "compare" and options["model"] == "SASRec" and options["seeds"] == 2
    assert overrides == {"learning_rate": "0.01", "output": "out", "data_path": "data"}  # both spellings
    options, overrides = parse_args(["--beta-sweep=-1,0,0.5", "--model=SASRec", "--dataset=x", "--checkpoint=m.pth"])
    assert options["command"] == "beta-sweep" and options["beta_sweep"] == [-1.0, 0.0, 0.5]
    assert options["checkpoint"] == "m.pth" and options["trust_pickled_checkpoint"] is False and overrides == {}
    options, _ = parse_args(["--tune", "--n_trials=3", "--study-name=s", "--multi-objective=true", "--pruner=none"])
    assert (options["n_trials"], options["study_name"], options["multi_objective"], options["pruner"]) == \
        (3, "s", True, "none")
    assert parse_args(["--model=SASRec"])[0]["command"] == "train"


@pytest.mark.parametrize("argv, words", [
    (["--seeds=x", "--compare"], "--seeds must be an integer"), (["stray"], "unexpected argument 'stray'"),
    (["--compare=maybe"], "--compare is a flag"), (["--unknownflag"], "unknown flag --unknownflag"),
    (["--beta-sweep=a,b"], "--beta-sweep takes numbers"), (["--lr=1", "--lr=2"], "given twice"),
    (["--compare", "--tune"], "choose one command"), (["--seeds=2"], "add --compare"),
    (["--compare", "--checkpoint=x"], "not an option of --compare"), (["--pruner=fast", "--tune"], "--pruner must be"),
    (["--timeout=0", "--tune"], "--timeout must be a positive number"),
    (["--beta-sweep", "--model=SASRec"], "--beta-sweep needs a value: --beta-sweep=...")])
def test_parse_args_rejects_bad_input(argv, words):
    with pytest.raises(PopPriorError, match=re.escape(words)):
        parse_args(argv)


def _run(*argv: str, program: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(program or [sys.executable, str(ROOT / "run_recbole_popprior.py")]), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("argv, command", [
    (["--help"], "train"), (["--model=SASRec", "-h"], "train"), (["--compare", "--help"], "compare"),
    (["--help", "--compare"], "compare"), (["--beta-sweep", "--help"], "beta-sweep"),
    (["--beta-sweep=0,1", "--help"], "beta-sweep"), (["--tune", "--model=x", "--n-trials=2", "--help"], "tune")])
def test_help_in_every_position_lists_every_option_of_the_command_with_its_default(argv, command):
    proc = _run(*argv)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    spec = next(c for c in COMMANDS if c.name == command)
    usage = proc.stdout.splitlines()[0]
    assert usage.startswith("usage: python run_recbole_popprior.py") and (spec.flag or "") in usage
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for group in spec.groups:
        for option in OPTIONS[group]:
            assert option.flag in text, option.flag
            assert " ".join(option.help.split()) in text, option.flag
    defaults = [o for g in spec.groups for o in OPTIONS[g] if not o.switch]
    assert text.count("(default: ") >= len(defaults)
    others = {o.flag for c in COMMANDS if c is not spec for g in c.groups for o in OPTIONS[g]} - \
        {o.flag for g in spec.groups for o in OPTIONS[g]} - {c.flag for c in COMMANDS}  # the epilog names commands
    assert not [flag for flag in others if f" {flag} " in text], "options of other commands listed"


def test_the_usage_line_names_the_command_that_was_run():
    console = Path(sys.executable).with_name("recbole-popprior")
    assert _run("--compare", "--help", program=[str(console)]).stdout.startswith("usage: recbole-popprior --compare")
    converter = _run("--help", program=[sys.executable, "-m", "recbole_popprior.convert"])
    assert converter.returncode == 0 and converter.stdout.startswith("usage: python -m recbole_popprior.convert")


def test_the_converters_help_shows_each_sources_input_layout():
    text = _run("--help", program=[sys.executable, "-m", "recbole_popprior.convert"]).stdout
    from recbole_popprior.converters.read import ALIBABA_COLUMNS, TIANCHI_COLUMNS  # what the reader checks
    assert ",".join(TIANCHI_COLUMNS) in text and ",".join(ALIBABA_COLUMNS) in text
    assert "NO header" in text and "WITH the header" in text and "unix seconds" in text and "'YYYY-MM-DD HH'" in text


HEAVY = {"numpy", "pandas", "polars", "pyarrow", "torch", "recbole", "scipy"}


def _loaded(argv: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime ARGV``; the top-level packages its import-time lines name
    (``import time: self | cumulative | name``) are what the process loaded."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
             if line.startswith("import time:")}
    return proc, names


@pytest.mark.parametrize("argv", [["--help"], ["alibaba", "--help"], ["--input", "x", "-h"]])
def test_the_converters_help_loads_nothing_heavy_and_lists_both_layouts(argv):
    proc, loaded = _loaded(["-m", "recbole_popprior.convert", *argv])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "recbole_popprior" in loaded and not loaded & HEAVY, sorted(loaded & HEAVY)
    text = proc.stdout
    assert text.startswith("usage: python -m recbole_popprior.convert")
    assert "user_id,item_id,category_id,behavior_type,timestamp" in text and "NO header" in text
    assert "user_id,item_id,behavior_type,user_geohash,item_category,time" in text and "WITH the header" in text


def test_a_bad_converter_argument_is_one_error_line_before_anything_heavy_loads(tmp_path):
    raw = tmp_path / "UserBehavior.csv"
    raw.write_text("1,2,3,pv,1511539200\n")
    proc, loaded = _loaded(["-m", "recbole_popprior.convert", "tianchi", "--input", str(raw),
                            "--output", str(tmp_path / "out"), "--k-core", "many"])
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and errors == ["error: argument --k-core: invalid int value: 'many'"], errors
    assert not loaded & HEAVY and not (tmp_path / "out").exists()
    # the same command with a good --k-core converts, so the import-time listing does see the heavy modules
    proc, loaded = _loaded(["-m", "recbole_popprior.convert", "tianchi", "--input", str(raw),
                            "--output", str(tmp_path / "out"), "--k-core", "0", "--no-progress"])
    assert proc.returncode == 0 and {"numpy", "pyarrow"} <= loaded, proc.stderr[-2000:]
    assert (tmp_path / "out" / "tianchi" / "tianchi.inter").is_file()


def test_ctrl_c_while_the_converter_loads_its_pipeline_is_one_line_and_status_130(tmp_path):
    """SIGINT once numpy's extension is mapped (the lazy import after parsing is under way): one
    ``error:`` line and 130, no KeyboardInterrupt traceback, no output folder."""
    raw = tmp_path / "UserBehavior.csv"
    raw.write_text("1,2,3,pv,1511539200\n")
    proc = subprocess.Popen([sys.executable, "-m", "recbole_popprior.convert", "tianchi", "--input", str(raw),
                             "--output", str(tmp_path / "out"), "--no-progress"], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                if "_multiarray_umath" in Path(f"/proc/{proc.pid}/maps").read_text():
                    break
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert not (tmp_path / "out" / "tianchi" / "tianchi.inter").exists()


def test_importing_the_command_line_loads_neither_torch_nor_recbole():
    """What --help needs is the standard library: torch and RecBole load only after parsing."""
    code = ("import sys, recbole_popprior, recbole_popprior.cli, recbole_popprior.convert;"
            "from recbole_popprior.cli import parse; parse(['--model=SASRec', '--compare', '--seeds=2']);"
            "print(sorted(m for m in ('torch', 'recbole', 'scipy', 'matplotlib', 'optuna') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_bad_option_is_one_error_line_and_exit_2_before_anything_heavy_loads():
    proc = _run("--model=SASRec", "--dataset=ml-100k", "--compare", "--seeds=0")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --seeds must be >= 1, got 0", proc.stderr
    assert proc.stdout == ""


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
