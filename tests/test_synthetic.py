"""The synthetic generator produces what its docstring promises (DESIGN.md §1, data/synthetic.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import optimize, stats

from recbole_popprior.data.synthetic import (
    WINDOW_SPAN,
    SyntheticSettings,
    SyntheticTruth,
    ensure_synthetic_dataset,
    generate,
    load_truth,
    truth_in_recbole_ids,
    write_atomic_files,
    zipf_log_p,
)
from recbole_popprior.errors import PopPriorError


def _tv_ratio(counts: np.ndarray, probs: np.ndarray) -> float:
    """Count-weighted mean of TV(empirical, probs) / E-bound over contexts with >= 100 visits.

    For N independent draws, E[TV] <= 0.5 * sum_i sqrt(p_i (1 - p_i) / N) (Jensen), and for a
    large N the expected ratio is about sqrt(2/pi) ~= 0.8, so a mean ratio below 1 is what the
    truth should give; a wrong ``probs`` gives a ratio that grows like sqrt(N).
    """
    ratios, weights = [], []
    for row, p in zip(counts, probs):
        total = row.sum()
        if total < 100:
            continue
        tv = 0.5 * np.abs(row / total - p).sum()
        bound = 0.5 * np.sqrt(p * (1 - p) / total).sum()
        ratios.append(tv / bound)
        weights.append(total)
    assert len(ratios) >= 5
    return float(np.average(ratios, weights=weights))


def _zipf_mle(samples: np.ndarray, n: int) -> float:
    """Maximum-likelihood Zipf exponent of samples in 1..n."""
    log_x = np.log(samples).sum()
    log_ranks = np.log(np.arange(1, n + 1))

    def nll(s: float) -> float:
        return s * log_x + samples.size * np.logaddexp.reduce(-s * log_ranks)

    return float(optimize.minimize_scalar(nll, bounds=(0.0, 5.0), method="bounded", options={"xatol": 1e-8}).x)


def test_pmi_is_true_normalised_mutual_information_of_low_rank() -> None:
    settings = SyntheticSettings.defaults(items=40, rank=3, pmi_scale=1.5)
    truth = generate(settings)
    p = np.exp(truth.log_p)
    np.testing.assert_allclose(p, np.exp(zipf_log_p(40, 1.0)))
    np.testing.assert_allclose((p[None, :] * np.exp(truth.pmi)).sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose((p[:, None] * np.exp(truth.pmi)).sum(axis=0), 1.0, atol=1e-10)
    # p is stationary: p(i) = sum_c p(c) p(i | c)
    np.testing.assert_allclose(p @ np.exp(truth.log_transition), p, atol=1e-10)
    centring = np.eye(40) - 1.0 / 40
    singular = np.linalg.svd(centring @ truth.pmi @ centring, compute_uv=False)
    assert singular[2] > 1e-3 and singular[3] < 1e-9 * singular[0]
    assert np.linalg.matrix_rank(truth.pmi, tol=1e-8 * singular[0]) <= 3 + 2


def test_next_item_frequencies_converge_to_construction() -> None:
    truth = generate(SyntheticSettings.defaults(users=4000, items=20, seq_len=20, rank=3, pmi_scale=1.5, seed=7))
    n = 20
    counts = np.zeros((n, n))
    np.add.at(counts, (truth.items[:, :-1].ravel() - 1, truth.items[:, 1:].ravel() - 1), 1)
    np.testing.assert_array_equal(truth.context_of_step[:, 1:], truth.items[:, :-1])
    assert (truth.context_of_step[:, 0] == 0).all()
    assert _tv_ratio(counts, np.exp(truth.log_transition)) < 1.0
    # the test can fail: ignoring the PMI (marginal only) is far outside the sampling error
    assert _tv_ratio(counts, np.tile(np.exp(truth.log_p), (n, 1))) > 3.0


@pytest.mark.parametrize("exponent", [0.8, 1.2])
def test_item_marginal_is_zipf_with_chosen_exponent(exponent: float) -> None:
    n, users = 30, 20000
    truth = generate(SyntheticSettings.defaults(users=users, items=n, seq_len=6, zipf=exponent, seed=11))
    p = np.exp(zipf_log_p(n, exponent))
    # Across users (independent chains started in the stationary law) the items at one fixed
    # position are i.i.d. draws from p, so classical goodness-of-fit applies.
    variance_log_rank = p @ np.log(np.arange(1, n + 1)) ** 2 - (p @ np.log(np.arange(1, n + 1))) ** 2
    standard_error = 1.0 / np.sqrt(users * variance_log_rank)  # inverse Fisher information
    for position in (0, 5):
        column = truth.items[:, position]
        observed = np.bincount(column - 1, minlength=n)
        assert stats.chisquare(observed, users * p).pvalue > 1e-3
        assert abs(_zipf_mle(column, n) - exponent) < 4 * standard_error
    # and can fail: the wrong exponent is rejected
    assert abs(_zipf_mle(truth.items[:, 0], n) - (exponent + 0.1)) > 4 * standard_error


def test_windowed_marginals_and_timestamps() -> None:
    settings = SyntheticSettings.defaults(users=6000, items=15, seq_len=4, windows=3, drift=1.5, seed=3)
    truth = generate(settings)
    assert truth.log_p_windows.shape == (3, 15) and truth.pmi_windows.shape == (3, 15, 15)
    assert not np.allclose(truth.log_p_windows[0], truth.log_p_windows[2])
    for t in range(3):
        users = truth.window_of_user == t
        assert (truth.timestamps[users] >= t * WINDOW_SPAN).all()
        assert (truth.timestamps[users] < (t + 1) * WINDOW_SPAN).all()
        p_t = np.exp(truth.log_p_windows[t])
        np.testing.assert_allclose(p_t @ np.exp(truth.pmi_windows[t] + truth.log_p_windows[t]), p_t, atol=1e-10)
        observed = np.bincount(truth.items[users, -1] - 1, minlength=15)
        assert stats.chisquare(observed, users.sum() * p_t).pvalue > 1e-3
    assert (np.diff(truth.timestamps, axis=1) > 0).all()
    # pooled truth is the mixture of the windows
    weights = np.bincount(truth.window_of_user) / settings.users
    np.testing.assert_allclose(np.exp(truth.log_p), weights @ np.exp(truth.log_p_windows), rtol=1e-12)
    p = np.exp(truth.log_p)
    np.testing.assert_allclose((p[None, :] * np.exp(truth.pmi)).sum(axis=1), 1.0, atol=1e-10)


def test_same_seed_same_data_other_seed_other_data(tmp_path) -> None:
    settings = SyntheticSettings.defaults(users=50, items=12, seq_len=8, seed=5)
    first = write_atomic_files(generate(settings), tmp_path / "a")
    second = write_atomic_files(generate(settings), tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    other = generate(SyntheticSettings.defaults(users=50, items=12, seq_len=8, seed=6))
    assert not np.array_equal(other.items, generate(settings).items)
    header = first.read_text().splitlines()[0]
    assert header == "user_id:token\titem_id:token\ttimestamp:float"
    loaded = SyntheticTruth.load(tmp_path / "a" / "synthetic.truth.npz")
    np.testing.assert_array_equal(loaded.items, generate(settings).items)
    assert loaded.settings == settings


def test_bad_settings_raise_plugin_error() -> None:
    with pytest.raises(PopPriorError):
        SyntheticSettings.defaults(items=5, rank=9)
    with pytest.raises(PopPriorError):
        SyntheticSettings.from_config({"synthetic_users": "many"})


def _config(tmp_path, **overrides):
    from recbole.model.sequential_recommender import SASRec

    from recbole_popprior.config import Config

    config_dict = {
        "data_path": str(tmp_path),
        "synthetic_users": 80,
        "synthetic_items": 25,
        "synthetic_seq_len": 12,
        "show_progress": False,
        "state": "WARNING",
        **overrides,
    }
    return Config(model=SASRec, dataset="synthetic", config_dict=config_dict)


def test_files_load_through_recbole_and_align_with_truth(tmp_path) -> None:
    from recbole.data import create_dataset

    config = _config(tmp_path)
    path = ensure_synthetic_dataset(config)
    assert path == tmp_path / "synthetic" / "synthetic.inter"
    dataset = create_dataset(config)
    assert dataset.inter_num == 80 * 12
    truth = load_truth(config)
    assert dataset.item_num == np.unique(truth.items).size + 1  # padding + items that occur
    aligned = truth_in_recbole_ids(truth, dataset)
    raw = aligned["raw_of_internal"]
    # RecBole's internal ids, mapped back through the alignment, give the generated sequences
    users = np.asarray(dataset.inter_feat[dataset.uid_field])
    items = np.asarray(dataset.inter_feat[dataset.iid_field])
    times = np.asarray(dataset.inter_feat[dataset.time_field])
    raw_users = np.array([int(dataset.field2id_token[dataset.uid_field][u]) for u in users])
    order = np.lexsort((times, raw_users))
    np.testing.assert_array_equal(raw[items[order]].reshape(80, 12), truth.items)
    internal = items[order].reshape(80, 12)
    np.testing.assert_array_equal(aligned["log_p"][internal], truth.log_p[truth.items - 1])
    np.testing.assert_array_equal(
        aligned["pmi"][internal[:, :-1], internal[:, 1:]], truth.pmi[truth.items[:, :-1] - 1, truth.items[:, 1:] - 1]
    )
    assert np.isnan(aligned["log_p"][0]) and np.isnan(aligned["pmi"][0]).all()


def test_ensure_regenerates_only_when_settings_change(tmp_path) -> None:
    config = _config(tmp_path)
    path = ensure_synthetic_dataset(config)
    stamp = json.loads((path.parent / "synthetic.settings.json").read_text())
    before = path.stat().st_mtime_ns
    assert ensure_synthetic_dataset(config) == path
    assert path.stat().st_mtime_ns == before
    changed = _config(tmp_path, synthetic_seed=99)
    ensure_synthetic_dataset(changed)
    assert json.loads((path.parent / "synthetic.settings.json").read_text())["digest"] != stamp["digest"]
    assert load_truth(changed).settings.seed == 99


def test_planted_popularity_pmi_keeps_the_marginals_and_follows_the_planted_preference() -> None:
    """``pop_pmi = g``: S gains ``g z_c (log p - mean) / sd``; Sinkhorn keeps both marginals at p, and each
    context's PMI row leans on log p by its planted ``g z_c`` up to one constant (the Sinkhorn offsets
    ``a_c + b_i`` project on the centred direction as a constant over contexts)."""
    plain = generate(SyntheticSettings.defaults(users=20, items=40, seq_len=5))
    planted = generate(SyntheticSettings.defaults(users=20, items=40, seq_len=5, pop_pmi=0.5))
    p = np.exp(planted.log_p)
    np.testing.assert_allclose(p, np.exp(zipf_log_p(40, 1.0)))
    np.testing.assert_allclose((p[None, :] * np.exp(planted.pmi)).sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose((p[:, None] * np.exp(planted.pmi)).sum(axis=0), 1.0, atol=1e-10)
    lc = zipf_log_p(40, 1.0) - zipf_log_p(40, 1.0).mean()
    unit = lc / lc.std()
    z = np.random.default_rng([SyntheticSettings.defaults().seed, 1]).standard_normal(40)  # the documented draw
    lean = (planted.pmi - plain.pmi) @ unit / (unit @ unit)  # per context: the slope the planting added
    assert np.corrcoef(lean, z)[0, 1] > 0.99
    np.testing.assert_allclose(lean - lean.mean(), 0.5 * (z - z.mean()), atol=1e-8)  # PMI = S + a_c + b_i exactly
    assert not np.array_equal(plain.items, planted.items)
