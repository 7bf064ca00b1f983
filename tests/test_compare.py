"""The matched comparison and the serve-time beta sweep (DESIGN.md §1, §3; recbole_popprior/compare.py)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from recbole_popprior import checkpoint
from recbole_popprior.compare import (
    arm_config,
    collect_contexts,
    reduction_null,
    run_beta_sweep,
    run_compare,
    score_singular_values,
    serving_beta,
    sweep_beta,
    Contexts,
)
from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator.energy import matched_reduction


def _settings(tmp_path, **overrides) -> dict:
    settings = {
        "data_path": str(tmp_path / "data"),
        "synthetic_users": 120,
        "synthetic_items": 20,
        "synthetic_seq_len": 12,
        "synthetic_pmi_scale": 1.5,
        "epochs": 2,
        "hidden_size": 8,
        "inner_size": 16,
        "n_layers": 1,
        "n_heads": 1,
        "MAX_ITEM_LIST_LENGTH": 5,
        "train_batch_size": 256,
        "eval_batch_size": 64,  # several evaluation batches
        "show_progress": False,
        "state": "WARNING",
        "gpu_id": "",
        "seed": 7,
        "energy_permutations": 199,
    }
    settings.update(overrides)
    return settings


def _dense_energy(H: np.ndarray, E: np.ndarray, log_prior: np.ndarray) -> tuple[float, float]:
    """E_dir and E_shared from the dense m x n score matrix (DESIGN §3, written out)."""
    Z = H @ E[1:].T
    Zc = Z - Z.mean(axis=1, keepdims=True)
    lp = log_prior[1:] - log_prior[1:].mean()
    s = Zc @ (lp / np.linalg.norm(lp))
    return float(s @ s), float(len(s) * s.mean() ** 2)


def _numpy_log_prior(targets: np.ndarray, n_items: int, alpha: float = 1.0) -> np.ndarray:
    counts = np.bincount(targets, minlength=n_items).astype(np.float64)
    counts[0] = 0.0
    out = np.log(counts + alpha) - np.log(counts.sum() + alpha * (n_items - 1))
    out[0] = -np.inf
    return out


def test_score_singular_values_match_dense_svd() -> None:
    rng = np.random.default_rng(0)
    H = rng.standard_normal((300, 6)) + 0.5
    E = rng.standard_normal((41, 6)) * np.linspace(0.2, 2.0, 6)
    Z = H @ E[1:].T
    dense = np.linalg.svd(Z - Z.mean(axis=1, keepdims=True), compute_uv=False)[:6]
    np.testing.assert_allclose(score_singular_values(H, E), dense, rtol=1e-8, atol=1e-8 * dense[0])


def test_reduction_null_reproduces_matched_reduction_p_values() -> None:
    rng = np.random.default_rng(1)
    log_prior = np.concatenate([[-np.inf], np.log(rng.dirichlet(np.ones(30)))])
    E = rng.standard_normal((31, 5))
    H_std, H_sep = rng.standard_normal((80, 5)) + 1.0, rng.standard_normal((80, 5))
    empty = torch.zeros(80, 1)
    ctx = [Contexts(H, E, empty, empty, empty.long().squeeze(1) + 1, empty) for H in (H_std, H_sep)]
    null = reduction_null(ctx[0], ctx[1], log_prior, 300, seed=4)
    reference = matched_reduction((H_std, E), (H_sep, E), permutations=300, seed=4, log_prior=log_prior)
    for name in ("dir", "shared"):
        p = (1 + np.count_nonzero(null[name] >= reference[f"R_{name}"] - 1e-9 * abs(reference[f"R_{name}"]))) / 301
        assert p == pytest.approx(reference[f"p_value_{name}"])
        assert null[name].mean() == pytest.approx(reference[f"null_mean_{name}"])


def test_compare_end_to_end_on_tiny_synthetic(tmp_path) -> None:
    settings = _settings(tmp_path)
    out = tmp_path / "out"
    run_compare("SASRec", "synthetic", config_dict=settings, seeds=2, output=out)

    for name in ("compare.json", "compare.csv", "compare.md", "spectra.png", "energy.png", "permutation.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "compare.json").read_text())
    assert saved["seeds"] == [7, 8]
    assert saved["contexts_identical"] is True
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
        # both arms saw the same training split and the same test contexts
        assert record["train_digest"]["standard"] == record["train_digest"]["separated"]
        assert record["contexts_digest"]["standard"] == record["contexts_digest"]["separated"]
        assert 1 / 200 <= record["reduction"]["p_value_dir"] <= 1.0

    # Independent check of the seed-7 pair: rebuild both arms' data (no training), compare the
    # evaluated contexts tensor by tensor, load the saved weights and recompute R densely.
    from recbole_popprior.quick_start import build_pipeline

    record = saved["per_seed"][0]
    contexts, log_priors = {}, {}
    for name, baseline in (("standard", True), ("separated", False)):
        config = arm_config("SASRec", "synthetic", None, settings, seed=7, baseline=baseline,
                            run_dir=tmp_path / f"check-{name}")
        pipe = build_pipeline(config, log=False)
        state = checkpoint.load_checkpoint(f"{record['run_dir'][name]}/model.pth")
        checkpoint.restore_model(pipe.model, state)
        contexts[name] = collect_contexts(pipe.model, pipe.test_data)
        train = pipe.train_data.dataset
        log_priors[name] = _numpy_log_prior(train.inter_feat[train.iid_field].numpy(), train.item_num)
    std, sep = contexts["standard"], contexts["separated"]
    assert torch.equal(std.users, sep.users) and torch.equal(std.item_seq, sep.item_seq)
    assert torch.equal(std.item_len, sep.item_len) and torch.equal(std.targets, sep.targets)
    np.testing.assert_array_equal(log_priors["standard"], log_priors["separated"])
    (std_dir, std_sh), (sep_dir, sep_sh) = (_dense_energy(c.H, c.E, log_priors["standard"]) for c in (std, sep))
    assert record["reduction"]["R_dir"] == pytest.approx(1 - sep_dir / std_dir, rel=1e-6, abs=1e-9)
    assert record["reduction"]["R_shared"] == pytest.approx(1 - sep_sh / std_sh, rel=1e-6, abs=1e-9)
    assert record["energy"]["standard"]["dir"] == pytest.approx(std_dir, rel=1e-6)


def test_beta_sweep_shifts_scores_by_exactly_beta_minus_tau_log_prior(tmp_path) -> None:
    from recbole_popprior.quick_start import build_pipeline

    settings = _settings(tmp_path, prior_tau=0.5, epochs=1)
    config = arm_config("SASRec", "synthetic", None, settings, seed=None, baseline=False,
                        run_dir=tmp_path / "run")
    pipe = build_pipeline(config, log=False)
    pipe.trainer.fit(pipe.train_data, None, saved=False, show_progress=False)
    model, tau = pipe.model, 0.5
    train = pipe.train_data.dataset
    log_prior = torch.as_tensor(_numpy_log_prior(train.inter_feat[train.iid_field].numpy(), train.item_num))
    interaction = next(iter(pipe.test_data))[0]
    model.eval()
    with torch.no_grad():
        normal = model.full_sort_predict(interaction).double()
        for beta in (-1.0, 0.0, 0.5, 2.0):
            with serving_beta(model, beta):
                scores = model.full_sort_predict(interaction).double()
            if beta == tau:
                assert torch.equal(scores, normal)
            shift = (scores - normal)[:, 1:]
            expected = ((beta - tau) * log_prior[1:]).expand_as(shift)
            torch.testing.assert_close(shift, expected, rtol=0, atol=1e-5)
    assert model.prior_beta is None  # restored

    # the sweep's evaluation at beta = tau is exactly the normal serving path's
    normal_result = pipe.trainer.evaluate(pipe.test_data, load_best_model=False)
    rows = sweep_beta(pipe.trainer, pipe.test_data, [0.0, tau, -1.0])
    assert [r["beta"] for r in rows] == [0.0, tau, -1.0]
    assert rows[1] == {"beta": tau, **{k: float(v) for k, v in normal_result.items()}}
    assert rows[0]["averagepopularity@10"] != rows[1]["averagepopularity@10"]
    # a bare model works too (a trainer is built from the loader's config)
    assert sweep_beta(model, pipe.test_data, [tau], train_data=pipe.train_data)[0] == rows[1]


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
