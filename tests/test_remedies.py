"""The other remedies' core computations (DESIGN.md §7), each against an independent numpy
reimplementation of the published formula on small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recbole_popprior.errors import PopPriorError
from recbole_popprior.remedies import (AdapTauStats, ace_init_table, ace_load_table, ace_reshape,
                                       adap_tau_active_users, adap_tau_batch_stats, adap_tau_global_temperature,
                                       adap_tau_loss, adap_tau_t0, adap_tau_temperatures, adap_tau_user_mean_loss,
                                       directspec_filter, directspec_logits, directspec_loss, resn_penalty)

# ----------------------------------------------------------------------------- helpers


def _anisotropic(rng, m, d, shift=2.0):
    """Rows sharing a strong common direction plus unequal per-axis noise (an anisotropic batch)."""
    return rng.standard_normal((m, d)) * np.linspace(0.2, 1.0, d) + rng.standard_normal(d) * shift


def _unit_rows(X):
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def _erank(s):
    p = s**2 / np.sum(s**2)
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def _np_directspec_plus(X, alpha, tau, shrink):
    """DirectSpec+ row by row: x'_i = x^_i - alpha sum_j softmax_j(tau x^_i.x^_j) x^_j, then the shrink."""
    Xn = _unit_rows(X)
    out = np.empty_like(Xn)
    for i in range(len(Xn)):
        w = np.exp(tau * (Xn @ Xn[i]))
        out[i] = Xn[i] - alpha * (w / w.sum()) @ Xn
    if shrink:
        out = out * (np.linalg.norm(out, axis=1, keepdims=True) * shrink)
    return out


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------- DirectSpec


def test_directspec_plain_filter_shrinks_large_singular_values_most():
    """Plain DirectSpec keeps the singular vectors of X^ and maps s -> s (1 - alpha s^2 / m)."""
    rng = np.random.default_rng(0)
    X = _anisotropic(rng, 40, 8)
    alpha = 0.3
    Xn = _unit_rows(X)
    U, s, Vt = np.linalg.svd(Xn, full_matrices=False)
    expected_s = s * (1 - alpha * s**2 / len(X))
    out = directspec_filter(torch.tensor(X), alpha, plus=False).numpy()
    np.testing.assert_allclose(out, (U * expected_s) @ Vt, atol=1e-10)
    got = np.sort(np.linalg.svd(out, compute_uv=False))[::-1]
    np.testing.assert_allclose(got, np.sort(np.abs(expected_s))[::-1], atol=1e-10)
    # the filter's own spectrum: the relative shrink got/s grows from the largest singular value
    # down, so the largest shrinks most (alpha s_1^2 / m < 1/3 keeps the order of the values)
    assert alpha * s[0] ** 2 / len(X) < 1 / 3
    ratio = got / s
    assert np.all(np.diff(ratio) >= -1e-12) and ratio[0] < ratio[-1] < 1


def test_directspec_plus_matches_row_by_row_reference():
    rng = np.random.default_rng(1)
    X = _anisotropic(rng, 24, 6)
    for alpha, tau, shrink in [(1.0, 3.0, 0.03), (0.8, 3.0, 0.0), (0.7, 4.0, 0.02)]:
        got = directspec_filter(torch.tensor(X), alpha, tau, shrink).numpy()
        np.testing.assert_allclose(got, _np_directspec_plus(X, alpha, tau, shrink), rtol=1e-10, atol=1e-12)


def test_directspec_plus_balances_an_anisotropic_spectrum():
    """README settings (alpha, tau) of the three datasets: the top singular value shrinks most, the
    condition number falls and the effective rank rises."""
    rng = np.random.default_rng(2)
    X = _anisotropic(rng, 64, 16)
    s = np.linalg.svd(_unit_rows(X), compute_uv=False)
    for alpha, tau in [(0.8, 3.0), (1.0, 3.0), (0.7, 4.0)]:
        s_out = np.linalg.svd(directspec_filter(torch.tensor(X), alpha, tau).numpy(), compute_uv=False)
        ratio = s_out / s
        assert ratio[0] < np.median(ratio)
        assert s_out[0] / s_out[-1] < s[0] / s[-1]
        assert _erank(s_out) > _erank(s) + 2.0


def test_directspec_plus_small_tau_limit_is_mean_removal():
    """tau -> 0 makes the softmax uniform: with alpha = 1 the filter removes the batch mean of X^."""
    rng = np.random.default_rng(3)
    X = _anisotropic(rng, 20, 5)
    Xn = _unit_rows(X)
    got = directspec_filter(torch.tensor(X), 1.0, 1e-12).numpy()
    np.testing.assert_allclose(got, Xn - Xn.mean(axis=0), atol=1e-10)


def test_directspec_filter_is_rotation_and_permutation_equivariant():
    rng = np.random.default_rng(4)
    X = torch.tensor(_anisotropic(rng, 16, 6))
    R, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    R = torch.tensor(R)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    for plus in (True, False):
        f = lambda A: directspec_filter(A, 0.9, 3.0, 0.03, plus)  # noqa: E731
        torch.testing.assert_close(f(X @ R), f(X) @ R)
        torch.testing.assert_close(f(X[perm]), f(X)[perm])


def test_directspec_loss_against_reference_and_gradient():
    rng = np.random.default_rng(5)
    n_items, d = 12, 5
    H = rng.standard_normal((8, d))
    E = rng.standard_normal((n_items, d))
    pos = np.array([1, 3, 3, 5, 1, 7, 11, 2])  # repeats, as sampled with replacement
    expected = -np.mean(np.log(_sigmoid(np.sum(_np_directspec_plus(H, 1.0, 3.0, 0.03)
                                               * _np_directspec_plus(E[pos], 1.0, 3.0, 0.03), axis=1))))
    Ht = torch.tensor(H, requires_grad=True)
    Et = torch.tensor(E, requires_grad=True)
    loss = directspec_loss(Ht, Et, torch.tensor(pos), 1.0, 3.0, 0.03)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert torch.isfinite(Ht.grad).all() and torch.isfinite(Et.grad).all()
    assert Et.grad[[0, 4, 6, 8, 9, 10]].abs().max() == 0  # items not in the batch get no gradient


def test_directspec_logits_filters_the_whole_item_table():
    rng = np.random.default_rng(6)
    H = rng.standard_normal((5, 4))
    E = rng.standard_normal((30, 4))
    E[0] = 100.0  # padding must not take part in the filter
    expected = _np_directspec_plus(H, 0.8, 3.0, 0.0) @ _np_directspec_plus(E[1:], 0.8, 3.0, 0.0).T
    for chunk in (7, 4096):
        got = directspec_logits(torch.tensor(H), torch.tensor(E), 0.8, 3.0, 0.0, chunk_size=chunk).numpy()
        assert np.all(got[:, 0] == -np.inf)
        np.testing.assert_allclose(got[:, 1:], expected, rtol=1e-10, atol=1e-12)
    plain = directspec_logits(torch.tensor(H), torch.tensor(E), 0.3, plus=False, chunk_size=7).numpy()
    En = _unit_rows(E[1:])
    e_plain = En - 0.3 / len(En) * En @ En.T @ En
    h_plain = _unit_rows(H) - 0.3 / len(H) * _unit_rows(H) @ _unit_rows(H).T @ _unit_rows(H)
    np.testing.assert_allclose(plain[:, 1:], h_plain @ e_plain.T, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- Adap-tau


def test_adap_tau_t0_is_the_released_quadratic_root():
    """The released code solves a w^2 + 2 b w + c = 0 for the inverse temperature w with a = 1e-10,
    b = -(mean_pos - mean_all), c = 2 (log 0.5 + log(|U| n) - log |Y|); t0 = 1 / w."""
    for gap, n_users, n_pos, n_items in [(0.7, 500, 6000, 1000), (0.35, 80, 80, 300), (1.1, 9, 40, 50)]:
        a, b = 1e-10, -gap
        c = 2 * (np.log(0.5) + np.log(n_users * n_items) - np.log(n_pos))
        w_limit = c / (-2 * b)  # the epoch >= warm-up branch of the released code
        w_root = (-b - np.sqrt(np.clip(b**2 - a * c, 0, 100000))) / a  # the warm-up branch
        assert adap_tau_t0(gap, n_users, n_pos, n_items) == pytest.approx(1 / w_limit, rel=1e-12)
        assert adap_tau_t0(gap, n_users, n_pos, n_items) == pytest.approx(1 / w_root, rel=1e-4)


def test_adap_tau_global_temperature_from_streamed_batches():
    rng = np.random.default_rng(7)
    n_items, d = 40, 6
    E = rng.standard_normal((n_items, d)) + 0.5
    E[0] = 50.0  # padding is not an item
    pos = rng.integers(1, n_items, size=30)
    H = E[pos] + rng.standard_normal((30, d))  # contexts lean towards their targets
    keep = rng.random(30) > 0.3
    # reference: dense cosine matrix over the kept pairs and every real item
    S = _unit_rows(H[keep]) @ _unit_rows(E[1:]).T
    pos_mean = np.mean(np.sum(_unit_rows(H[keep]) * _unit_rows(E[pos[keep]]), axis=1))
    gap = pos_mean - S.mean()
    assert gap > 0
    expected = gap / np.log((n_items - 1) / 2)
    Et = torch.tensor(E)
    stats = AdapTauStats.empty(d)
    for lo, hi in [(0, 11), (11, 30)]:
        stats = stats + adap_tau_batch_stats(torch.tensor(H[lo:hi]), Et, torch.tensor(pos[lo:hi]),
                                             torch.tensor(keep[lo:hi]))
    assert stats.n_pairs == keep.sum()
    assert adap_tau_global_temperature(stats, Et) == pytest.approx(expected, rel=1e-10)
    # warm-up, and a non-positive measured gap, use the released fixed gap 0.7
    warm = 0.7 / np.log((n_items - 1) / 2)
    assert adap_tau_global_temperature(stats, Et, warmup=True) == pytest.approx(warm, rel=1e-12)
    flipped = adap_tau_batch_stats(torch.tensor(H), torch.tensor(-E), torch.tensor(pos))
    bad = AdapTauStats(-abs(flipped.pos_cos_sum), flipped.ctx_dir_sum * 0, flipped.n_pairs)
    assert adap_tau_global_temperature(bad, Et) == pytest.approx(warm, rel=1e-12)


def test_adap_tau_active_users_use_the_quantile():
    counts = torch.tensor([1, 2, 2, 3, 5, 8, 13, 21, 1, 4])
    expected = counts.numpy() > np.quantile(counts.numpy(), 0.2)
    assert adap_tau_active_users(counts).numpy().tolist() == expected.tolist()


def _newton_lambert_w(x):
    """Principal-branch W by Newton's method on w e^w = x (independent of scipy)."""
    w = np.log1p(x) if x > -0.3 else -1.0 + np.sqrt(2 * (1 + np.e * x))
    for _ in range(200):
        f = w * np.exp(w) - x
        w -= f / (np.exp(w) * (w + 1) + 1e-300)
    return w


def test_adap_tau_temperatures_hand_computed_with_lambert_branch_and_clip():
    t0, rho = 0.12, 2.0
    loss = np.array([2.0, 2.5, 3.9, 0.4, np.nan, 2.6])
    seen = np.isfinite(loss)
    base = loss[seen].mean()
    got = adap_tau_temperatures(torch.tensor(loss), t0, rho).numpy()
    for u in range(len(loss)):
        if not seen[u]:
            assert got[u] == t0  # a user with no training row keeps the global temperature
            continue
        x = min(max((loss[u] - base) / rho, -1 / np.e), 1000.0)
        assert got[u] == pytest.approx(t0 * np.exp(_newton_lambert_w(x)), rel=1e-7)
        w = np.log(got[u] / t0)  # the defining identity of W: w e^w = x
        assert w * np.exp(w) == pytest.approx(x, rel=1e-9, abs=1e-12)
    assert -1 / np.e < (loss[0] - base) / rho < 0 and got[0] < t0  # the negative part of the branch
    assert (loss[3] - base) / rho < -1 / np.e and got[3] == pytest.approx(t0 / np.e, rel=1e-12)  # clip: W = -1
    assert got[2] > got[5] > got[1] > t0 > got[0] > got[3]  # temperature grows with the user's loss
    # the upper clip at 1000 (and the lower one) with a tiny rho
    both = adap_tau_temperatures(torch.tensor([0.0, 1.0]), t0, 1e-4).numpy()
    assert both[1] == pytest.approx(t0 * 1000 / _newton_lambert_w(1000.0), rel=1e-9)  # e^W(x) = x / W(x)
    assert both[0] == pytest.approx(t0 / np.e, rel=1e-12)
    # base as a quantile (the released weight_ratio mode)
    q = adap_tau_temperatures(torch.tensor(loss), t0, rho, base=0.9).numpy()
    ref = np.quantile(loss[seen], 0.9)
    x2 = np.clip((loss[2] - ref) / rho, -1 / np.e, 1000)
    assert q[2] == pytest.approx(t0 * np.exp(_newton_lambert_w(x2)), rel=1e-7)


def test_adap_tau_loss_against_reference_and_gradient():
    rng = np.random.default_rng(8)
    n_items, d, B = 15, 4, 6
    E = rng.standard_normal((n_items, d))
    E[0] = 30.0
    H = rng.standard_normal((B, d))
    pos = np.array([1, 4, 4, 9, 14, 2])
    t0, t_ctx = 0.2, np.array([0.2, 0.1, 0.3, 0.25, 0.15, 0.2])
    ref, ref_plain = np.empty(B), np.empty(B)
    for c in range(B):
        s = _unit_rows(E) @ (H[c] / np.linalg.norm(H[c]))
        negs = [j for j in range(1, n_items) if j != pos[c]]
        ref[c] = -s[pos[c]] / t0 + np.log(np.sum(np.exp(s[negs] / t_ctx[c])))
        ref_plain[c] = -s[pos[c]] + np.log(np.sum(np.exp(s[negs])))
    Ht = torch.tensor(H, requires_grad=True)
    loss, plain = adap_tau_loss(Ht, torch.tensor(E), torch.tensor(pos), t0, torch.tensor(t_ctx))
    np.testing.assert_allclose(loss.detach().numpy(), ref, rtol=1e-10)
    np.testing.assert_allclose(plain.numpy(), ref_plain, rtol=1e-10)
    loss.mean().backward()
    assert torch.isfinite(Ht.grad).all()
    # the per-user means that feed next epoch's temperatures
    users = torch.tensor([3, 0, 3, 2, 0, 3])
    means = adap_tau_user_mean_loss(users, plain, n_users=5).numpy()
    for u in range(5):
        rows = users.numpy() == u
        if rows.any():
            assert means[u] == pytest.approx(ref_plain[rows].mean(), rel=1e-10)
        else:
            assert np.isnan(means[u])


# ----------------------------------------------------------------------------- ACE


def _lae_table(rng, n=200, D=16):
    """A synthetic anisotropic item table: a dominant common direction and decaying axes."""
    return rng.standard_normal((n, D)) * np.geomspace(3.0, 0.05, D) + rng.standard_normal(D) * 4.0


def test_ace_lambda_zero_is_flat_and_large_lambda_returns_to_the_original_spectrum():
    rng = np.random.default_rng(9)
    X = _lae_table(rng)
    dim = 8
    s = np.linalg.svd(X, compute_uv=False)[:dim]
    flat = np.linalg.svd(ace_reshape(X, 0.0, dim).numpy(), compute_uv=False)
    np.testing.assert_allclose(flat, np.ones(dim), rtol=1e-8)
    target = s / np.linalg.norm(s)
    dist = []
    for lam in [0.0, 1e-2, 1.0, 1e2, 1e4, 1e6, 1e9, 1e12]:
        got = np.linalg.svd(ace_reshape(X, lam, dim).numpy(), compute_uv=False)
        np.testing.assert_allclose(got, s / np.sqrt(s**2 + lam), rtol=1e-8)  # the closed form
        dist.append(np.linalg.norm(got / np.linalg.norm(got) - target))
    assert np.all(np.diff(dist) < 0) and dist[-1] < 1e-6 and dist[0] > 0.5


def test_ace_reshape_is_the_factor_of_the_ridge_linear_autoencoder():
    """Phi Phi^T equals the LAE's closed form B = (X X^T + lam I)^{-1} X X^T, solved directly."""
    rng = np.random.default_rng(10)
    for n, D in [(30, 6), (8, 20)]:  # both Gram sides
        X = _lae_table(rng, n, D)
        k = min(n, D)
        lam = 0.7
        B = np.linalg.solve(X @ X.T + lam * np.eye(n), X @ X.T)
        Phi = ace_reshape(X, lam, k).numpy()
        np.testing.assert_allclose(Phi @ Phi.T, B, atol=1e-8)
        U, s, _ = np.linalg.svd(X, full_matrices=False)
        signs = np.sign(np.sum(U[:, :3] * Phi[:, :3], axis=0))
        np.testing.assert_allclose(Phi[:, :3], U[:, :3] * signs * (s[:3] / np.sqrt(s[:3] ** 2 + lam)), atol=1e-8)


def test_ace_truncation_keeps_the_top_directions():
    rng = np.random.default_rng(11)
    X = _lae_table(rng, 50, 12)
    full = ace_reshape(X, 0.5, 12).numpy()
    for dim in (1, 4, 7):
        np.testing.assert_allclose(ace_reshape(X, 0.5, dim).numpy(), full[:, :dim], atol=1e-10)
    with pytest.raises(PopPriorError, match="cannot give 13"):
        ace_reshape(X, 0.5, 13)
    with pytest.raises(PopPriorError, match="rank"):
        ace_reshape(np.outer(rng.standard_normal(50), rng.standard_normal(12)), 0.0, 3)
    with pytest.raises(PopPriorError, match=">= 0"):
        ace_reshape(X, -1.0, 3)


def test_ace_keyed_and_ordered_files_give_the_same_rows(tmp_path):
    rng = np.random.default_rng(12)
    item_tokens = ["[PAD]"] + [f"i{k}" for k in range(1, 21)]
    real = _lae_table(rng, 20, 10)
    np.save(tmp_path / "with_pad.npy", np.vstack([np.full(10, 99.0), real]))
    np.save(tmp_path / "real_only.npy", real.astype(np.float32))
    order = rng.permutation(20)
    extra = rng.standard_normal((2, 10))
    np.savez(tmp_path / "keyed.npz", tokens=np.array([item_tokens[1 + r] for r in order] + ["zz", "yy"]),
             embeddings=np.vstack([real[order], extra]))
    rec = np.zeros(20, dtype=[("token", "U8"), ("embedding", "f8", (10,))])
    rec["token"] = [item_tokens[1 + r] for r in order[::-1]]
    rec["embedding"] = real[order[::-1]]
    np.save(tmp_path / "structured.npy", rec)
    expected = np.vstack([np.zeros(10), real])
    for name, tol in [("with_pad.npy", 0), ("keyed.npz", 0), ("structured.npy", 0), ("real_only.npy", 1e-6)]:
        np.testing.assert_allclose(ace_load_table(tmp_path / name, item_tokens), expected, atol=tol * 10)
    a = ace_init_table(tmp_path / "with_pad.npy", item_tokens, 0.3, 4)
    b = ace_init_table(tmp_path / "keyed.npz", item_tokens, 0.3, 4)
    assert a.shape == (21, 4) and torch.all(a[0] == 0)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[1:], ace_reshape(real, 0.3, 4))


def test_ace_bad_files_are_one_line_errors(tmp_path):
    tokens = ["[PAD]", "a", "b", "c"]
    cases = {
        "rows.npy": (np.ones((5, 3)), "has 5 rows"),
        "nan.npy": (np.array([[1.0, np.nan], [0, 1], [1, 1]]), "NaN"),
        "vec.npy": (np.ones(3), "2-D"),
        "obj.npy": (np.array([{"a": 1}], dtype=object), "without pickle"),
    }
    for name, (arr, msg) in cases.items():
        np.save(tmp_path / name, arr, allow_pickle=True)
        with pytest.raises(PopPriorError, match=msg):
            ace_load_table(tmp_path / name, tokens)
    np.savez(tmp_path / "miss.npz", tokens=np.array(["a", "b"]), embeddings=np.ones((2, 3)))
    np.savez(tmp_path / "dup.npz", tokens=np.array(["a", "b", "b", "c"]), embeddings=np.ones((4, 3)))
    np.savez(tmp_path / "keys.npz", rows=np.ones((3, 3)))
    for name, msg in [("miss.npz", "lacks 1 of"), ("dup.npz", "repeats"), ("keys.npz", "'tokens'")]:
        with pytest.raises(PopPriorError, match=msg):
            ace_load_table(tmp_path / name, tokens)
    with pytest.raises(PopPriorError, match="no such file"):
        ace_load_table(tmp_path / "absent.npy", tokens)


# ----------------------------------------------------------------------------- ReSN


def _resn_problem(rng, B=12, n_items=25, d=5):
    H = rng.standard_normal((B, d))
    E = rng.standard_normal((n_items, d)) + 0.3
    E[0] = 100.0  # padding never scores
    return H, E


def test_resn_penalty_matches_the_released_one_step_estimate():
    rng = np.random.default_rng(13)
    H, E = _resn_problem(rng)
    Y = _sigmoid(H @ E[1:].T)
    q = Y.sum(axis=0) / np.linalg.norm(Y.sum(axis=0))
    expected = np.sum((Y @ q) ** 2) / len(H)
    got = resn_penalty(torch.tensor(H), torch.tensor(E)).item()
    assert got == pytest.approx(expected, rel=1e-10)
    exact = np.linalg.norm(Y, 2) ** 2 / len(H)
    assert got <= exact * (1 + 1e-12)
    assert got > 0.95 * exact  # a positive matrix: the all-ones start is already close (Perron)


def test_resn_power_iteration_converges_to_the_exact_spectral_norm():
    rng = np.random.default_rng(14)
    H, E = _resn_problem(rng)
    Ht, Et = torch.tensor(H), torch.tensor(E)
    Z = H @ E[1:].T
    for link, Y in [("sigmoid", _sigmoid(Z)), ("identity", Z),
                    ("softmax", np.exp(Z) / np.exp(Z).sum(axis=1, keepdims=True))]:
        exact = np.linalg.norm(Y, 2) ** 2 / len(H)
        assert resn_penalty(Ht, Et, link, n_power_iter=200).item() == pytest.approx(exact, rel=1e-9)
        q = Y.sum(axis=0) / np.linalg.norm(Y.sum(axis=0))
        one_step = np.sum((Y @ q) ** 2) / len(H)
        assert resn_penalty(Ht, Et, link).item() == pytest.approx(one_step, rel=1e-10)
    # the identity link's factorised path equals the dense path on the same logits
    logits = torch.cat([torch.full((len(H), 1), 7.0, dtype=torch.float64), torch.tensor(Z)], dim=1)
    for iters in (1, 5):
        assert resn_penalty(Ht, Et, "identity", iters).item() == pytest.approx(
            resn_penalty(Ht, Et, "identity", iters, logits=logits).item(), rel=1e-10)
        Y = _sigmoid(Z)  # iters power-iteration steps from the column sum, in numpy
        q = Y.sum(axis=0)
        for _ in range(iters - 1):
            q = Y.T @ (Y @ (q / np.linalg.norm(q)))
        q = q / np.linalg.norm(q)
        assert resn_penalty(Ht, Et, "sigmoid", iters).item() == pytest.approx(np.sum((Y @ q) ** 2) / len(H), rel=1e-9)


def test_resn_gradient_is_finite_and_holds_the_direction_fixed():
    """With q detached, dP/dY = 2 (Y q) q^T / B; chained through the sigmoid and Z = H E^T."""
    rng = np.random.default_rng(15)
    H, E = _resn_problem(rng, B=6, n_items=10, d=3)
    Ht = torch.tensor(H, requires_grad=True)
    Et = torch.tensor(E, requires_grad=True)
    resn_penalty(Ht, Et).backward()
    Z = H @ E[1:].T
    Y = _sigmoid(Z)
    q = Y.sum(axis=0) / np.linalg.norm(Y.sum(axis=0))
    dZ = 2 * np.outer(Y @ q, q) / len(H) * Y * (1 - Y)
    np.testing.assert_allclose(Ht.grad.numpy(), dZ @ E[1:], rtol=1e-9)
    np.testing.assert_allclose(Et.grad.numpy()[1:], dZ.T @ H, rtol=1e-9)
    assert Et.grad[0].abs().max() == 0 and torch.isfinite(Ht.grad).all()


def test_resn_bad_arguments():
    H, E = torch.zeros(2, 3), torch.zeros(4, 3)
    with pytest.raises(PopPriorError, match="link"):
        resn_penalty(H, E, link="tanh")
    with pytest.raises(PopPriorError, match="power iterations"):
        resn_penalty(H, E, n_power_iter=0)
    assert math.isfinite(resn_penalty(H, E).item())
