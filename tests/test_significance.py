"""The permutation tests' calibration and power (DESIGN.md §3.1), by simulation on factorised toys,
and the seed-level uncertainty helpers (recbole_popprior/evaluator/uncertainty.py).

Toy models (``_toy``): every model of one problem shares the same "PMI" structure (``Et``,
``Ht``); a model carries the popularity component ``alpha * (P_n log p)`` on one axis whose
context loadings are ~1 (so it is mostly context-shared), plus its own independent noise in
both ``E`` and ``H``. "Standard" is alpha = 1, "separated" is alpha = 0.02.

Binomial bounds: a calibrated test has P(p < 0.05) <= 0.05 per run, so over K independent
runs the count of p < 0.05 is at most Binomial(K, 0.05); each bound below is exceeded by that
distribution with probability < 1e-3 (computed with scipy.stats.binom.sf, quoted in place).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator.energy import matched_reduction, popularity_energy
from recbole_popprior.evaluator.uncertainty import combined_p_value, mean_interval, paired_test


def _problem(rng, n_items, d, m):
    counts = rng.zipf(1.6, size=n_items).astype(np.float64)
    lp = np.log(counts / counts.sum())
    lp[0] = -np.inf
    c = lp[1:] - lp[1:].mean()
    return lp, c, rng.standard_normal((n_items - 1, d - 1)) * 0.7, rng.standard_normal((m, d - 1))


def _toy(rng, c, Et, Ht, alpha, noise=0.3):
    """One factorised model ``(H, E)`` carrying ``alpha * c`` (row 0 of E is padding)."""
    n1, k = Et.shape
    E = np.empty((n1 + 1, k + 1))
    E[1:, 0] = alpha * c
    E[1:, 1:] = Et + noise * rng.standard_normal((n1, k))
    E[0] = 50.0  # padding: must not matter
    H = np.empty((Ht.shape[0], k + 1))
    H[:, 0] = 1.0 + 0.3 * rng.standard_normal(Ht.shape[0])
    H[:, 1:] = Ht + noise * rng.standard_normal(Ht.shape)
    return H, E


def _dense_iso_p(std, sep, lp):
    """DESIGN §3.1's isotropic-null p of R_shared, from the dense centred score matrices."""
    c = lp[1:] - lp[1:].mean()
    l = c / np.linalg.norm(c)
    zbar = []
    for H, E in (std, sep):
        Z = H @ E[1:].T
        zbar.append((Z - Z.mean(axis=1, keepdims=True)).mean(axis=0))
    a = [z @ l for z in zbar]
    x, y = (z - (z @ l) * l for z in zbar)
    # t = (y.u)/(x.u) for u uniform on the sphere of V: Cauchy with these location and scale
    mu = (x @ y) / (x @ x)
    gamma = np.sqrt((x @ x) * (y @ y) - (x @ y) ** 2) / (x @ x)
    root = abs(a[1] / a[0])
    return (np.arctan((root - mu) / gamma) + np.arctan((root + mu) / gamma)) / np.pi, (x, y, root ** 2)


# --------------------------------------------------------------------------------------
# Matched reduction of two models
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 0.0], ids=["same-popularity", "no-popularity"])
def test_matched_reduction_is_calibrated_on_null_pairs(alpha):
    # 40 null pairs: two models with the same popularity component (or none), independent
    # noise, no intervention. Under Binomial(40, 0.05), P(count >= 8) = 7.1e-4, so "<= 7"
    # fails a calibrated test rarely; an anti-conservative one (e.g. a null that ignores the
    # noise along l, like a difference of shares) exceeds it.
    B, counts, p_iso = 199, {"dir": 0, "shared": 0}, []
    for run in range(40):
        rng = np.random.default_rng(100 + run)
        lp, c, Et, Ht = _problem(rng, n_items=300, d=8, m=60)
        a, b = _toy(rng, c, Et, Ht, alpha), _toy(rng, c, Et, Ht, alpha)
        got = matched_reduction(a, b, permutations=B, seed=run, log_prior=lp)
        for name in counts:
            counts[name] += got[f"p_value_{name}"] < 0.05
        p_iso.append(got["p_iso_shared"])
    assert counts["dir"] <= 7 and counts["shared"] <= 7, counts
    assert np.sum(np.array(p_iso) < 0.05) <= 7


def test_planted_reduction_reaches_the_floors():
    # alpha 1 (standard) vs 0.02 (separated): R_shared ~ 1 - 0.02^2. p_dir must be the smallest
    # value a permutation test can give; p_shared is limited by the one-number-per-direction
    # statistic (DESIGN §3.1): it must sit at or below the isotropic-null value computed
    # densely here, up to the Monte Carlo error of B draws, and below what raw (not
    # orthogonalised) label permutations reach on the same toy (p ~ 0.1-0.4).
    B = 1999
    for run in range(4):
        rng = np.random.default_rng(200 + run)
        lp, c, Et, Ht = _problem(rng, n_items=500, d=9, m=100)
        std, sep = _toy(rng, c, Et, Ht, 1.0), _toy(rng, c, Et, Ht, 0.02)
        got = matched_reduction(std, sep, permutations=B, seed=run, log_prior=lp)
        assert got["R_shared"] > 0.99 and got["R_dir"] > 0.99
        assert got["p_value_dir"] == pytest.approx(1 / (B + 1))
        p_iso, (x, y, rho) = _dense_iso_p(std, sep, lp)
        assert got["p_iso_shared"] == pytest.approx(p_iso, rel=1e-6)
        assert got["p_value_shared"] <= p_iso + 4 * math.sqrt(p_iso / B) + 1 / (B + 1), (got, p_iso)
        # the reference itself against the small-rho form of the floor stated in DESIGN §3.1,
        # (2/pi) sqrt(kappa rho (1 - r^2)): this pins the documented bound, not the code
        kappa, r2 = (x @ x) / (y @ y), (x @ y) ** 2 / ((x @ x) * (y @ y))
        assert p_iso == pytest.approx(2 / np.pi * np.sqrt(kappa * rho * (1 - r2)), rel=0.05)
        assert got["p_value_shared"] < 0.05


def test_global_rescaling_is_not_a_popularity_specific_reduction():
    # sep = 0.3 * std shrinks every direction alike: R = 0.91 along l and along every null
    # direction, so every draw ties with the observed R and both p-values are 1.
    rng = np.random.default_rng(3)
    lp, c, Et, Ht = _problem(rng, n_items=200, d=6, m=40)
    H, E = _toy(rng, c, Et, Ht, 1.0)
    E_sep = E * 0.3
    got = matched_reduction((H, E), (H, E_sep), permutations=99, seed=0, log_prior=lp)
    assert got["R_dir"] == pytest.approx(0.91) and got["R_shared"] == pytest.approx(0.91)
    assert got["p_value_dir"] == 1.0 and got["p_value_shared"] == 1.0 and got["p_iso_shared"] == 1.0


# --------------------------------------------------------------------------------------
# Single-model test of the shared fraction
# --------------------------------------------------------------------------------------
def test_single_model_shared_test_detects_a_planted_component():
    B = 499
    for run in range(3):
        rng = np.random.default_rng(300 + run)
        lp, c, Et, Ht = _problem(rng, n_items=400, d=8, m=60)
        got = popularity_energy(*_toy(rng, c, Et, Ht, 1.0), lp, permutations=B, seed=run)
        assert got["p_value_shared"] == pytest.approx(1 / (B + 1))
        assert got["null_q95_shared"] < got["shared_total_frac"]


def test_single_model_shared_test_is_calibrated_without_a_component():
    # No popularity axis (alpha = 0): the item table is independent of the prior's labels, so
    # the raw label permutation test is exact and p is uniform on {1/(B+1), ..., 1}.
    # Binomial(50, 0.05): P(count >= 9) = 7.6e-4. The mean of 50 uniform p's has sd ~0.041.
    B, pvals = 99, []
    for run in range(50):
        rng = np.random.default_rng(400 + run)
        lp, c, Et, Ht = _problem(rng, n_items=200, d=6, m=40)
        pvals.append(popularity_energy(*_toy(rng, c, Et, Ht, 0.0), lp, permutations=B, seed=run)["p_value_shared"])
    pvals = np.array(pvals)
    assert np.sum(pvals < 0.05) <= 8
    assert 0.35 < pvals.mean() < 0.65


# --------------------------------------------------------------------------------------
# Seed-level uncertainty
# --------------------------------------------------------------------------------------
def test_mean_interval_covers_the_known_mean_at_the_nominal_rate():
    # 400 draws of 5 seeds from N(2, 0.5^2): the 95% t-interval covers 2 in Binomial(400, 0.95)
    # of them; P(count <= 364) = 5.7e-4 and P(count >= 393) = 6.2e-4. A normal-quantile
    # interval (1.96 instead of t_{0.975,4} = 2.78) covers ~88% and fails the lower bound.
    rng = np.random.default_rng(5)
    covered = 0
    for _ in range(400):
        iv = mean_interval(rng.normal(2.0, 0.5, size=5))
        covered += iv.low <= 2.0 <= iv.high
    assert 365 <= covered <= 392, covered


def test_mean_interval_closed_form_and_single_seed():
    # n = 2: t with 1 dof is the Cauchy, whose 0.975 quantile is tan(0.475 pi).
    iv = mean_interval([0.0, 2.0])
    assert (iv.mean, iv.sd, iv.n, iv.defined) == (1.0, pytest.approx(math.sqrt(2)), 2, True)
    assert iv.half_width == pytest.approx(math.tan(0.475 * math.pi) * math.sqrt(2) / math.sqrt(2))
    assert (iv.low, iv.high) == (pytest.approx(1 - iv.half_width), pytest.approx(1 + iv.half_width))
    one = mean_interval([0.37])
    assert one.mean == 0.37 and one.n == 1 and one.defined is False
    assert all(math.isnan(v) for v in (one.sd, one.half_width, one.low, one.high))
    assert one.as_dict()["defined"] is False
    for bad in ([], [1.0, math.nan], [1.0, math.inf]):
        with pytest.raises(PopPriorError):
            mean_interval(bad)
    with pytest.raises(PopPriorError):
        mean_interval([1.0, 2.0], confidence=1.0)


def test_paired_test_is_calibrated_powerful_and_its_interval_covers_the_true_difference():
    # Seed effects shared by both arms (sd 1) dwarf the per-seed arm noise (sd 0.1): only a
    # paired test sees a 0.3 shift with 6 seeds. Under no shift, Binomial(300, 0.05):
    # P(count >= 29) = 6.1e-4. The interval covers the true difference in Binomial(300, 0.95):
    # P(count <= 271) = 6.1e-4. Power against the shift is the noncentral t's (df 5,
    # ncp = 0.3 / (0.1 sqrt(2) / sqrt(6))), ~0.98; the count may fall short of it by the
    # binomial's 1e-3 quantile.
    rng = np.random.default_rng(6)
    false_pos = covered = power = 0
    for _ in range(300):
        seed_effect = rng.normal(0.0, 1.0, size=6)
        a = seed_effect + rng.normal(0.0, 0.1, size=6)
        b = seed_effect + rng.normal(0.0, 0.1, size=6)
        false_pos += paired_test(a, b).p_value < 0.05
        shifted = paired_test(a + 0.3, b)
        covered += shifted.low <= 0.3 <= shifted.high
        power += shifted.p_value < 0.05
    ncp, t_crit = 0.3 / (0.1 * math.sqrt(2) / math.sqrt(6)), stats.t.ppf(0.975, 5)
    expected_power = stats.nct.sf(t_crit, 5, ncp) + stats.nct.cdf(-t_crit, 5, ncp)
    assert false_pos <= 28 and covered >= 272, (false_pos, covered)
    assert power >= stats.binom.ppf(1e-3, 300, expected_power), (power, expected_power)


def test_paired_test_closed_forms_and_edge_cases():
    a, b = np.array([1.0, 2.0, 4.0]), np.array([0.5, 1.0, 2.0])
    d = a - b
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    got = paired_test(a, b)
    assert got.statistic == pytest.approx(t) and got.n == 3 and got.defined
    # t with 2 dof has the closed-form two-sided tail 1 - |t| / sqrt(2 + t^2)
    assert got.p_value == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t))
    assert paired_test(a, b, alternative="greater").p_value == pytest.approx(got.p_value / 2)
    same = paired_test([1.0, 2.0], [1.0, 2.0])
    assert same.p_value == 1.0 and same.half_width == 0.0
    shift = paired_test([1.5, 2.5], [1.0, 2.0])
    assert shift.p_value == 0.0 and shift.mean_diff == 0.5 and shift.low == shift.high == 0.5
    assert paired_test([1.5, 2.5], [1.0, 2.0], alternative="less").p_value == 1.0
    single = paired_test([1.0], [0.5])
    assert single.defined is False and math.isnan(single.p_value) and single.mean_diff == 0.5
    with pytest.raises(PopPriorError):
        paired_test([1.0, 2.0], [1.0])
    with pytest.raises(PopPriorError):
        paired_test([1.0, 2.0], [1.0, 3.0], alternative="bigger")


def test_combined_p_value_matches_fisher_closed_form_and_is_calibrated():
    # K = 2: -2 log(p1 p2) ~ chi^2_4, whose tail gives p = q (1 - log q) with q = p1 p2.
    q = 0.03 * 0.2
    assert combined_p_value([0.03, 0.2]) == pytest.approx(q * (1 - math.log(q)))
    assert combined_p_value([0.4]) == 0.4
    rng = np.random.default_rng(7)  # uniform inputs: Binomial(400, 0.05), P(count >= 36) = 5.7e-4
    assert sum(combined_p_value(rng.uniform(size=3)) < 0.05 for _ in range(400)) <= 35
    with pytest.raises(PopPriorError):
        combined_p_value([0.0, 0.5])
