"""Popularity-aligned score energy (DESIGN.md §3) against a dense numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator import (ContextStats, ScoreStats, energy_from_stats, matched_reduction,
                                        permuted_directions, popularity_energy)
from recbole_popprior.evaluator.energy import popularity_direction, reduction_null

RTOL = 1e-6


def _log_prior(rng, n_items, scale=1.0):
    counts = rng.zipf(1.6, size=n_items).astype(np.float64) * scale
    lp = np.log(counts / counts.sum())
    lp[0] = -np.inf
    return lp


def _problem(rng, m, n_items, d, planted=0.0):
    """Contexts H, items E (row 0 padding) and a prior; ``planted`` adds a popularity axis to E."""
    lp = _log_prior(rng, n_items)
    H = rng.standard_normal((m, d)) + 0.3
    E = rng.standard_normal((n_items, d)) * 0.5
    if planted:
        centred = lp[1:] - lp[1:].mean()
        E[1:, 0] += planted * centred / np.linalg.norm(centred) * np.sqrt(n_items)
        H[:, 0] += 2.0  # every context leans on the popularity axis: a shared component
    E[0] = 100.0  # padding row must not matter
    return H, E, lp


def _dense(H, E, lp, windows=None, threshold=0.95, directions=None):
    """Reference: build Zc = (H E[1:]^T) P_n and apply DESIGN §3 literally."""
    Z = H @ E[1:].T
    n = Z.shape[1]
    P = np.eye(n) - np.ones((n, n)) / n if n <= 2000 else None
    Zc = Z @ P if P is not None else Z - Z.mean(axis=1, keepdims=True)
    c = lp[1:] - lp[1:].mean()
    l = c / np.linalg.norm(c)
    T = np.sum(Zc**2)
    s = Zc @ l
    E_dir = s @ s
    E_sh = len(s) * s.mean() ** 2
    E_sp = np.sum((s - s.mean()) ** 2)
    out = {"total": T, "dir": E_dir, "shared": E_sh, "specific": E_sp,
           "dir_frac": E_dir / T, "shared_frac": E_sh / E_dir, "shared_total_frac": E_sh / T}
    if directions is not None:
        for suffix, stat, obs in (("", lambda sb: sb @ sb, E_dir), ("_shared", lambda sb: len(sb) * sb.mean() ** 2, E_sh)):
            null = np.array([stat(Zc @ lb) / T for lb in directions])
            out[f"p_value{suffix}"] = (1 + np.sum(null >= obs / T)) / (len(null) + 1)
            out[f"null_mean{suffix}"] = null.mean()
            out[f"null_q95{suffix}"] = np.quantile(null, 0.95)
    if windows is not None:
        F = windows[:, 1:] - windows[:, 1:].mean(axis=1, keepdims=True)
        _, S, Vt = np.linalg.svd(F, full_matrices=False)
        cum = np.cumsum(S**2) / np.sum(S**2)
        r = int(np.argmax(cum >= threshold)) + 1
        frac = {k: np.sum((Zc @ Vt[: min(k, len(S))].T) ** 2) / T for k in (1, 2, 3, r)}
        out.update({f"subspace_frac@{k}": frac[k] for k in (1, 2, 3)})
        out["subspace_rank"] = r
        out["subspace_frac"] = frac[r]
    return out


def _all_directions(lp, B, seed):
    return np.concatenate(list(permuted_directions(popularity_direction(lp), B, seed)))


@pytest.mark.parametrize("d", [8, 64])
def test_energies_match_dense_reference_large_catalogue(d):
    rng = np.random.default_rng(d)
    H, E, lp = _problem(rng, m=150, n_items=12_001, d=d, planted=0.5)
    windows = np.stack([_log_prior(rng, 12_001) for _ in range(4)])
    got = popularity_energy(H, E, lp, permutations=16, seed=3, windows_log_prior=windows)
    ref = _dense(H, E, lp, windows, directions=_all_directions(lp, 16, 3))
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=RTOL), key
    assert got["m"] == 150 and got["n"] == 12_000


def test_centring_over_items_only_with_explicit_projection():
    rng = np.random.default_rng(0)
    H, E, lp = _problem(rng, m=40, n_items=301, d=8, planted=1.0)
    got = popularity_energy(H, E, lp)
    ref = _dense(H, E, lp)  # n <= 2000: the reference multiplies by the explicit P_n
    for key in ("total", "dir", "shared", "specific"):
        assert got[key] == pytest.approx(ref[key], rel=RTOL)
    # Centring over contexts too would remove the shared part: make sure we did not.
    assert got["shared"] > 0.1 * got["dir"]


def test_permuted_directions_are_centred_unit_permutations_and_chunk_free():
    rng = np.random.default_rng(1)
    lp = _log_prior(rng, 500)
    l = popularity_direction(lp)
    a = np.concatenate(list(permuted_directions(l, 10, seed=9, chunk_size=3)))
    b = np.concatenate(list(permuted_directions(l, 10, seed=9, chunk_size=10)))
    np.testing.assert_array_equal(a, b)
    for row in a:
        np.testing.assert_array_equal(np.sort(row), np.sort(l))
    assert not np.array_equal(a[0], a[1])
    c = np.concatenate(list(permuted_directions(l, 10, seed=10)))
    assert not np.array_equal(a, c)


def test_orthogonal_directions_are_the_same_draws_without_l():
    rng = np.random.default_rng(12)
    l = popularity_direction(_log_prior(rng, 300))
    raw = np.concatenate(list(permuted_directions(l, 12, seed=5)))
    orth = np.concatenate(list(permuted_directions(l, 12, seed=5, chunk_size=5, orthogonal=True)))
    for r, o in zip(raw, orth):  # Gram-Schmidt of each raw draw against l, written out
        v = r - (r @ l) * l
        np.testing.assert_allclose(o, v / np.linalg.norm(v), rtol=1e-12, atol=1e-15)
    assert np.abs(orth @ l).max() < 1e-12 and np.abs(orth.sum(axis=1)).max() < 1e-12


def test_orthogonal_draw_equal_to_l_is_kept_as_a_tie():
    # 3 real items, two with equal counts: 2 of the 6 permutations reproduce l exactly; they
    # have no part orthogonal to l and must come back as l itself, not as NaN.
    lp = np.log(np.array([1.0, 1.0, 1.0, 4.0]) / 6.0)
    lp[0] = -np.inf
    l = popularity_direction(lp)
    orth = np.concatenate(list(permuted_directions(l, 60, seed=0, orthogonal=True)))
    assert np.all(np.isfinite(orth))
    is_l = np.all(np.abs(orth - l) < 1e-12, axis=1)
    assert 0 < is_l.sum() < 60
    assert np.abs(orth[~is_l] @ l).max() < 1e-12


def test_decomposition_and_fraction_ranges():
    rng = np.random.default_rng(2)
    for trial in range(5):
        H, E, lp = _problem(rng, m=30 + trial, n_items=200, d=8, planted=trial * 0.3)
        windows = np.stack([_log_prior(rng, 200) for _ in range(3)])
        got = popularity_energy(H, E, lp, windows_log_prior=windows)
        assert got["dir"] == pytest.approx(got["shared"] + got["specific"], rel=1e-12)
        assert got["specific"] >= -1e-9 * got["dir"]
        for key in ("dir_frac", "shared_frac", "subspace_frac", "subspace_frac@1", "subspace_frac@3"):
            assert 0.0 <= got[key] <= 1.0 + 1e-12, key
        assert got["subspace_frac@1"] <= got["subspace_frac@2"] + 1e-12


def test_planted_popularity_direction_is_maximally_significant():
    rng = np.random.default_rng(3)
    H, E, lp = _problem(rng, m=100, n_items=2_000, d=16, planted=3.0)
    B = 200
    got = popularity_energy(H, E, lp, permutations=B, seed=0)
    assert got["p_value"] == pytest.approx(1 / (B + 1))
    assert got["null_q95"] < got["dir_frac"]


def test_unrelated_prior_gives_roughly_uniform_p_values():
    # Under H0 (E independent of log_prior) p is uniform on {1/(B+1), ..., 1}, so
    # P(p <= 0.05) <= 0.05. With 40 independent runs the count below 0.05 is
    # Binomial(40, 0.05): P(count >= 6) = 0.014, so "< 6 of 40" (i.e. < 15%) fails
    # a correct implementation rarely, while a biased test (p always small) fails it.
    rng = np.random.default_rng(4)
    pvals = []
    for run in range(40):
        H, E, lp = _problem(rng, m=20, n_items=400, d=8)
        pvals.append(popularity_energy(H, E, lp, permutations=99, seed=run)["p_value"])
    pvals = np.array(pvals)
    assert np.sum(pvals < 0.05) < 6
    # And not degenerate the other way: the mean of a uniform p is ~0.5 (sd of the mean ~0.046).
    assert 0.3 < pvals.mean() < 0.7


def test_streaming_path_agrees_with_factorised_path():
    rng = np.random.default_rng(5)
    H, E, lp = _problem(rng, m=90, n_items=3_001, d=8)
    windows = np.stack([_log_prior(rng, 3_001) for _ in range(3)])
    kwargs = dict(permutations=64, seed=11, windows_log_prior=windows)
    fact = popularity_energy(H, E, lp, **kwargs)
    Z = H @ E.T
    Z[:, 0] = -np.inf  # padding column: ignored
    stream = ScoreStats(lp, buffer_bytes=50_000, **kwargs)  # forces several flushes
    for start in range(0, 90, 17):
        stream.update(torch.from_numpy(Z[start:start + 17]))
    got = stream.result()
    assert set(got) == set(fact)
    for key, value in fact.items():
        if key in ("p_value", "p_value_shared", "subspace_rank", "m", "n", "permutations"):
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, rel=RTOL), key
    # non-trivial p-values, so the equalities above say something
    assert 1 / 65 < fact["p_value"] < 1 and 1 / 65 < fact["p_value_shared"] < 1


def test_context_stats_merge_equals_one_pass():
    rng = np.random.default_rng(6)
    H = rng.standard_normal((50, 8))
    parts = ContextStats.from_H(H[:20]).merge(ContextStats.from_H(H[20:]))
    whole = ContextStats.from_H(H)
    np.testing.assert_allclose(parts.G, whole.G, rtol=1e-12)
    np.testing.assert_allclose(parts.hsum, whole.hsum, rtol=1e-12)
    assert parts.m == whole.m == 50
    assert parts.G.dtype == np.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_and_numpy_inputs_agree(dtype):
    rng = np.random.default_rng(7)
    H, E, lp = _problem(rng, m=40, n_items=500, d=8, planted=0.3)
    H, E = H.astype(np.float32), E.astype(np.float32)  # the same values in every dtype
    ref = popularity_energy(H, E, lp, permutations=20, seed=1)
    got = popularity_energy(torch.from_numpy(H).to(dtype), torch.from_numpy(E).to(dtype),
                            torch.from_numpy(lp).to(dtype), permutations=20, seed=1)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=RTOL if dtype == torch.float64 else 1e-5), key


def test_matched_reduction_applies_each_orthogonalised_direction_to_both_models():
    # The statistic changed deliberately (DESIGN §3.1): every label-permuted l_b has l's own
    # component removed before it is applied to both models; the reference does that densely.
    rng = np.random.default_rng(8)
    H, E_std, lp = _problem(rng, m=60, n_items=1_000, d=8, planted=2.0)
    E_sep = E_std.copy()
    c = lp[1:] - lp[1:].mean()
    l = c / np.linalg.norm(c)
    E_sep[1:, 0] -= 0.8 * 2.0 * l * np.sqrt(1_000)  # remove 80% of the planted axis
    E_sep[1:] += 0.3 * rng.standard_normal((999, 8))  # and differ elsewhere: a non-trivial null
    B, seed = 100, 4
    got = matched_reduction((H, E_std), (H, E_sep), permutations=B, seed=seed, log_prior=lp)
    std, sep = _dense(H, E_std, lp), _dense(H, E_sep, lp)
    assert got["R_dir"] == pytest.approx(1 - sep["dir"] / std["dir"], rel=RTOL)
    assert got["R_shared"] == pytest.approx(1 - sep["shared"] / std["shared"], rel=RTOL)
    assert got["R_shared"] > 0.9  # 1 - 0.2^2 plus noise
    Zs, Zp = H @ E_std[1:].T, H @ E_sep[1:].T
    Zs, Zp = Zs - Zs.mean(1, keepdims=True), Zp - Zp.mean(1, keepdims=True)
    null = []
    for lb in _all_directions(lp, B, seed):
        u = lb - (lb @ l) * l
        u /= np.linalg.norm(u)
        ss, sp = Zs @ u, Zp @ u
        null.append((1 - (sp @ sp) / (ss @ ss), 1 - sp.mean() ** 2 / ss.mean() ** 2))
    null = np.array(null)
    for j, name in enumerate(("dir", "shared")):
        R_obs = got[f"R_{name}"]
        assert got[f"p_value_{name}"] == pytest.approx((1 + np.sum(null[:, j] >= R_obs)) / (B + 1))
        assert got[f"null_mean_{name}"] == pytest.approx(null[:, j].mean(), rel=RTOL)
        assert got[f"null_q95_{name}"] == pytest.approx(np.quantile(null[:, j], 0.95), rel=RTOL)
    assert got["p_value_dir"] == pytest.approx(1 / (B + 1))
    assert 2 / (B + 1) < got["p_value_shared"] < 0.5  # the equality above compares a non-trivial count
    nulls = reduction_null((H, E_std), (H, E_sep), log_prior=lp, permutations=B, seed=seed)
    np.testing.assert_allclose(np.c_[nulls["dir"], nulls["shared"]], null, rtol=RTOL)


def test_bad_inputs_raise_popprior_error():
    rng = np.random.default_rng(9)
    H, E, lp = _problem(rng, m=5, n_items=50, d=4)
    with pytest.raises(PopPriorError):
        popularity_energy(H, E[:-1], lp)
    with pytest.raises(PopPriorError):
        popularity_energy(H[:, :3], E, lp)
    flat = np.zeros(50)
    flat[0] = -np.inf
    with pytest.raises(PopPriorError):
        popularity_energy(H, E, flat)
    with pytest.raises(PopPriorError):
        energy_from_stats(ContextStats(), E, lp)
    bad = lp.copy()
    bad[3] = np.nan
    with pytest.raises(PopPriorError):
        popularity_energy(H, E, bad)


def test_non_finite_item_table_raises():
    rng = np.random.default_rng(10)
    H, E, lp = _problem(rng, m=5, n_items=50, d=4)
    for bad in (np.inf, np.nan):
        E2 = E.copy()
        E2[7, 2] = bad
        with pytest.raises(PopPriorError, match="non-finite"):
            popularity_energy(H, E2, lp)


def test_large_mean_item_table_keeps_precision():
    # A large common offset in E (|mean| >> spread) must not cancel away the centred energy.
    rng = np.random.default_rng(11)
    H, E, lp = _problem(rng, m=30, n_items=3_000, d=8, planted=0.5)
    E[1:] += 1e4
    got = popularity_energy(H, E, lp)
    ref = _dense(H, E, lp)
    for key in ("total", "dir", "shared"):
        assert got[key] == pytest.approx(ref[key], rel=1e-6), key


def test_row_0_is_padding_and_a_wrong_length_prior_is_blamed_on_log_prior():
    """30 rows of E are 29 items: row 0 and entry 0 are RecBole's padding item, never counted
    (a dense reference over rows 1..29 gives the same energy whatever row 0 holds)."""
    rng = np.random.default_rng(11)
    H, E, lp = _problem(rng, m=40, n_items=30, d=4)
    out = popularity_energy(H, E, lp)
    assert out["n"] == 29 and out["m"] == 40
    E_other = E.copy()
    E_other[0] = 1e3  # whatever the padding row holds
    lp_other = lp.copy()
    lp_other[0] = 5.0
    assert popularity_energy(H, E_other, lp_other)["dir"] == pytest.approx(out["dir"], rel=1e-12)
    Zc = H @ E[1:].T
    Zc = Zc - Zc.mean(axis=1, keepdims=True)
    l = lp[1:] - lp[1:].mean()
    assert out["dir"] == pytest.approx(float(np.sum((Zc @ (l / np.linalg.norm(l))) ** 2)), rel=1e-9)
    for short in (lp[:-1], np.append(lp, -3.0)):
        with pytest.raises(PopPriorError, match=r"^log_prior has \d+ entries but E has 30 rows"):
            popularity_energy(H, E, short)
        with pytest.raises(PopPriorError, match=r"^log_prior has \d+ entries but E has 30 rows"):
            matched_reduction((H, E), (H, E), log_prior=short, permutations=0)
