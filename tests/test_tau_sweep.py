"""The tau sweep (recbole_popprior/tau_sweep.py, tau_sweep_report.py, benchmarks/tau_sweep.py; DESIGN §12):
real tiny trainings on the synthetic data; every reported number checked against a dense numpy
computation from the saved contexts, or against ``--compare`` trained with the same settings."""

from __future__ import annotations

import json
import runpy
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import synthetic_settings
from recbole_popprior.compare import run_compare
from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator.truth import row_spearman
from recbole_popprior.evaluator.energy import ContextStats
from recbole_popprior.tau_sweep import (Variant, _check_rows, load_contexts, parse_taus, plan_variants, prepare,
                                        run_folder, run_tau_sweep)
from recbole_popprior.tau_sweep_report import sweep_markdown

ROOT = Path(__file__).resolve().parent.parent


def _dense_dir(arrays: dict, log_prior: np.ndarray) -> tuple[float, float]:
    """``E_dir`` and ``dir_frac`` of ``Z = H E^T`` over the real items, written out (DESIGN §3)."""
    Z = arrays["H"] @ arrays["E"][1:].T
    Zc = Z - Z.mean(axis=1, keepdims=True)
    lc = log_prior[1:] - log_prior[1:].mean()
    s = Zc @ (lc / np.linalg.norm(lc))
    return float(s @ s), float(s @ s) / float((Zc ** 2).sum())


def _row(payload: dict, key: str) -> dict:
    return next(r for r in payload["per_run"] if r["key"] == key)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    settings = synthetic_settings(tmp, epochs=2)
    payload = run_tau_sweep("SASRec", "synthetic", "0,1", seeds=1, sources="estimate,truth", config_dict=settings,
                            output=tmp / "out", compare_tau=1.0)
    return tmp, settings, payload


def test_parse_taus_and_the_plan() -> None:
    assert parse_taus("0, 0.5,1,learned") == [0.0, 0.5, 1.0, "learned"]
    for bad, words in (("1,2", "must include 0"), ("0,x", "numbers or 'learned'"), ("0,1,1.0", "twice"),
                       ("0,inf", "finite")):
        with pytest.raises(PopPriorError, match=words):
            parse_taus(bad)
    keys = [v.key for v in plan_variants([0.0, 1.0], "estimate,truth", "static,windowed")]
    assert keys == ["tau=0", "tau=1", "tau=1,windowed", "tau=1,prior=truth"]  # truth has no windowed form
    with pytest.raises(PopPriorError, match="--prior-modes"):
        plan_variants([0.0], "estimate", "weekly")


def test_settings_the_sweep_chooses_and_bad_variants_stop_before_training(tmp_path) -> None:
    with pytest.raises(PopPriorError, match="chosen per run by the tau sweep"):
        prepare("SASRec", "synthetic", None, {"prior_tau": 0.5}, tmp_path, [Variant(0.0)])
    with pytest.raises(PopPriorError, match="known truth"):
        prepare("SASRec", "ml-100k", None, {"data_path": str(tmp_path)}, tmp_path,
                [Variant(0.0), Variant(1.0, "truth")])
    assert not (tmp_path / "runs").exists()


def test_reported_energies_and_reductions_are_the_dense_ones_of_the_saved_contexts(sweep) -> None:
    tmp, _, payload = sweep
    out = Path(payload["files"]["json"]).parent
    ref = load_contexts(run_folder(out, Variant(0.0), 7))
    l_hat = ref["log_prior_estimate"]
    e_ref, frac_ref = _dense_dir(ref, l_hat)
    assert _row(payload, "tau=0")["dir_frac"] == pytest.approx(frac_ref, rel=1e-8)
    for variant in (Variant(1.0), Variant(1.0, "truth")):
        arrays = load_contexts(run_folder(out, variant, 7))
        e_dir, frac = _dense_dir(arrays, l_hat)  # along the same l (the estimate), also for the true-prior run
        row = _row(payload, variant.key)
        assert row["dir_frac"] == pytest.approx(frac, rel=1e-8)
        assert row["R_dir"] == pytest.approx(1.0 - e_dir / e_ref, rel=1e-8)
        pmi_rows = arrays["truth_pmi"][arrays["prev"]][:, 1:]
        Z = arrays["H"] @ arrays["E"][1:].T
        assert row["spearman_pmi"] == pytest.approx(row_spearman(Z, pmi_rows), rel=1e-12)
    truth_prior = load_contexts(run_folder(out, Variant(1.0, "truth"), 7))["log_prior_model"]
    np.testing.assert_allclose(truth_prior[1:], ref["truth_log_p"][1:], rtol=1e-6)  # trained with the true p
    floor = _row(payload, "true PMI")
    pmi_rows = ref["truth_pmi"][ref["prev"]][:, 1:]
    lc = l_hat[1:] - l_hat[1:].mean()
    s = (pmi_rows - pmi_rows.mean(axis=1, keepdims=True)) @ (lc / np.linalg.norm(lc))
    assert floor["dir_frac"] == pytest.approx(float(s @ s) / float(((pmi_rows - pmi_rows.mean(1, keepdims=True))
                                                                     ** 2).sum()), rel=1e-8)
    assert floor["R_dir"] == pytest.approx(1.0 - float(s @ s) / e_ref, rel=1e-8)


def test_the_sweep_trains_and_measures_as_compare_does(sweep) -> None:
    """The same settings through ``--compare`` give the sweep's tau=1 numbers, and the sweep's own
    compare report (built from its saved runs, no training) gives them too."""
    tmp, settings, payload = sweep
    compare = run_compare("SASRec", "synthetic", config_dict=settings, seeds=1, output=tmp / "cmp")
    reduction = compare["per_seed"][0]["reductions"]["separated"]
    row = _row(payload, "tau=1")
    assert row["R_dir"] == pytest.approx(reduction["R_dir"], rel=1e-6)
    assert row["R_shared"] == pytest.approx(reduction["R_shared"], rel=1e-6)
    assert row["p_value_dir"] == pytest.approx(reduction["p_value_dir"])
    assert row["ndcg"] == pytest.approx(compare["per_seed"][0]["metrics"]["separated"]["ndcg@10"], rel=1e-6)
    assert row["dir_frac"] == pytest.approx(compare["per_seed"][0]["energy"]["separated"]["dir_frac"], rel=1e-6)
    own = json.loads((Path(payload["files"]["json"]).parent / "compare" / "compare.json").read_text())
    for key in ("R_dir", "R_shared", "p_value_dir", "p_value_shared"):
        assert own["per_seed"][0]["reductions"]["separated"][key] == pytest.approx(reduction[key], rel=1e-6)
    theirs = compare["per_seed"][0]["metrics"]
    assert set(own["per_seed"][0]["metrics"]) == set(theirs) == {"standard", "separated", "separated_beta0"}
    for row_name, metrics in own["per_seed"][0]["metrics"].items():
        assert metrics == pytest.approx(theirs[row_name], rel=1e-6), row_name


def test_resume_trains_only_what_is_missing_and_refuses_other_settings(tmp_path) -> None:
    settings = synthetic_settings(tmp_path, epochs=1)
    out = tmp_path / "out"
    first = run_tau_sweep("SASRec", "synthetic", "0,1", seeds=1, config_dict=settings, output=out)
    assert first["trained_now"] == 2
    done = run_folder(out, Variant(1.0), 7) / "run.json"
    stamp = done.stat().st_mtime_ns
    more = run_tau_sweep("SASRec", "synthetic", "0,1,learned", seeds=1, config_dict=settings, output=out)
    assert more["trained_now"] == 1 and done.stat().st_mtime_ns == stamp
    assert _row(more, "tau=1")["R_dir"] == _row(first, "tau=1")["R_dir"]
    learned = run_folder(out, Variant("learned"), 7)
    (learned / "run.json").unlink()  # killed after its arrays, before its record: not complete
    (learned / "stale.txt").write_text("left by the killed run")
    again = run_tau_sweep("SASRec", "synthetic", "0,1,learned", seeds=1, config_dict=settings, output=out)
    assert again["trained_now"] == 1 and not (learned / "stale.txt").exists()
    assert _row(again, "tau=learned")["R_dir"] == pytest.approx(_row(more, "tau=learned")["R_dir"], rel=1e-9)
    with pytest.raises(PopPriorError, match="other settings"):
        run_tau_sweep("SASRec", "synthetic", "0,1", seeds=1, config_dict={**settings, "epochs": 2}, output=out)
    preset = tmp_path / "preset.yaml"  # a speed preset's file: its contents are part of every run's settings
    preset.write_text("learning_rate: 0.001\n", encoding="utf-8")  # RecBole's default: only the file differs
    with pytest.raises(PopPriorError, match="other settings"):
        run_tau_sweep("SASRec", "synthetic", "0,1", seeds=1, config_file_list=[str(preset)], config_dict=settings,
                      output=out)
    assert f"Config files (in order): `{preset}`." in sweep_markdown({**first, "config_files": [str(preset)]})
    report_only = run_tau_sweep("SASRec", "synthetic", "0,1,learned", seeds=2, config_dict=settings, output=out,
                                train=False)
    assert report_only["trained_now"] == 0 and report_only["seeds"] == [7]
    # seed 8 trained elsewhere as a sweep of its own (base seed 8), its folders copied in: a sweep of
    # base 7 with two seeds takes them as they are; a folder of another seed is not taken for seed 8
    elsewhere = tmp_path / "elsewhere"
    run_tau_sweep("SASRec", "synthetic", "0,1", seeds=1, config_dict={**settings, "seed": 8}, output=elsewhere)
    for variant in (Variant(0.0), Variant(1.0)):
        shutil.copytree(run_folder(elsewhere, variant, 8), run_folder(out, variant, 8))
    joined = run_tau_sweep("SASRec", "synthetic", "0,1", seeds=2, config_dict=settings, output=out)
    assert joined["trained_now"] == 0 and joined["seeds"] == [7, 8]
    shutil.rmtree(run_folder(out, Variant(1.0), 8))
    shutil.copytree(run_folder(out, Variant(1.0), 7), run_folder(out, Variant(1.0), 8))
    with pytest.raises(PopPriorError, match="other settings"):
        run_tau_sweep("SASRec", "synthetic", "0,1", seeds=2, config_dict=settings, output=out)


def test_windowed_prior_runs_report_the_dense_subspace_share(tmp_path) -> None:
    settings = synthetic_settings(tmp_path, epochs=1, synthetic_windows=2, prior_windows=2)
    payload = run_tau_sweep("SASRec", "synthetic", "0,1", seeds=1, modes="static,windowed", config_dict=settings,
                            output=tmp_path / "out")
    arrays = load_contexts(run_folder(tmp_path / "out", Variant(1.0, mode="windowed"), 7))
    Z = arrays["H"] @ arrays["E"][1:].T
    Zc = Z - Z.mean(axis=1, keepdims=True)
    F = arrays["log_prior_windows"][:, 1:]
    F = F - F.mean(axis=1, keepdims=True)
    _, S, Vt = np.linalg.svd(F, full_matrices=False)
    r = int(np.searchsorted(np.cumsum(S ** 2) / (S ** 2).sum(), 0.95 - 1e-12) + 1)  # DESIGN §3: 95% of ||F||^2
    Q = Vt[:r].T
    row = _row(payload, "tau=1,windowed")
    assert row["subspace_frac"] == pytest.approx(float(((Zc @ Q) ** 2).sum() / (Zc ** 2).sum()), rel=1e-8)
    assert "Popularity subspace" in Path(payload["files"]["md"]).read_text()


def _script(argv: list[str], capsys) -> tuple[int, str]:
    module = runpy.run_path(str(ROOT / "benchmarks" / "tau_sweep.py"))
    status = module["main"](argv)
    return status, capsys.readouterr().err


def test_the_script_plots_any_set_of_sweeps_and_refuses_bad_input(sweep, tmp_path, capsys) -> None:
    _, _, payload = sweep
    figure = tmp_path / "fig.png"
    status, _ = _script(["--plot", payload["files"]["json"], payload["files"]["json"], f"--figure={figure}"], capsys)
    assert status == 0 and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "other.json").write_text("{}")
    for argv, words in ((["--model=SASRec", "--dataset=synthetic", "--taus=1,2"], "must include 0"),
                        (["--plot", str(tmp_path / "other.json")], "not a tau sweep"),
                        (["--plot", payload["files"]["json"], f"--figure={payload['files']['json']}"], "overwrite"),
                        (["--seeds"], "needs a value"), (["--dataset=synthetic"], "required")):
        status, err = _script(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], err


def test_the_context_check_takes_float32_noise_and_refuses_other_contexts() -> None:
    """The sweep's own pass must be the energies' contexts: the same rows through another float32 kernel
    path (rounding of about 1e-6 per entry, as the speed preset's encoder gives) pass; the same number
    of other contexts, or the same ones with one row changed, do not."""
    rng = np.random.default_rng(0)
    H = rng.standard_normal((943, 64)).astype(np.float32).astype(np.float64)
    arm = types.SimpleNamespace(state=types.SimpleNamespace(contexts=ContextStats.from_H(H)), pipe=None)
    noisy = H * (1 + rng.uniform(-2 ** -20, 2 ** -20, H.shape))  # float32 rounding, twice over
    _check_rows({"H": noisy}, arm)
    other = H.copy()
    other[7] = rng.standard_normal(64)
    for rows in (rng.standard_normal(H.shape), other):
        with pytest.raises(RuntimeError, match="disagrees"):
            _check_rows({"H": rows}, arm)


def test_the_kept_epoch_is_the_one_recbole_keeps_on_ties() -> None:
    """RecBole's own early_stopping, replayed over 4-digit curves full of ties, against kept_epoch."""
    from recbole.utils import early_stopping

    from recbole_popprior.tau_sweep_report import _best_epoch, kept_epoch

    rng = np.random.default_rng(0)
    for bigger in (True, False):
        for _ in range(200):
            scores = np.round(rng.choice([0.0601, 0.0602, 0.0603], size=int(rng.integers(1, 15))), 4)
            best, step, kept = (-np.inf if bigger else np.inf), 0, None
            for epoch, value in enumerate(scores):
                best, step, _, update = early_stopping(float(value), best, step, max_step=100, bigger=bigger)
                kept = epoch if update else kept
            curve = [[epoch, float(v)] for epoch, v in enumerate(scores)]
            assert kept_epoch(curve, bigger) == kept
    # the report reads the curve, so runs saved with the old first-of-ties value are reported right
    run = {"valid_curve": [[0, 0.05], [1, 0.07], [2, 0.06], [3, 0.07], [4, 0.065]], "best_epoch": 1}
    assert _best_epoch(run) == 4 and kept_epoch([]) is None
