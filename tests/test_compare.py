"""The matched comparison and the beta-sweep command (docs/DESIGN.md §1, §3; recbole_popprior/compare.py)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from recbole_popprior import checkpoint
from recbole_popprior.compare import arm_config, run_beta_sweep, run_compare, score_singular_values
from recbole_popprior.errors import PopPriorError
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


def test_compare_end_to_end_on_tiny_synthetic(tmp_path) -> None:
    settings = _settings(tmp_path)
    out = tmp_path / "out"
    run_compare("SASRec", "synthetic", config_dict=settings, seeds=2, output=out)

    for name in ("compare.json", "compare.csv", "compare.md", "spectra.png", "energy.png", "permutation.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "compare.json").read_text())
    assert saved["seeds"] == [7, 8]
    labels = [row["label"] for row in saved["summary"]]
    assert labels == ["RecBole SASRec (tau=0)", "prior-separated SASRec (tau=1, beta=1)",
                      "prior-separated SASRec (tau=1, beta=0)"]
    for row in saved["summary"]:
        for col in ("ndcg@10", "recall@10", "mrr@10", "headrecall@10", "midrecall@10", "tailrecall@10",
                    "itemcoverage@10", "averagepopularity@10", "dir_frac", "shared_frac"):
            assert np.isfinite(row[col]["mean"]) and np.isfinite(row[col]["sd"]), (row["label"], col)
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert {r["metric"] for r in rows} >= {"ndcg@10", "R_dir", "R_shared", "p_value_shared"}
    assert "R_shared" in (out / "compare.md").read_text()

    for record in saved["per_seed"]:
        assert record["data_digest"]["standard"] == record["data_digest"]["separated"]
        assert 1 / 200 <= record["reduction"]["p_value_dir"] <= 1.0
        # one computation: the comparison's energies are the PopEnergy metric's (6 digits there)
        for arm, row in (("standard", "standard"), ("separated", "separated")):
            assert record["metrics"][row]["pop_dir_frac"] == pytest.approx(record["energy"][arm]["dir_frac"], rel=1e-5)
            assert record["metrics"][row]["pop_shared_frac"] == pytest.approx(record["energy"][arm]["shared_frac"],
                                                                              rel=1e-5)

    # Independent check of the seed-7 pair: rebuild both arms' data (no training), compare the
    # evaluated contexts tensor by tensor, load the saved weights and recompute R densely.
    record = saved["per_seed"][0]
    contexts, log_priors = {}, {}
    for name, baseline in (("standard", True), ("separated", False)):
        config = arm_config("SASRec", "synthetic", None, settings, seed=7, baseline=baseline,
                            run_dir=tmp_path / f"check-{name}")
        pipe = build_pipeline(config, log=False)
        state = checkpoint.load_checkpoint(f"{record['run_dir'][name]}/model.pth")
        checkpoint.restore_model(pipe.model, state)
        contexts[name] = loader_contexts(pipe.model, pipe.test_data)
        train = pipe.train_data.dataset
        log_priors[name] = _numpy_log_prior(train.inter_feat[train.iid_field].numpy(), train.item_num)
    std, sep = contexts["standard"], contexts["separated"]
    assert torch.equal(std.ids, sep.ids)
    np.testing.assert_array_equal(log_priors["standard"], log_priors["separated"])
    (std_dir, std_sh), (sep_dir, sep_sh) = (_dense_energy(c.H, c.E, log_priors["standard"]) for c in (std, sep))
    assert record["reduction"]["R_dir"] == pytest.approx(1 - sep_dir / std_dir, rel=1e-6, abs=1e-9)
    assert record["reduction"]["R_shared"] == pytest.approx(1 - sep_sh / std_sh, rel=1e-6, abs=1e-9)
    assert record["energy"]["standard"]["dir"] == pytest.approx(std_dir, rel=1e-6)


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


def test_compare_refuses_zero_tau(tmp_path) -> None:
    with pytest.raises(PopPriorError, match="prior_tau"):
        run_compare("SASRec", "synthetic", config_dict=_settings(tmp_path, prior_tau=0.0), seeds=1,
                    output=tmp_path / "o")
    with pytest.raises(PopPriorError, match="seeds"):
        run_compare("SASRec", "synthetic", config_dict=_settings(tmp_path), seeds=0, output=tmp_path / "o")
