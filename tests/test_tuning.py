"""Optuna tuning of the prior weights: search space, SQLite resume, the free beta
sweep, failed trials, pruning, local workers on a journal file, and the report.

The storage is always read back through Optuna's own API, independently of the report code.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import yaml

from conftest import tiny_config
from recbole_popprior.config import properties_file
from recbole_popprior.errors import PopPriorError
from recbole_popprior.tuning import (beta_grid, choose_beta, default_storage, load_search_space, make_plan,
                                     make_storage, parse_models, run_tuning)
from recbole_popprior.tuning.objective import Objective

ROOT = Path(__file__).resolve().parent.parent
HAS_FAST_LOADER = importlib.util.find_spec("recbole_popprior.data.fast_loader") is not None


def _config(data_path, out_dir, **overrides):
    return tiny_config(data_path, output=str(out_dir), fast_loader=HAS_FAST_LOADER, **overrides)


def _options(**overrides):
    options = {"n_trials": 3, "storage": None, "study_name": "t", "timeout": None, "search_space": None,
               "n_workers": 1, "multi_objective": False, "pruner": "median"}
    options.update(overrides)
    return options


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- search space ----------------------------------------------------------------------------
def _default_space() -> dict:
    """The shipped ``tune_search_space`` default, read from properties/overall.yaml."""
    with open(properties_file("overall.yaml"), encoding="utf-8") as handle:
        return yaml.safe_load(handle)["tune_search_space"]


def test_default_space_is_tau_0_2_and_alpha_on_log_scale():
    space = load_search_space(None, _default_space())
    assert set(space) == {"prior_tau", "prior_alpha"}
    tau, alpha = space["prior_tau"], space["prior_alpha"]
    assert (tau.type, tau.low, tau.high, tau.log) == ("float", 0.0, 2.0, False)
    assert alpha.type == "float" and alpha.log and alpha.low > 0 and alpha.high / alpha.low >= 100


def test_search_space_file_extends_replaces_and_drops(tmp_path):
    path = _write(tmp_path / "space.yaml", """
learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
hidden_size: {type: categorical, choices: [8, 16]}
n_layers: {type: int, low: 1, high: 3}
prior_tau: {type: float, low: 0.5, high: 1.5, step: 0.5}
prior_alpha: ~
""")
    space = load_search_space(path, _default_space())
    assert set(space) == {"prior_tau", "learning_rate", "hidden_size", "n_layers"}
    assert (space["prior_tau"].low, space["prior_tau"].high, space["prior_tau"].step) == (0.5, 1.5, 0.5)
    # sampling respects every distribution
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    from recbole_popprior.tuning.space import suggest

    for _ in range(20):
        trial = study.ask()
        values = suggest(trial, space)
        study.tell(trial, 0.0)
        assert 1e-4 <= values["learning_rate"] <= 1e-2
        assert values["hidden_size"] in (8, 16)
        assert values["n_layers"] in (1, 2, 3) and isinstance(values["n_layers"], int)
        assert values["prior_tau"] in (0.5, 1.0, 1.5)


@pytest.mark.parametrize("text, fragment", [
    ("- a\n- b\n", "must map"),
    ("x: {type: float, low: 1, high: [\n", "not valid yaml"),
    ("x: {type: gaussian, low: 0, high: 1}\n", "type must be"),
    ("x: {type: float, low: 2, high: 1}\n", "above high"),
    ("x: {type: float, low: 0, high: 1, log: true}\n", "log scale needs low > 0"),
    ("x: {type: int, low: 0.5, high: 3}\n", "integers"),
    ("x: {type: categorical, choices: []}\n", "non-empty"),
    ("x: {type: float, low: 0, high: 1, lo: 3}\n", "unknown key"),
    ("x: 3\n", "must be a mapping"),
    ("prior_beta: {type: float, low: 0, high: 2}\n", "swept at serving time"),
])
def test_bad_search_space_file_is_one_line_error(tmp_path, text, fragment):
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(PopPriorError) as info:
        load_search_space(path, _default_space())
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_cli_bad_search_space_exits_2_with_one_error_line(tmp_path, tiny_data):
    bad = _write(tmp_path / "bad.yaml", "x: {type: float, low: 2, high: 1}\n")
    proc = subprocess.run(
        [sys.executable, "run_recbole_popprior.py", "--tune", "--model=SASRec", "--dataset=tiny",
         f"--data_path={tiny_data}", f"--search-space={bad}", f"--output={tmp_path / 'out'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "above high" in errors[0]


def test_bad_options_are_one_line_errors(tiny_data, out_dir):
    config = _config(tiny_data, out_dir)
    for options, fragment in [({"pruner": "asha"}, "--pruner"), ({"study_name": "a b/c"}, "--study-name"),
                              ({"n_workers": 0}, "--n-workers")]:
        with pytest.raises(PopPriorError, match=fragment):
            make_plan("SASRec", "tiny", config_dict=config, options=_options(**options))
    with pytest.raises(PopPriorError, match="storage"):
        make_storage("redis-ish://nowhere")
    with pytest.raises(PopPriorError, match="unsupported"):
        parse_models("SASRec,NoSuchModel")
    with pytest.raises(PopPriorError, match="tune_beta_grid"):
        make_plan("SASRec", "tiny", config_dict={**config, "tune_beta_grid": "a,b"}, options=_options())


def test_model_lists_and_all():
    assert parse_models("sasrec, GRU4Rec,SASRec") == ["SASRec", "GRU4Rec"]
    from recbole_popprior.model import supported_models

    assert parse_models("all") == supported_models()


def test_default_storage_prefers_existing_files(tmp_path):
    assert default_storage(tmp_path, "s") == f"sqlite:///{tmp_path}/tuning/s.db"
    assert default_storage(tmp_path, "s", n_workers=2) == f"journal:{tmp_path}/tuning/s.journal"
    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "s.db").touch()  # a study started on one worker stays in its db
    assert default_storage(tmp_path, "s", n_workers=2) == f"sqlite:///{tmp_path}/tuning/s.db"
    (tmp_path / "tuning" / "s.journal").touch()
    assert default_storage(tmp_path, "s") == f"journal:{tmp_path}/tuning/s.journal"


# --- the beta sweep --------------------------------------------------------------------------
def test_beta_grid_adds_tau_to_the_configured_grid():
    with open(properties_file("overall.yaml"), encoding="utf-8") as handle:
        default = yaml.safe_load(handle)["tune_beta_grid"]
    grid = beta_grid(0.6, default)
    assert grid == sorted(grid) and 0.0 in grid and 2.0 in grid and 0.6 in grid and 0.25 in grid
    assert beta_grid(1.0, [0.0, 1.0]) == [0.0, 1.0]
    assert beta_grid(0.5, [1.0, 0.0]) == [0.0, 0.5, 1.0]


def test_choose_beta_picks_best_and_breaks_ties_towards_tau():
    results = [(0.0, {"m": 0.1}), (0.5, {"m": 0.3}), (1.0, {"m": 0.3}), (1.5, {"m": 0.2})]
    assert choose_beta(results, "m", bigger=True, tau=1.2)[0] == 1.0
    assert choose_beta(results, "m", bigger=True, tau=0.0)[0] == 0.5
    assert choose_beta(results, "m", bigger=False, tau=1.0)[0] == 0.0
    assert choose_beta([(0.0, {"m": math.nan}), (1.0, {"m": 0.0})], "m", bigger=True, tau=0.0)[0] == 1.0


def test_pruning_callback_reports_each_epoch_and_raises_trial_pruned(tmp_path):
    objective = Objective("SASRec", "tiny", None, {}, {}, tmp_path, "mrr@10", True)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    trial = study.ask()
    callback = objective._pruning_callback(trial)
    callback(0, 0.7)  # above the threshold: keeps going
    with pytest.raises(optuna.TrialPruned):
        callback(1, 0.2)
    assert study.get_trials()[0].intermediate_values == {0: 0.7, 1: 0.2}


# --- whole studies ---------------------------------------------------------------------------
def _evaluate_checkpoint(tiny_data, out_dir, trial) -> float:
    """Independent check of a trial's value: reload its checkpoint, serve at its best beta."""
    from recbole_popprior.quick_start import build_config, build_pipeline

    config = build_config("SASRec", "tiny", None, _config(
        tiny_data, out_dir, run_dir=str(out_dir / "check"), **trial.params))
    pipe = build_pipeline(config, log=False)
    pipe.trainer.load_model_file(trial.user_attrs["checkpoint"])
    pipe.model.prior_beta = trial.user_attrs["best_beta"]
    pipe.trainer.eval_stage = "valid"
    return float(pipe.trainer.evaluate(pipe.valid_data, load_best_model=False)["mrr@10"])


def test_sqlite_study_is_written_then_resumed_with_more_trials(tiny_data, out_dir):
    config = _config(tiny_data, out_dir, tune_seed=7)
    first = run_tuning("SASRec", "tiny", config_dict=config, options=_options(n_trials=3))
    db = out_dir / "tuning" / "t.db"
    assert db.is_file()
    study = optuna.load_study(study_name="t.SASRec", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    for trial in trials:
        assert 0.0 <= trial.params["prior_tau"] <= 2.0 and 0.01 <= trial.params["prior_alpha"] <= 10.0
        assert "prior_beta" not in trial.params  # served, not trained
        assert trial.intermediate_values.keys() == {0}  # the epoch-level report for pruning
        by_beta = trial.user_attrs["valid_by_beta"]
        assert len(by_beta) >= 9 and trial.value == max(by_beta.values())
        assert by_beta[f"{trial.user_attrs['best_beta']:g}"] == trial.value
        assert Path(trial.user_attrs["checkpoint"]).is_file()
        assert Path(trial.user_attrs["run_dir"]) == out_dir / "tuning" / "t" / "trials" / "SASRec" / str(trial.number)
    best = study.best_trial
    assert _evaluate_checkpoint(tiny_data, out_dir, best) == pytest.approx(best.value, abs=1e-4)

    row = first["models"][0]
    assert (row["complete"], row["pruned"], row["failed"], row["best_trial"]) == (3, 0, 0, best.number)
    assert row["best_value"] == best.value and row["best_tau"] == best.params["prior_tau"]
    assert row["best_beta"] == best.user_attrs["best_beta"]

    second = run_tuning("SASRec", "tiny", config_dict=config, options=_options(n_trials=1))
    study = optuna.load_study(study_name="t.SASRec", storage=f"sqlite:///{db}")
    assert [t.number for t in study.get_trials()] == [0, 1, 2, 3]  # --n-trials adds trials
    assert second["models"][0]["complete"] == 4

    folder = out_dir / "tuning" / "t"
    saved = json.loads((folder / "summary.json").read_text())
    assert saved["models"][0]["complete"] == 4 and saved["models"][0]["best_value"] == study.best_value
    csv_lines = (folder / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,objective,best_value,best_tau,best_beta") and csv_lines[1].startswith("SASRec,")
    assert "| SASRec |" in (folder / "summary.md").read_text()
    for name in ("SASRec_history.html", "SASRec_history.png", "SASRec_importances.html", "SASRec_importances.png"):
        assert (folder / "plots" / name).stat().st_size > 0
    assert (folder / "plots" / "SASRec_history.png").read_bytes()[:4] == b"\x89PNG"
    assert "trial 3 COMPLETE" in (folder / "tuning.log").read_text()


@pytest.mark.filterwarnings("ignore:Fixed parameter prior_tau")
def test_nan_trial_is_failed_with_reason_and_the_study_goes_on(tiny_data, out_dir):
    storage = f"sqlite:///{out_dir / 'nan.db'}"
    out_dir.mkdir(parents=True)
    study = optuna.create_study(study_name="n.SASRec", storage=storage, direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.enqueue_trial({"prior_tau": 3e38, "prior_alpha": 1.0})  # finite in float32, overflows the logits -> NaN loss
    summary = run_tuning("SASRec", "tiny", config_dict=_config(tiny_data, out_dir, tune_plots=False),
                         options=_options(n_trials=2, storage=storage, study_name="n"))
    trials = optuna.load_study(study_name="n.SASRec", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "Training loss is nan" in trials[0].user_attrs["fail_reason"]
    row = summary["models"][0]
    assert (row["complete"], row["failed"], row["best_trial"]) == (1, 1, 1)
    assert row["failures"][0]["reason"] == trials[0].user_attrs["fail_reason"]


def test_two_local_workers_share_a_journal_study(tiny_data, out_dir):
    summary = run_tuning("SASRec", "tiny", config_dict=_config(tiny_data, out_dir, tune_plots=False),
                         options=_options(n_trials=2, n_workers=2, study_name="j"))
    journal = out_dir / "tuning" / "j.journal"
    assert journal.is_file() and summary["storage"] == f"journal:{journal}"
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="j.SASRec", storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes ran a trial
    assert summary["models"][0]["complete"] == 2


def test_multi_objective_adds_shared_frac_and_a_pareto_front(tiny_data, out_dir):
    from recbole.evaluator.register import metrics_dict

    if "popenergy" not in metrics_dict:
        pytest.skip("the PopEnergy metric (evaluator helper) is not registered yet")
    summary = run_tuning("SASRec", "tiny", config_dict=_config(tiny_data, out_dir),
                         options=_options(n_trials=2, multi_objective=True, study_name="m"))
    study = optuna.load_study(study_name="m.SASRec", storage=f"sqlite:///{out_dir / 'tuning' / 'm.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        assert 0.0 <= trial.values[1] <= 1.0 and trial.values[1] == trial.user_attrs["shared_frac"]
    assert {p["trial"] for p in summary["models"][0]["pareto"]} == {t.number for t in study.best_trials}
    assert (out_dir / "tuning" / "m" / "plots" / "SASRec_pareto.html").is_file()


def test_a_model_stops_after_tune_max_failures_failed_trials_in_a_row(tiny_data, out_dir, tmp_path):
    space = _write(tmp_path / "nan.yaml", "prior_tau: {type: categorical, choices: [1.0e39]}\n")
    # a study whose every trial failed has no result: the report is written, and the command fails (issue 19, 11)
    with pytest.raises(PopPriorError, match="no trial of SASRec completed: 2 failed, the first with PopPriorError: "
                                            "prior_tau must be a finite float32"):
        run_tuning("SASRec", "tiny", config_dict=_config(tiny_data, out_dir, tune_max_failures=2),
                   options=_options(n_trials=5, study_name="f", search_space=str(space)))
    trials = optuna.load_study(study_name="f.SASRec", storage=f"sqlite:///{out_dir / 'tuning' / 'f.db'}").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    summary = json.loads((out_dir / "tuning" / "f" / "summary.json").read_text())
    row = summary["models"][0]
    assert (row["complete"], row["failed"], row["best_value"], row["best_trial"]) == (0, 2, None, None)
    assert not list((out_dir / "tuning" / "f").glob("plots/*"))  # nothing to plot without a completed trial


# --- bad settings found before a study starts (issue 14) -------------------------------------------
def test_storage_folders_are_never_created(tmp_path):
    for url in (f"sqlite:///{tmp_path}/a/b/x.db", f"journal:{tmp_path}/a/b/x.journal"):
        with pytest.raises(PopPriorError, match="does not exist"):
            make_storage(url)
    assert not (tmp_path / "a").exists()
    (tmp_path / "a").mkdir()
    assert make_storage(f"sqlite:///{tmp_path}/a/x.db", heartbeat_interval=0) is not None
    assert (tmp_path / "a" / "x.db").is_file()


def test_search_space_keys_some_models_lack_are_a_warning_none_know_an_error(tiny_data, out_dir, tmp_path):
    space = _write(tmp_path / "space.yaml", "n_layers: {type: int, low: 1, high: 2}\n")
    plan = make_plan("SASRec,GRU4Rec", "tiny", config_dict=_config(tiny_data, out_dir),
                     options=_options(search_space=str(space)))
    assert plan.warnings == ["search space entry 'n_layers' is not a setting of GRU4Rec; it has no effect there"]
    typo = _write(tmp_path / "typo.yaml", "num_layres: {type: int, low: 1, high: 2}\n")
    with pytest.raises(PopPriorError, match="'num_layres' is not a setting of SASRec, GRU4Rec.*'num_layers'"):
        make_plan("SASRec,GRU4Rec", "tiny", config_dict=_config(tiny_data, out_dir),
                  options=_options(search_space=str(typo)))


def test_model_all_skips_the_models_the_dataset_cannot_feed(tiny_data, out_dir):
    plan = make_plan("all", "tiny", config_dict=_config(tiny_data, out_dir), options=_options())
    from recbole_popprior.model import supported_models

    assert plan.models == [m for m in supported_models() if m not in ("GRU4RecKG", "KSR")]
    assert [line.split(" is skipped")[0] for line in plan.warnings] == ["GRU4RecKG", "KSR"]
    with pytest.raises(PopPriorError, match="KSR needs the knowledge-graph"):
        make_plan("KSR", "tiny", config_dict=_config(tiny_data, out_dir), options=_options())


def test_an_s3rec_trial_pretrains_for_epochs_not_500_and_completes(tmp_path_factory, out_dir):
    """RecBole's pretrain_epochs (500) used to ignore --epochs, so a small S3Rec study never ended."""
    from test_model_zoo import write_zoo

    data = write_zoo(tmp_path_factory.mktemp("zoo"))
    config = _config(data, out_dir, epochs=2, tune_plots=False, MAX_ITEM_LIST_LENGTH=6,
                     load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "class"]})
    run_tuning("S3Rec", "zoo", config_dict=config, options=_options(n_trials=1, study_name="s"))
    (trial,) = optuna.load_study(study_name="s.S3Rec", storage=f"sqlite:///{out_dir / 'tuning' / 's.db'}").get_trials()
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    saved = sorted(p.name for p in Path(trial.user_attrs["run_dir"]).glob("S3Rec-zoo-*.pth"))
    assert saved == ["S3Rec-zoo-2.pth"]  # pretrained for epochs=2 epochs, the last one saved



def test_tuning_plots_name_study_and_model_count_trials_in_whole_numbers_and_caveat_few_trials(tmp_path,
                                                                                               monkeypatch):
    """What the PNGs show, read off the matplotlib axes the report draws (a study of 3 made-up trials)."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from recbole_popprior.tuning import report

    study = optuna.create_study(study_name="demo-study", direction="maximize")
    for k, (tau, value) in enumerate([(0.2, 0.30), (1.1, 0.35), (1.7, 0.33)]):
        study.add_trial(create_trial(params={"prior_tau": tau, "prior_alpha": 0.5 + k},
                                     distributions={"prior_tau": FloatDistribution(0.0, 2.0),
                                                    "prior_alpha": FloatDistribution(0.01, 10.0, log=True)},
                                     value=value))
    drawn = {}

    def keep(ax, path):
        drawn[path.stem] = ax.flat[0] if hasattr(ax, "flat") else ax
        path.write_bytes(b"")

    monkeypatch.setattr(report, "_save_matplotlib", keep)
    report.write_plots(study, tmp_path, "SASRec", "ndcg@10")
    history, importances = drawn["SASRec_history"], drawn["SASRec_importances"]
    assert "demo-study" in history.get_title() and "SASRec" in history.get_title() and "ndcg@10" in history.get_title()
    assert history.get_title(loc="left") == "" == importances.get_title(loc="left")  # not Optuna's generic one
    ticks = [t for t in history.get_xticks() if history.get_xlim()[0] <= t <= history.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert history.get_xlabel() == "trial"
    assert "demo-study" in importances.get_title() and "from 3 completed trials: rough" in importances.get_title()
    html = (tmp_path / "SASRec_history.html").read_text()
    assert "demo-study, SASRec: validation ndcg@10 per trial" in html
    assert "Optimization History Plot" not in html


def test_the_summary_says_in_words_why_a_column_is_empty():
    rows = [{"model": "SASRec", "best_trial": 2, "shared_frac": None}, {"model": "GRU4Rec", "best_trial": None}]
    from recbole_popprior.tuning.report import empty_column_notes

    notes = empty_column_notes(rows)
    assert any(n.startswith("shared_frac is empty: it comes from the PopEnergy metric") for n in notes)
    assert any("no completed trial" in n for n in notes)
    assert empty_column_notes([{"model": "SASRec", "best_trial": 0, "shared_frac": 0.4}]) == []
