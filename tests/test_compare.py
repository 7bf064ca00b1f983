"""The matched comparison and the beta-sweep command (docs/DESIGN.md §1, §3; recbole_popprior/compare.py)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from scipy import stats

from recbole_popprior import checkpoint
from recbole_popprior.arms import ARMS, ArmSpec
from recbole_popprior.beta_sweep import run_beta_sweep
from recbole_popprior.compare import arm_config, run_compare, score_singular_values
from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator.energy import permuted_directions
from recbole_popprior.quick_start import build_pipeline
from conftest import loader_contexts, numpy_log_prior as _numpy_log_prior, synthetic_settings as _settings


def _dense_energy(H: np.ndarray, E: np.ndarray, log_prior: np.ndarray) -> tuple[float, float]:
    """E_dir and E_shared from the dense m x n score matrix (DESIGN §3, written out)."""
    Z = H @ E[1:].T
    Zc = Z - Z.mean(axis=1, keepdims=True)
    lp = log_prior[1:] - log_prior[1:].mean()
    s = Zc @ (lp / np.linalg.norm(lp))
    return float(s @ s), float(len(s) * s.mean() ** 2)


def test_score_singular_values_match_dense_svd() -> None:
    rng = np.random.default_rng(0)
    H = rng.standard_normal((300, 6)) + 0.5
    E = rng.standard_normal((41, 6)) * np.linspace(0.2, 2.0, 6)
    Z = H @ E[1:].T
    dense = np.linalg.svd(Z - Z.mean(axis=1, keepdims=True), compute_uv=False)[:6]
    np.testing.assert_allclose(score_singular_values(H.T @ H, E), dense, rtol=1e-8, atol=1e-8 * dense[0])


#: a test-only third arm: the prior-separated model at another tau (works with today's config keys)
HALF = ArmSpec("half", "prior-separated {model} (tau={tau:g}, beta={beta:g})", {"prior_tau": 0.5})
TABLE = {**ARMS, "half": HALF}


def _dense_tests(H: np.ndarray, E: np.ndarray, log_prior: np.ndarray, B: int, seed: int) -> tuple[float, float]:
    """One model's permutation p-values of dir_frac and E_shared/T, from the dense score matrix (DESIGN §3.1)."""
    Z = H @ E[1:].T
    Zc = Z - Z.mean(axis=1, keepdims=True)
    T = float((Zc ** 2).sum())
    lp = log_prior[1:] - log_prior[1:].mean()
    l = lp / np.linalg.norm(lp)
    L = np.concatenate(list(permuted_directions(l, B, seed)))  # the draws' convention; statistics below are dense
    S = Zc @ np.vstack([l, L]).T  # [m, 1 + B]
    frac_dir = (S ** 2).sum(axis=0) / T
    frac_sh = len(H) * S.mean(axis=0) ** 2 / T
    return tuple(float((1 + np.count_nonzero(f[1:] >= f[0] * (1 - 1e-9))) / (B + 1)) for f in (frac_dir, frac_sh))


def test_three_arms_on_identical_contexts_with_dense_reductions_and_t_intervals(tmp_path) -> None:
    settings = _settings(tmp_path)
    out = tmp_path / "out"
    run_compare("SASRec", "synthetic", config_dict=settings, seeds=2, output=out,
                arms="standard,separated,half", arm_table=TABLE)

    for name in ("compare.json", "compare.csv", "compare.md", "spectra.png", "energy.png", "permutation.png",
                 "arms.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "compare.json").read_text())
    assert saved["seeds"] == [7, 8] and saved["confidence"] == 0.95  # the shipped default
    assert [arm["name"] for arm in saved["arms"]] == ["standard", "separated", "half"]
    assert [row["label"] for row in saved["summary"]] == [
        "RecBole SASRec (tau=0)", "prior-separated SASRec (tau=1, beta=1)", "prior-separated SASRec (tau=1, beta=0)",
        "prior-separated SASRec (tau=0.5, beta=0.5)", "prior-separated SASRec (tau=0.5, beta=0)"]
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert {r["metric"] for r in rows} >= {"ndcg@10", "delta_ndcg@10", "R_dir", "R_shared", "p_value_dir",
                                           "p_value_shared", "own_p_value", "emb_erank", "fit_ratio"}
    B, energy_seed = saved["permutations"], 2020  # energy_seed: the shipped default

    # Independent check of every seed: rebuild each arm's data (no training), compare the
    # contexts tensor by tensor, load the saved weights and recompute everything densely.
    for k, record in enumerate(saved["per_seed"]):
        seed = record["seed"]
        assert len(set(record["data_digest"].values())) == 1
        pipes, log_priors = {}, {}
        for name, baseline, tau in (("standard", True, None), ("separated", False, None), ("half", False, 0.5)):
            config = arm_config("SASRec", "synthetic", None, settings, seed=seed, baseline=baseline, tau=tau,
                                run_dir=tmp_path / f"check-{seed}-{name}")
            pipe = build_pipeline(config, log=False)
            checkpoint.restore_model(pipe.model, checkpoint.load_checkpoint(f"{record['run_dir'][name]}/model.pth"))
            pipes[name] = pipe
            train = pipe.train_data.dataset
            log_priors[name] = _numpy_log_prior(train.inter_feat[train.iid_field].numpy(), train.item_num)
        reference_loader = pipes["standard"].test_data  # the loader compare evaluates every arm on
        contexts = {name: loader_contexts(pipe.model, reference_loader) for name, pipe in pipes.items()}
        own = {name: loader_contexts(pipe.model, pipe.test_data) for name, pipe in pipes.items()}
        dense = {}
        for name in pipes:
            assert torch.equal(own[name].ids, contexts["standard"].ids), name  # identical contexts, same order
            np.testing.assert_array_equal(log_priors[name], log_priors["standard"])
            c = contexts[name]
            assert record["energy"][name]["m"] == len(c.H)
            dense[name] = _dense_energy(c.H, c.E, log_priors["standard"])
            assert record["energy"][name]["dir"] == pytest.approx(dense[name][0], rel=1e-6)
            # one computation: the comparison's energies are the PopEnergy metric's (6 digits there)
            assert record["metrics"][name]["pop_dir_frac"] == pytest.approx(record["energy"][name]["dir_frac"],
                                                                             rel=1e-5)
            # each arm's own permutation tests, against its own null
            p_dir, p_sh = _dense_tests(c.H, c.E, log_priors["standard"], B, energy_seed)
            assert record["specificity"][name]["p_value"] == pytest.approx(p_dir, abs=1e-12), name
            assert record["specificity"][name]["p_value_shared"] == pytest.approx(p_sh, abs=1e-12), name
        for name in ("separated", "half"):
            red = record["reductions"][name]
            assert red["R_dir"] == pytest.approx(1 - dense[name][0] / dense["standard"][0], rel=1e-6, abs=1e-9)
            assert red["R_shared"] == pytest.approx(1 - dense[name][1] / dense["standard"][1], rel=1e-6, abs=1e-9)
            assert 1 / (B + 1) <= red["p_value_dir"] <= 1.0 and 1 / (B + 1) <= red["p_value_shared"] <= 1.0
            for key in ("R_dir", "R_shared", "p_value_dir", "p_value_shared"):
                assert saved["reductions"][name][key]["per_seed"][k] == red[key]
        assert record["metrics"]["separated_beta0"]["ndcg@10"] != record["metrics"]["separated"]["ndcg@10"]

    # Seed-level statistics, recomputed here from the per-seed values in compare.json; with 2 seeds
    # no interval and no paired test is shown (uncertainty.MIN_SEEDS), so the report says so.
    per_seed = saved["per_seed"]
    for row in saved["summary"]:
        for col in ("ndcg@10", "recall@10", "mrr@10", "dir_frac", "emb_r1", "emb_erank"):
            values = [rec["metrics"][row["row"]][col] if "@" in col else rec["energy"][row["row"]][col]
                      for rec in per_seed]
            cell = row[col]
            assert cell["per_seed"] == values and cell["mean"] == pytest.approx(np.mean(values), rel=1e-12)
            assert cell["ci"] is None and cell["note"] == "n = 2 seeds: interval not shown"
        ratios = [rec["fit_seconds"][row["arm"]] / rec["fit_seconds"]["standard"] for rec in per_seed]
        assert row["fit_ratio"]["mean"] == pytest.approx(np.mean(ratios), rel=1e-9)
    for name in ("separated", "half"):
        for key in ("R_dir", "R_shared"):
            assert saved["reductions"][name][key]["ci"] is None
            ps = saved["reductions"][name][f"p_value_{key[2:]}"]["per_seed"]
            fisher = stats.chi2.sf(-2 * np.sum(np.log(ps)), 2 * len(ps))
            assert saved["reductions"][name][f"p_value_{key[2:]}"]["combined"] == pytest.approx(fisher, rel=1e-9)
    for delta in saved["deltas"]:
        for col in ("ndcg@10", "recall@10", "tailrecall@10", "averagepopularity@10"):
            d = np.array([rec["metrics"][delta["row"]][col] - rec["metrics"]["standard"][col] for rec in per_seed])
            cell = delta[col]
            assert cell["mean_diff"] == pytest.approx(d.mean(), abs=1e-12)
            assert cell["p_value"] is None and cell["ci"] is None
    md = (out / "compare.md").read_text()
    assert md.startswith("# SASRec on synthetic") and "## Headline" in md and "Fisher" in md and "±" not in md
    assert "n = 2 seeds: interval not shown" in md and "no interval, no test" in md


def _walk(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_one_seed_default_arms_report_no_interval(tmp_path) -> None:
    out = tmp_path / "out"
    run_compare("SASRec", "synthetic", config_dict=_settings(tmp_path, epochs=1), seeds=1, output=out)
    saved = json.loads((out / "compare.json").read_text())
    assert [arm["name"] for arm in saved["arms"]] == ["standard", "separated"]  # today's default
    assert [row["label"] for row in saved["summary"]] == [
        "RecBole SASRec (tau=0)", "prior-separated SASRec (tau=1, beta=1)", "prior-separated SASRec (tau=1, beta=0)"]
    md = (out / "compare.md").read_text()
    assert "n = 1 seed: interval not shown" in md and "±" not in md and "Fisher" not in md
    pairs = list(_walk(saved))
    assert any(key == "ci" for key, _ in pairs)
    for key, value in pairs:
        if key in ("ci", "sd", "sd_diff", "low", "high", "half_width", "statistic"):
            assert value is None, key
    assert saved["summary"][0]["ndcg@10"]["mean"] == saved["per_seed"][0]["metrics"]["standard"]["ndcg@10"]
    assert saved["reductions"]["separated"]["p_value_dir"]["per_seed"] == [
        saved["per_seed"][0]["reductions"]["separated"]["p_value_dir"]]
    assert (out / "arms.png").stat().st_size > 0


def test_run_beta_sweep_writes_files(tmp_path) -> None:
    out = tmp_path / "sweep"
    rows = run_beta_sweep("SASRec", "synthetic", [-1.0, 0.0, 1.0], config_dict=_settings(tmp_path, epochs=1),
                          output=out)
    assert [r["beta"] for r in rows] == [-1.0, 0.0, 1.0]
    for name in ("beta_sweep.json", "beta_sweep.csv", "beta_sweep.md"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "beta_sweep.json").read_text())
    assert [r["beta"] for r in saved["rows"]] == [-1.0, 0.0, 1.0]
    assert all("itemcoverage@10" in r and "averagepopularity@10" in r for r in saved["rows"])
    # beta = -1 pushes popular items down, beta = 1 pushes them up
    pops = [r["averagepopularity@10"] for r in rows]
    assert pops[0] < pops[2]
    # the table: NDCG first; measures that do not depend on beta listed once above it; counts as integers
    md = (out / "beta_sweep.md").read_text()
    columns = [c.strip() for c in next(line for line in md.splitlines() if line.startswith("| beta")).strip("|").split("|")]
    assert columns[:2] == ["beta", "ndcg@10"]
    constant = [k for k in saved["rows"][0] if k != "beta" and len({repr(r.get(k)) for r in saved["rows"]}) == 1]
    assert {"pop_dir_frac", "pop_contexts", "tau"} <= set(constant) and not set(constant) & set(columns)
    assert all(f"`{k}` = " in md for k in constant)
    assert f"`pop_contexts` = {int(rows[0]['pop_contexts'])}\n" in md and ".0000" not in md


def test_compare_refuses_zero_tau(tmp_path) -> None:
    with pytest.raises(PopPriorError, match="prior_tau"):
        run_compare("SASRec", "synthetic", config_dict=_settings(tmp_path, prior_tau=0.0), seeds=1,
                    output=tmp_path / "o")
    with pytest.raises(PopPriorError, match="seeds"):
        run_compare("SASRec", "synthetic", config_dict=_settings(tmp_path), seeds=0, output=tmp_path / "o")
    for bad in (1.0, 0.0, "high", True):
        with pytest.raises(PopPriorError, match="compare_confidence"):
            run_compare("SASRec", "synthetic", config_dict=_settings(tmp_path, compare_confidence=bad), seeds=1,
                        output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_rerun_stopped_half_way_leaves_the_complete_set_as_it_was(tmp_path, monkeypatch) -> None:
    """``compare.json`` says the set is complete, so a set is committed as one (issue 19, 7): a rerun
    with other settings that stops after its first arm leaves the old set byte for byte, and a
    staging folder left by a killed run is removed by the next run in the folder."""
    import subprocess
    import sys

    from recbole_popprior import compare

    out = tmp_path / "out"
    run_compare("SASRec", "synthetic", config_dict=_settings(tmp_path, epochs=1), seeds=1, output=out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert any(p.name == "model.pth" for p in before)
    real, calls = compare.train_arm, []

    def stop_at_the_second_arm(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "train_arm", stop_at_the_second_arm)
    with pytest.raises(KeyboardInterrupt):
        run_compare("SASRec", "synthetic", config_dict=_settings(tmp_path, epochs=2, learning_rate=0.01), seeds=1,
                    output=out)
    assert calls == ["standard", "separated"]  # the new standard arm was trained (in the staging folder)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    monkeypatch.setattr(compare, "train_arm", real)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f".compare-{dead.pid}-killed" / "runs").mkdir(parents=True)  # what a SIGKILLed rerun leaves
    payload = run_compare("SASRec", "synthetic", config_dict=_settings(tmp_path, epochs=2), seeds=1, output=out)
    assert not list(out.glob(".compare-*"))
    saved = json.loads((out / "compare.json").read_text())
    for name, run_dir in saved["per_seed"][0]["run_dir"].items():
        assert run_dir == str(out / "runs" / f"seed7-{name}") and (out / "runs" / f"seed7-{name}" / "model.pth").is_file()
    assert saved["files"]["json"] == str(out / "compare.json") and all(
        (out / "compare.json").parent == type(out)(path).parent for path in saved["files"].values())
    assert payload["files"] == saved["files"]
    assert (out / "runs" / "seed7-standard" / "model.pth").read_bytes() != before[type(out)("runs/seed7-standard/model.pth")]
