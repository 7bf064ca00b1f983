"""The energy metrics (recbole_popprior/evaluator/metrics.py) inside a real RecBole evaluation
(real dataset, real trainer).

Every metric value is checked against a reference recomputed here from the trained model's
dense learned scores on the same test contexts (docs/DESIGN.md §3-4).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from recbole.model.sequential_recommender import GRU4RecCPR, SASRec


from conftest import tiny_config
from recbole_popprior.config import Config
from recbole_popprior.evaluator.energy import permuted_directions, popularity_direction
from recbole_popprior.quick_start import build_pipeline, train_and_test

ENERGY_METRICS = ["Recall", "MRR", "PopEnergy", "PopPermutation", "PopSubspace", "EmbeddingSpectrum",
                  "PopBandRecall", "AveragePopularity", "TailPercentage"]
B = 60


def _pipeline(model, data_path, out_dir, **overrides):
    settings = dict(
        metrics=ENERGY_METRICS, topk=[5, 10], loss_type="CE", train_neg_sample_args=None,
        eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
        output=str(out_dir), fast_loader=False, energy_permutations=B, energy_seed=7, prior_windows=3,
        reranker_CAN_NUM="10")  # GRU4RecCPR's reranker candidates must fit the tiny catalogue
    if not isinstance(model, str):  # a RecBole class here stands for RecBole's own model (a class
        settings["popprior_baseline"] = True  # alone gets the plugin's mixin, as a user's subclass does)
    settings = tiny_config(data_path, **{**settings, **overrides})
    config = Config(model=model, dataset="tiny", config_dict=settings)
    return build_pipeline(config, log=False)


@torch.no_grad()
def _dense_reference(pipe):
    """Learned scores Z [m, n_items], full serving scores, targets and H (when factorised)."""
    model = pipe.model.eval()
    learned, served, targets, rows = [], [], [], 0
    for interaction, _, positive_u, positive_i in pipe.test_data:
        method = getattr(model, "popprior_learned_scores", None)
        learned.append((method or model.full_sort_predict)(interaction).double())
        scores = model.full_sort_predict(interaction).view(len(interaction), -1)
        scores[:, 0] = -np.inf
        served.append(scores)
        targets += [(rows + int(u), int(i)) for u, i in zip(positive_u, positive_i)]
        rows += len(interaction)
    return torch.cat(learned).numpy(), torch.cat(served), targets


def _energy_reference(Z, lp, windows, threshold, seed):
    Zc = Z[:, 1:] - Z[:, 1:].mean(axis=1, keepdims=True)
    c = lp[1:] - lp[1:].mean()
    l = c / np.linalg.norm(c)
    T = np.sum(Zc**2)
    s = Zc @ l
    ref = {"pop_total": T, "pop_e_dir": s @ s, "pop_e_shared": len(s) * s.mean() ** 2,
           "pop_e_specific": np.sum((s - s.mean()) ** 2), "pop_dir_frac": (s @ s) / T,
           "pop_shared_frac": len(s) * s.mean() ** 2 / (s @ s)}
    null = np.array([np.sum((Zc @ lb) ** 2) / T
                     for chunk in permuted_directions(popularity_direction(lp), B, seed) for lb in chunk])
    ref["pop_p_value"] = (1 + np.sum(null >= ref["pop_dir_frac"])) / (B + 1)
    ref["pop_null_mean"] = null.mean()
    ref["pop_null_q95"] = np.quantile(null, 0.95)
    F = windows[:, 1:] - windows[:, 1:].mean(axis=1, keepdims=True)
    _, S, Vt = np.linalg.svd(F, full_matrices=False)
    S, Vt = S[S > S[0] * 1e-10], Vt[: np.sum(S > S[0] * 1e-10)]
    cum = np.cumsum(S**2) / np.sum(S**2)
    r = int(np.argmax(cum >= threshold)) + 1
    frac = lambda k: np.sum((Zc @ Vt[: min(k, len(S))].T) ** 2) / T  # noqa: E731
    ref.update({"subspace_rank": r, "subspace_frac": frac(r),
                **{f"subspace_frac@{k}": frac(k) for k in (1, 2, 3)}})
    return ref


def _band_reference(served, targets, counter, n_items, ks):
    """Bands by a plain sort (count desc, id asc) and recall by a per-row loop."""
    order = sorted(range(1, n_items), key=lambda i: (-counter.get(i, 0), i))
    n = n_items - 1
    band = {}
    for pos, item in enumerate(order):
        band[item] = "head" if pos < round(0.2 * n) else ("tail" if pos >= n - round(0.2 * n) else "mid")
    top = torch.topk(served, max(ks), dim=-1).indices.numpy()
    out = {}
    for name in ("head", "mid", "tail"):
        for k in ks:
            per_row = {}
            for row, item in targets:
                if band[item] == name:
                    hit, tot = per_row.get(row, (0, 0))
                    per_row[row] = (hit + (item in top[row, :k]), tot + 1)
            out[f"{name}recall@{k}"] = (np.mean([h / t for h, t in per_row.values()])
                                        if per_row else math.nan)
    return out


def _check(result, ref, keys, rel=1e-4):
    for key in keys:
        assert key in result, key
        if isinstance(ref[key], float) and math.isnan(ref[key]):
            assert math.isnan(result[key]), key
        else:
            assert result[key] == pytest.approx(ref[key], rel=rel, abs=1e-9), key


# GRU4RecCPR scores items with a softmax mixture, not a plain dot product: the fallback path
@pytest.mark.parametrize("model,path", [("SASRec", "factorised"), (SASRec, "factorised"), (GRU4RecCPR, "scores")],
                         ids=["plugin-SASRec", "recbole-SASRec", "recbole-GRU4RecCPR"])
def test_energy_metrics_in_real_recbole_evaluation(model, path, tiny_data, out_dir):
    pipe = _pipeline(model, tiny_data, out_dir)
    record = train_and_test(pipe, saved=False)
    test, valid = record["test_result"], record["best_valid_result"]

    # Permutations run at the final test evaluation only (energy_permutation_stage: test).
    assert "pop_p_value" in test and "pop_p_value" not in valid
    assert "pop_dir_frac" in valid
    # RecBole's own popularity metrics run: the collector leaves the Counter alone.
    assert test["averagepopularity@10"] > 0 and 0 <= test["tailpercentage@10"] <= 1

    collector = pipe.trainer.eval_collector
    model_obj = pipe.model
    lp = getattr(model_obj, "log_prior", None)
    lp = (lp if isinstance(lp, torch.Tensor) else collector.train_log_prior).double().numpy()
    windows = getattr(model_obj, "log_prior_windows", None)
    windows = (windows if isinstance(windows, torch.Tensor) else collector.train_log_prior_windows)
    assert windows is not None and windows.shape[0] == 3
    Z, served, targets = _dense_reference(pipe)
    assert test["pop_contexts"] == Z.shape[0]
    ref = _energy_reference(Z, lp, windows.double().numpy(), 0.95, seed=7)
    _check(test, ref, [k for k in ref if k != "pop_p_value"])
    assert test["pop_p_value"] == pytest.approx(ref["pop_p_value"])

    dataset = pipe.train_data.dataset
    bands = _band_reference(served, targets, dataset.item_counter, dataset.item_num, [5, 10])
    _check(test, bands, list(bands))
    assert any(not math.isnan(v) and v > 0 for v in bands.values())

    E = model_obj.item_embedding.weight.detach().double().numpy()[1:]
    s = np.linalg.svd(E - E.mean(axis=0), compute_uv=False)
    rho = s**2 / np.sum(s**2)
    U = E / np.linalg.norm(E, axis=1, keepdims=True)
    cos = U @ U.T
    emb = {"emb_r1": rho[0], "emb_erank": np.exp(-np.sum(rho * np.log(rho))),
           "emb_mean_cos": (cos.sum() - np.trace(cos)) / (len(E) * (len(E) - 1))}
    _check(test, emb, list(emb))
    if path == "factorised":
        with torch.no_grad():  # balance error from dense H of the test contexts
            H = torch.cat([model_obj.forward(i[model_obj.ITEM_SEQ], i[model_obj.ITEM_SEQ_LEN])
                           for i, *_ in pipe.test_data]).double().numpy()
        G = H.T @ H
        ref_bal = np.linalg.norm(G - E.T @ E) / np.linalg.norm(G)
        assert test["emb_balance_err"] == pytest.approx(ref_bal, rel=1e-4)
    else:
        assert math.isnan(test["emb_balance_err"])
    state_path = collector._default_factor_ok.get(id(model_obj))
    if model is SASRec:
        assert state_path is True  # verified default factors, not the fallback
    if model is GRU4RecCPR:
        assert state_path is False


def test_plain_runs_do_not_collect_energy(tiny_data, out_dir):
    pipe = _pipeline("SASRec", tiny_data, out_dir, metrics=["MRR", "AveragePopularity"])
    collector = pipe.trainer.eval_collector
    assert not collector._need_model and not collector._need_targets
    record = train_and_test(pipe, saved=False)
    assert "averagepopularity@10" in record["test_result"]
    assert collector._state is None


def test_permutation_stage_valid_runs_at_validation_and_max_contexts_caps(tiny_data, out_dir):
    pipe = _pipeline("SASRec", tiny_data, out_dir, metrics=["MRR", "PopEnergy", "PopPermutation"],
                     energy_permutation_stage="valid", energy_max_contexts=25)
    record = train_and_test(pipe, saved=False)
    assert "pop_p_value" in record["best_valid_result"]
    assert record["test_result"]["pop_contexts"] == 25


# --- PopPermutation's shared-energy test (docs/DESIGN.md §3.1) ---------------------------------
@pytest.mark.parametrize("model", ["SASRec", GRU4RecCPR], ids=["factorised", "scores"])
def test_pop_permutation_reports_the_shared_test(model, tiny_data, out_dir):
    pipe = _pipeline(model, tiny_data, out_dir)
    test = train_and_test(pipe, saved=False)["test_result"]
    collector = pipe.trainer.eval_collector
    lp = getattr(pipe.model, "log_prior", None)
    lp = (lp if isinstance(lp, torch.Tensor) else collector.train_log_prior).double().numpy()
    Z = _dense_reference(pipe)[0][:, 1:]
    Zc = Z - Z.mean(axis=1, keepdims=True)
    T = np.sum(Zc**2)
    observed = Zc.shape[0] * (Zc @ popularity_direction(lp)).mean() ** 2 / T
    null = np.array([Zc.shape[0] * (Zc @ lb).mean() ** 2 / T
                     for chunk in permuted_directions(popularity_direction(lp), B, 7) for lb in chunk])
    assert test["pop_p_value_shared"] == pytest.approx((1 + np.sum(null >= observed)) / (B + 1))
    assert test["pop_null_mean_shared"] == pytest.approx(null.mean(), rel=1e-4)
    assert test["pop_null_q95_shared"] == pytest.approx(np.quantile(null, 0.95), rel=1e-4)
    assert test["pop_e_shared"] / test["pop_total"] == pytest.approx(observed, rel=1e-4)
