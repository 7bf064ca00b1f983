# Over 500 lines: the DESIGN §3 formulas, their streaming statistics and the permutation nulls that reuse them.
"""Popularity-aligned score energy of the learned dot product (DESIGN.md §3).

Two exact paths compute the same numbers:

- the **factorised** path, for ``Z = H E^T``: one streaming pass accumulates
  :class:`ContextStats` (``G = H^T H``, ``hsum = H^T 1``, ``m``) and
  :func:`energy_from_stats` finishes in ``O(n d^2)``; each permutation costs one
  ``E^T l_b`` product, ``O(n d)``. No ``m x n`` score matrix is ever built.
- the **streaming** fallback, :class:`ScoreStats`, for models whose learned score is
  not a plain dot product: it consumes score batches ``Z_batch [b, n_items]``.

Both draw their permuted popularity directions from :func:`permuted_directions`, so the
same ``seed`` gives the same permutations (and the same p-values) on either path. The
single-model tests use the raw label permutations (exact); the matched reduction of two
models uses them with ``l``'s own component removed (DESIGN §3.1 says why).

Conventions: everything is indexed by RecBole's item id, and item id 0 is RecBole's padding
item, excluded everywhere: row 0 of ``E``, entry 0 of ``log_prior`` and column 0 of ``Z`` are
ignored. So ``E`` has ``n_items = n + 1`` rows for ``n`` real items (an ``E`` of 30 rows gives
``n = 29``), and ``log_prior`` has one entry per row of ``E``. ``n`` below is the number of real
items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from recbole_popprior.errors import PopPriorError

# Extra memory one chunk of permuted directions may take (int32 permutation + float64 row).
_CHUNK_BYTES = 64 * 2**20
# Rows of centred scores the streaming path buffers before running the permutation chunks.
_BUFFER_BYTES = 32 * 2**20
# Relative slack for "stat_b >= stat_obs": the two paths sum in different orders, and ties
# (permutations that only swap equal prior values) must count on both.
_TIE_RTOL = 1e-9
# A permuted direction whose part orthogonal to l is shorter than this is l itself (cos^2 > 1 - 1e-12).
_DEGENERATE_NORM = 1e-6


def as_float64(x: Any) -> np.ndarray:
    """A float64 numpy view/copy of a numpy array or a torch tensor on any device."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def popularity_direction(log_prior: Any) -> np.ndarray:
    """``l = P_n log p_hat / ||P_n log p_hat||`` over the real items 1..n (DESIGN §3)."""
    lp = as_float64(log_prior).reshape(-1)
    if lp.shape[0] < 3:
        raise PopPriorError(f"log_prior needs padding plus at least two items, got {lp.shape[0]} entries")
    lp = lp[1:]
    if not np.all(np.isfinite(lp)):
        raise PopPriorError("log_prior has non-finite entries beyond the padding item 0")
    centred = lp - lp.mean()
    norm = float(np.linalg.norm(centred))
    if norm <= 1e-12 * max(1.0, float(np.abs(lp).max())):
        raise PopPriorError("log_prior is constant over items: the popularity direction is undefined")
    return centred / norm


def _permutation_seed(seed: int, b: int) -> int:
    """Seed of permutation ``b``: independent of chunking, so any chunk size gives the same draws."""
    state = np.random.SeedSequence(int(seed), spawn_key=(int(b),)).generate_state(1, np.uint64)
    return int(state[0])


def permutation_chunk_size(n: int, permutations: int, chunk_bytes: int = _CHUNK_BYTES) -> int:
    """How many permuted directions of length ``n`` fit in ``chunk_bytes`` (int32 index + float64)."""
    return int(max(1, min(permutations, chunk_bytes // (12 * max(n, 1)))))


def permuted_directions(l: np.ndarray, permutations: int, seed: int = 0,
                        chunk_size: int | None = None, *, orthogonal: bool = False) -> Iterator[np.ndarray]:
    """Yield the permuted popularity directions ``l_b`` in chunks ``[bc, n]``, b = 0..B-1.

    Centring and normalising commute with permuting item labels, so ``l_b = l[pi_b]`` is
    exactly the centred, unit direction of the label-shuffled prior. Permutation ``b`` is
    drawn from its own generator seeded by ``(seed, b)``: both energy paths call this one
    function and therefore see identical permutations for any chunk size.

    ``orthogonal=True`` yields ``(l_b - (l_b . l) l) / ||.||`` instead (DESIGN §3.1): the same
    permutations with ``l``'s own component removed. A draw that is ``+-l`` itself (a
    permutation that only swaps equal prior values) has no such part and is yielded as it
    is, so it reproduces the observed statistic and counts as a tie.
    """
    n = l.shape[0]
    chunk_size = chunk_size or permutation_chunk_size(n, permutations)
    generator = torch.Generator()
    index = np.empty((chunk_size, n), dtype=np.int32)
    for start in range(0, permutations, chunk_size):
        stop = min(permutations, start + chunk_size)
        for row, b in enumerate(range(start, stop)):
            generator.manual_seed(_permutation_seed(seed, b))
            torch.randperm(n, generator=generator, dtype=torch.int32, out=torch.from_numpy(index[row]))
        L = np.take(l, index[: stop - start])
        if orthogonal:
            L = _orthogonalise(L, l)
        yield L


def _orthogonalise(L: np.ndarray, l: np.ndarray) -> np.ndarray:
    """Rows of ``L`` minus their component along ``l``, renormalised (in place; rows and ``l`` unit)."""
    cos = _project(L, l)
    residual = 1.0 - cos * cos  # ||l_b - (l_b . l) l||^2 for unit l_b and l
    degenerate = residual < _DEGENERATE_NORM**2
    scale = 1.0 / np.sqrt(np.where(degenerate, 1.0, residual))
    L -= np.outer(np.where(degenerate, 0.0, cos), l)
    L *= scale[:, None]
    if degenerate.any():  # l_b = +-l: keep the draw itself (it ties with the observed statistic)
        L[degenerate] = np.sign(cos[degenerate])[:, None] * l
    return L


def _project(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A @ B`` for the large products, through torch (zero-copy views).

    numpy's bundled OpenBLAS is erratic for these short-wide x tall-skinny shapes on a
    loaded machine (seconds instead of milliseconds); torch's kernels are not.
    """
    if A.size * (B.shape[-1] if B.ndim > 1 else 1) < 4_000_000:
        return A @ B  # small: not worth waking a thread pool
    return (torch.from_numpy(A) @ torch.from_numpy(B)).numpy()


def permutation_p_value(null: np.ndarray, observed: float) -> float:
    """``p = (1 + #{stat_b >= stat_obs}) / (B + 1)`` (DESIGN §3)."""
    slack = _TIE_RTOL * abs(observed)
    return float((1 + np.count_nonzero(null >= observed - slack)) / (null.shape[0] + 1))


def _null_summary(null: np.ndarray, observed: float, suffix: str = "") -> dict[str, float]:
    """``p_value``, ``null_mean`` and ``null_q95`` of one permutation null (keys end in ``suffix``)."""
    return {f"p_value{suffix}": permutation_p_value(null, observed),
            f"null_mean{suffix}": float(null.mean()),
            f"null_q95{suffix}": float(np.quantile(null, 0.95))}


@dataclass
class PopularitySubspace:
    """Right singular vectors ``Q`` [n, k] of the centred windowed log-marginals ``F`` [T, n]."""

    Q: np.ndarray
    cumulative: np.ndarray  # share of ||F||_F^2 captured by the top r = 1..k vectors
    rank: int  # smallest r reaching the energy threshold


def popularity_subspace(windows_log_prior: Any, subspace_energy: float = 0.95) -> PopularitySubspace:
    """``Q_r`` of DESIGN §3: SVD of the item-centred windowed log priors (padding column dropped)."""
    if not 0.0 < subspace_energy <= 1.0:
        raise PopPriorError(f"energy_subspace must lie in (0, 1], got {subspace_energy}")
    F = as_float64(windows_log_prior)
    if F.ndim == 1:
        F = F[None, :]
    if F.ndim != 2 or F.shape[1] < 3:
        raise PopPriorError(f"windows_log_prior must be [T, n_items], got shape {F.shape}")
    F = F[:, 1:]
    if not np.all(np.isfinite(F)):
        raise PopPriorError("windows_log_prior has non-finite entries beyond the padding column")
    F = F - F.mean(axis=1, keepdims=True)
    _, S, Vt = np.linalg.svd(F, full_matrices=False)
    if S.size == 0 or S[0] <= 0:
        raise PopPriorError("windowed log priors are all constant: the popularity subspace is empty")
    k = int(np.count_nonzero(S > S[0] * 1e-10))
    energy = S[:k] ** 2
    cumulative = np.cumsum(energy) / energy.sum()
    rank = int(np.searchsorted(cumulative, subspace_energy - 1e-12) + 1)
    return PopularitySubspace(Q=np.ascontiguousarray(Vt[:k].T), cumulative=cumulative, rank=min(rank, k))


def _subspace_report(per_vector: np.ndarray, total: float, sub: PopularitySubspace) -> dict[str, Any]:
    """Subspace fractions from the energies ``||Zc q_k||^2`` of the orthonormal vectors q_k."""
    fracs = np.cumsum(per_vector) / total
    out: dict[str, Any] = {"subspace_rank": sub.rank, "subspace_frac": float(fracs[sub.rank - 1])}
    for r in (1, 2, 3):  # beyond rank(F) the top-r subspace is the whole popularity subspace
        out[f"subspace_frac@{r}"] = float(fracs[min(r, fracs.shape[0]) - 1])
    return out


def _energy_report(total: float, E_dir: float, E_shared: float, m: int, n: int) -> dict[str, Any]:
    E_specific = E_dir - E_shared
    return {"total": total, "dir": E_dir, "shared": E_shared, "specific": E_specific,
            "dir_frac": E_dir / total if total > 0 else math.nan,
            "shared_frac": E_shared / E_dir if E_dir > 0 else math.nan,
            "shared_total_frac": E_shared / total if total > 0 else math.nan,
            "m": int(m), "n": int(n)}


def _single_model_tests(out: dict[str, Any], null_dir: np.ndarray, null_shared: np.ndarray,
                        permutations: int) -> None:
    """Add the two single-model permutation tests (DESIGN §3.1) to ``out``, in place.

    ``null_dir`` / ``null_shared``: ``E_dir`` / ``E_shared`` along each raw permuted ``l_b``,
    already divided by ``T`` (the statistics are ``dir_frac`` and ``shared_total_frac``).
    """
    out.update(_null_summary(null_dir, out["dir_frac"]))
    out.update(_null_summary(null_shared, out["shared_total_frac"], "_shared"))
    out["permutations"] = int(permutations)


# --------------------------------------------------------------------------------------
# Factorised path
# --------------------------------------------------------------------------------------
@dataclass
class ContextStats:
    """Sufficient statistics of the contexts: ``G = H^T H``, ``hsum = H^T 1``, ``m`` (DESIGN §3).

    All fields are plain float64 numpy arrays / an int, so workers can all-reduce them by
    summing (:meth:`merge` is that sum).
    """

    G: np.ndarray | None = None
    hsum: np.ndarray | None = None
    m: int = 0

    @classmethod
    def from_H(cls, H: Any) -> "ContextStats":
        stats = cls()
        stats.update(H)
        return stats

    def update(self, H: Any) -> "ContextStats":
        """Add a batch of contexts ``H`` [b, d] (numpy, or torch on any device)."""
        if isinstance(H, torch.Tensor):
            Hd = H.detach().to(torch.float64)
            G, hsum = (Hd.T @ Hd).cpu().numpy(), Hd.sum(dim=0).cpu().numpy()
        else:
            Hd = np.asarray(H, dtype=np.float64)
            G, hsum = _project(Hd.T, Hd), Hd.sum(axis=0)
        if Hd.ndim != 2:
            raise PopPriorError(f"H must be [m, d], got shape {tuple(Hd.shape)}")
        if self.G is None:
            self.G, self.hsum = G, hsum
        else:
            if G.shape != self.G.shape:
                raise PopPriorError(f"context width changed from {self.G.shape[0]} to {G.shape[0]}")
            self.G += G
            self.hsum += hsum
        self.m += int(Hd.shape[0])
        return self

    def merge(self, other: "ContextStats") -> "ContextStats":
        """In-place sum with another worker's statistics."""
        if other.G is None:
            return self
        if self.G is None:
            self.G, self.hsum, self.m = other.G.copy(), other.hsum.copy(), other.m
            return self
        self.G += other.G
        self.hsum += other.hsum
        self.m += other.m
        return self


def check_prior_length(E: Any, log_prior_entries: int) -> None:
    """``log_prior`` needs one entry per row of ``E`` (both indexed by item id, 0 = padding)."""
    shape = tuple(np.shape(E))
    if len(shape) != 2:
        raise PopPriorError(f"E must be a 2-d item table [n_items, d] (row 0: padding), got shape {shape}")
    if shape[0] != log_prior_entries:
        raise PopPriorError(f"log_prior has {log_prior_entries} entries but E has {shape[0]} rows: log_prior needs "
                            f"one entry per row of E (entry and row 0 are the padding item; {shape[0] - 1} real items)")


def item_table(E: Any, n_items: int, d: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``E1`` (padding row 0 dropped, float64), its mean row and its centred Gram ``C``."""
    E = as_float64(E)
    if E.ndim != 2 or E.shape[0] != n_items:
        raise PopPriorError(f"E must be [n_items={n_items}, d] (row 0: padding), got shape {E.shape}")
    if d is not None and E.shape[1] != d:
        raise PopPriorError(f"E has width {E.shape[1]} but the contexts have width {d}")
    E1 = E[1:]
    E1_t = torch.from_numpy(E1)
    ebar_t = E1_t.mean(dim=0)
    raw = E1_t.T @ E1_t
    shift = E1.shape[0] * torch.outer(ebar_t, ebar_t)
    if float(shift.trace()) <= 0.5 * float(raw.trace()):
        C = raw - shift  # the mean is small: the shortcut loses at most ~1 digit of float64
    else:  # a large mean: centre chunk by chunk to avoid cancellation
        C = torch.zeros_like(raw)
        for start in range(0, E1.shape[0], 16384):
            block = E1_t[start:start + 16384] - ebar_t
            C += block.T @ block
    if not (bool(torch.isfinite(ebar_t).all()) and bool(torch.isfinite(C).all())):
        raise PopPriorError("E has non-finite entries")  # any inf/nan in E reaches its mean and C
    return E1, ebar_t.numpy(), C.numpy()


def centred_item_gram(E: Any) -> np.ndarray:
    """``C = (P_n E1)^T (P_n E1)`` [d, d] of the padding-excluded item table."""
    E = as_float64(E)
    return item_table(E, E.shape[0], None)[2]


def energy_from_stats(stats: ContextStats, E: Any, log_prior: Any, *, permutations: int = 0,
                      seed: int = 0, windows_log_prior: Any = None, subspace_energy: float = 0.95,
                      _table: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """DESIGN §3 energies from :class:`ContextStats` and the item table ``E`` [n_items, d].

    With ``w = E^T l``: ``E_dir = w^T G w``, ``E_shared = (hsum . w)^2 / m`` and
    ``T = trace(G C)`` with ``C`` the centred item Gram. See :func:`popularity_energy`
    for the keys.
    """
    if stats.G is None or stats.m == 0:
        raise PopPriorError("no evaluation contexts were collected")
    l = popularity_direction(log_prior)
    if _table is None:
        check_prior_length(E, l.shape[0] + 1)
    E1, ebar, C = _table if _table is not None else item_table(E, l.shape[0] + 1, stats.G.shape[0])
    if E1.shape != (l.shape[0], stats.G.shape[0]):
        raise PopPriorError(f"E has {E1.shape[0] + 1} rows of width {E1.shape[1]}; expected "
                            f"{l.shape[0] + 1} items of width {stats.G.shape[0]}")
    G, hsum, m = stats.G, stats.hsum, stats.m
    total = float(np.sum(G * C))  # trace(G C), both symmetric
    w = _project(E1.T, l) - ebar * l.sum()  # (P_n E1)^T l
    E_dir = float(w @ G @ w)
    E_shared = float((hsum @ w) ** 2 / m)
    out = _energy_report(total, E_dir, E_shared, m, l.shape[0])
    if permutations > 0:
        null_dir, null_shared = np.empty(permutations), np.empty(permutations)
        pos = 0
        for L in permuted_directions(l, permutations, seed):
            W = _project(L, E1)  # [bc, d]; l_b sums to zero, so E1 and P_n E1 give the same w_b
            null_dir[pos:pos + W.shape[0]] = np.einsum("bi,ij,bj->b", W, G, W) / total
            null_shared[pos:pos + W.shape[0]] = (W @ hsum) ** 2 / m / total
            pos += W.shape[0]
        _single_model_tests(out, null_dir, null_shared, permutations)
    if windows_log_prior is not None:
        sub = popularity_subspace(windows_log_prior, subspace_energy)
        if sub.Q.shape[0] != l.shape[0]:
            raise PopPriorError(f"windows_log_prior covers {sub.Q.shape[0] + 1} items, log_prior {l.shape[0] + 1}")
        WQ = _project(E1.T, sub.Q) - np.outer(ebar, sub.Q.sum(axis=0))  # (P_n E1)^T Q
        out.update(_subspace_report(np.einsum("ik,ij,jk->k", WQ, G, WQ), total, sub))
    return out


def popularity_energy(H: Any, E: Any, log_prior: Any, *, permutations: int = 0, seed: int = 0,
                      windows_log_prior: Any = None, subspace_energy: float = 0.95) -> dict[str, Any]:
    """Popularity-aligned energy of ``Z = H E^T`` (DESIGN §3), without building ``Z``.

    Args:
        H: contexts ``[m, d]``.
        E: item table ``[n_items, d]`` indexed by RecBole item id: row 0 is the padding item and
            is excluded, so 30 rows are 29 items (``n`` in the result).
        log_prior: ``[n_items]``, one entry per row of ``E``; entry 0 (padding) is ignored.
            Numpy or torch, any device.
        permutations: B item-label permutations of ``log_prior`` for the single-model tests
            of ``dir_frac`` and of ``shared_total_frac`` (DESIGN §3.1).
        windows_log_prior: ``[T, n_items]`` windowed priors for the popularity subspace.

    Returns:
        ``total`` (T), ``dir`` (E_dir), ``shared`` (E_shared), ``specific``, ``dir_frac`` =
        dir/total, ``shared_frac`` = shared/dir, ``shared_total_frac`` = shared/total, ``m``,
        ``n``; with permutations also ``p_value``, ``null_mean``, ``null_q95`` (the test of
        ``dir_frac``), ``p_value_shared``, ``null_mean_shared``, ``null_q95_shared`` (the test
        of ``shared_total_frac``) and ``permutations``; with windows also ``subspace_rank``,
        ``subspace_frac`` and ``subspace_frac@1..3``.
    """
    return energy_from_stats(ContextStats.from_H(H), E, log_prior, permutations=permutations,
                             seed=seed, windows_log_prior=windows_log_prior,
                             subspace_energy=subspace_energy)


# --------------------------------------------------------------------------------------
# Streaming fallback over score batches
# --------------------------------------------------------------------------------------
@dataclass
class ScoreStats:
    """Streaming DESIGN §3 energies over learned-score batches ``Z_batch [b, n_items]``.

    For models whose learned score is not ``H E^T``. Column 0 (padding) is ignored. Gives
    the factorised path's numbers on dot-product models, with the same permutations for the
    same ``seed``. Cost: ``O(b n)`` per batch, plus ``O(b n B)`` with permutations (the
    centred rows are buffered and pushed through the permutation chunks together).
    The numeric accumulators (``total``, ``s_sum``, ``s_sq``, ``m``, ``null_sq``,
    ``sub_sq``) are sums: workers all-reduce them by summing after :meth:`flush`.
    ``null_sq`` is ``[2, B]``: per permuted direction ``l_b``, row 0 sums ``(Zc l_b)^2`` and
    row 1 sums ``Zc l_b`` over the contexts (for ``E_dir`` and ``E_shared`` along ``l_b``).
    """

    log_prior: Any
    permutations: int = 0
    seed: int = 0
    windows_log_prior: Any = None
    subspace_energy: float = 0.95
    buffer_bytes: int = _BUFFER_BYTES
    m: int = 0
    total: float = 0.0
    s_sum: float = 0.0
    s_sq: float = 0.0
    null_sq: np.ndarray = field(default=None, repr=False)
    sub_sq: np.ndarray = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._l = popularity_direction(self.log_prior)
        self._sub = (popularity_subspace(self.windows_log_prior, self.subspace_energy)
                     if self.windows_log_prior is not None else None)
        if self._sub is not None and self._sub.Q.shape[0] != self._l.shape[0]:
            raise PopPriorError("windows_log_prior and log_prior cover different item counts")
        # Both nulls' sums live in the one array that the collector's and the distributed
        # all-reduce already sum by name (``null_sq``), so the shared test stays exact across ranks.
        self.null_sq = np.zeros((2, max(self.permutations, 0)))
        self.sub_sq = np.zeros(self._sub.Q.shape[1]) if self._sub is not None else None
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    def update(self, Z_batch: Any) -> "ScoreStats":
        """Add learned scores ``[b, n_items]`` of ``b`` contexts (numpy or torch)."""
        Z = as_float64(Z_batch)
        if Z.ndim != 2 or Z.shape[1] != self._l.shape[0] + 1:
            raise PopPriorError(f"score batch must be [b, {self._l.shape[0] + 1}] (one column per log_prior entry, "
                                f"column 0: padding), got {Z.shape}")
        Zc = Z[:, 1:] - Z[:, 1:].mean(axis=1, keepdims=True)
        if not np.all(np.isfinite(Zc)):
            raise PopPriorError("learned scores have non-finite entries beyond the padding column")
        s = _project(Zc, self._l)
        self.m += Zc.shape[0]
        self.total += float(np.einsum("ij,ij->", Zc, Zc))
        self.s_sum += float(s.sum())
        self.s_sq += float(s @ s)
        if self._sub is not None:
            self.sub_sq += np.sum(_project(Zc, self._sub.Q) ** 2, axis=0)
        if self.permutations > 0:
            self._buffer.append(Zc)
            self._buffered += Zc.nbytes
            if self._buffered >= self.buffer_bytes:
                self.flush()
        return self

    def flush(self) -> None:
        """Push the buffered rows through every permuted direction."""
        if not self._buffer:
            return
        Zc = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer, self._buffered = [], 0
        pos = 0
        for L in permuted_directions(self._l, self.permutations, self.seed):
            S = _project(Zc, L.T)  # [rows, bc]
            self.null_sq[0, pos:pos + S.shape[1]] += np.einsum("rb,rb->b", S, S)
            self.null_sq[1, pos:pos + S.shape[1]] += S.sum(axis=0)
            pos += S.shape[1]

    def result(self) -> dict[str, Any]:
        """The same keys as :func:`popularity_energy`."""
        if self.m == 0:
            raise PopPriorError("no evaluation contexts were collected")
        self.flush()
        out = _energy_report(self.total, self.s_sq, self.s_sum ** 2 / self.m, self.m, self._l.shape[0])
        if self.permutations > 0:
            _single_model_tests(out, self.null_sq[0] / self.total,
                                self.null_sq[1] ** 2 / self.m / self.total, self.permutations)
        if self._sub is not None:
            out.update(_subspace_report(self.sub_sq, self.total, self._sub))
        return out


# --------------------------------------------------------------------------------------
# Matched reduction of two models on the same contexts
# --------------------------------------------------------------------------------------
def _reduction_models(std: Any, sep: Any, l: np.ndarray) -> list[tuple[ContextStats, np.ndarray, np.ndarray]]:
    """``(ContextStats, E1, mean row)`` of both models, checked to share the contexts' count."""
    models = []
    for pair in (std, sep):
        first, E = pair
        check_prior_length(E, l.shape[0] + 1)
        stats = first if isinstance(first, ContextStats) else ContextStats.from_H(first)
        if stats.G is None or stats.m == 0:
            raise PopPriorError("matched_reduction needs at least one context per model")
        E1, ebar, _ = item_table(E, l.shape[0] + 1, stats.G.shape[0])
        models.append((stats, E1, ebar))
    if models[0][0].m != models[1][0].m:
        raise PopPriorError(f"the two models were measured on different context counts "
                            f"({models[0][0].m} vs {models[1][0].m})")
    return models


def _direction_energies(W: np.ndarray, stats: ContextStats) -> tuple[np.ndarray, np.ndarray]:
    """``E_dir`` and ``E_shared`` along the directions whose ``w_b = E^T u_b`` are the rows of ``W``."""
    return np.einsum("bi,ij,bj->b", W, stats.G, W), (W @ stats.hsum) ** 2 / stats.m


def _reduction_null(models: list, l: np.ndarray, permutations: int, seed: int) -> dict[str, np.ndarray]:
    null = {"dir": np.empty(permutations), "shared": np.empty(permutations)}
    pos = 0
    for L in permuted_directions(l, permutations, seed, orthogonal=True):
        (d0, s0), (d1, s1) = (_direction_energies(_project(L, E1), stats) for stats, E1, _ in models)
        with np.errstate(divide="ignore", invalid="ignore"):
            null["dir"][pos:pos + L.shape[0]] = 1.0 - d1 / d0
            null["shared"][pos:pos + L.shape[0]] = 1.0 - s1 / s0
        pos += L.shape[0]
    return null


def reduction_null(std: Any, sep: Any, *, log_prior: Any, permutations: int,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """The permutation nulls ``{"dir": R_dir,b, "shared": R_shared,b}`` of :func:`matched_reduction`.

    ``R_b = 1 - E(sep) / E(std)`` along each orthogonalised permuted direction (DESIGN §3.1),
    the very draws :func:`matched_reduction` counts (same ``seed``), e.g. for plotting.
    """
    l = popularity_direction(log_prior)
    return _reduction_null(_reduction_models(std, sep, l), l, permutations, seed)


def _isotropic_shared_p(models: list, l: np.ndarray, a: tuple[float, float]) -> float:
    """Exact p of the ``R_shared`` test under directions uniform on the sphere of ``V`` (DESIGN §3.1).

    ``V`` = centred vectors orthogonal to ``l``. With ``x``, ``y`` the two models' mean
    centred score rows projected onto ``V``, ``t = (y.u)/(x.u)`` is Cauchy(mu, gamma) with
    ``mu = x.y/x.x`` and ``gamma = sqrt(x.x y.y - (x.y)^2)/x.x``; ``p = P(t^2 <= (a_sep/a_std)^2)``.
    """
    zbar = [_project(E1, stats.hsum / stats.m) - ebar @ (stats.hsum / stats.m) for stats, E1, ebar in models]
    x, y = (z - (z @ l) * l for z in zbar)
    xx, yy, xy = float(x @ x), float(y @ y), float(x @ y)
    if not (xx > 0 and a[0] != 0):
        return math.nan
    root = abs(a[1] / a[0])
    mu, gamma = xy / xx, math.sqrt(max(xx * yy - xy * xy, 0.0)) / xx
    if gamma <= 1e-12 * max(abs(mu), 1e-300):  # x and y parallel: t is the constant mu
        return 1.0 if mu * mu <= root * root * (1 + _TIE_RTOL) else 0.0
    return (math.atan((root - mu) / gamma) + math.atan((root + mu) / gamma)) / math.pi


def reduction_from_energies(std_dir: float, sep_dir: float, std_shared: float, sep_shared: float) -> dict[str, float]:
    """``R = 1 - E(sep) / E(std)`` for ``E_dir`` and ``E_shared``, with the four energies (DESIGN §3.1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r_dir, r_shared = 1.0 - np.float64(sep_dir) / std_dir, 1.0 - np.float64(sep_shared) / std_shared
    return {"R_dir": float(r_dir), "R_shared": float(r_shared), "std_dir": float(std_dir), "sep_dir": float(sep_dir),
            "std_shared": float(std_shared), "sep_shared": float(sep_shared)}


def matched_reduction(std: Any, sep: Any, *, permutations: int = 2000, seed: int = 0,
                      log_prior: Any, null_out: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """``R = 1 - E(sep) / E(std)`` for ``E_dir`` and ``E_shared`` and their tests (DESIGN §3.1).

    ``std`` and ``sep`` are ``(H, E)`` pairs (or ``(ContextStats, E)``) of the standard and
    the prior-separated model on the same contexts; each ``E`` has one row per entry of
    ``log_prior``, row and entry 0 being the padding item (excluded). Every permuted direction is applied to
    BOTH models, with ``l``'s own component removed first (``permuted_directions(...,
    orthogonal=True)``); the p-values count ``R_b >= R_obs``: is the reduction along ``l``
    larger than along directions that carry no popularity?

    Returns ``R_dir``, ``R_shared``, the four energies (``std_dir``, ``sep_dir``,
    ``std_shared``, ``sep_shared``), ``p_iso_shared`` (the ``R_shared`` test's exact p under
    isotropic directions, without the ``1/(B+1)`` resolution of a Monte Carlo null) and, with
    permutations, ``p_value_dir``, ``null_mean_dir``, ``null_q95_dir``, the same three for
    ``shared`` and ``permutations``. ``null_out``: filled with the null draws
    (:func:`reduction_null`'s ``dir`` and ``shared``), e.g. for a plot, without drawing them twice.
    """
    l = popularity_direction(log_prior)
    models = _reduction_models(std, sep, l)
    obs = [_direction_energies((_project(E1.T, l) - ebar * l.sum())[None, :], stats)
           for stats, E1, ebar in models]
    out: dict[str, Any] = reduction_from_energies(obs[0][0][0], obs[1][0][0], obs[0][1][0], obs[1][1][0])
    R_dir, R_shared = out["R_dir"], out["R_shared"]
    # the signed shared projections a = mean_c (Zc l) of each model: E_shared = m a^2
    a = tuple(float(stats.hsum @ (_project(E1.T, l) - ebar * l.sum())) / stats.m for stats, E1, ebar in models)
    out["p_iso_shared"] = _isotropic_shared_p(models, l, a)
    if permutations > 0:
        null = _reduction_null(models, l, permutations, seed)
        if null_out is not None:
            null_out.update(null)
        for name, obs_R in (("dir", R_dir), ("shared", R_shared)):
            out.update(_null_summary(null[name], obs_R, f"_{name}"))
        out["permutations"] = int(permutations)
    return out
