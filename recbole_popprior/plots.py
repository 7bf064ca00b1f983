"""Figures of the comparison (docs/DESIGN.md §3, §3.2): spectra, energy decomposition, permutation
nulls, and the arms side by side.

Every figure says which seed or aggregate it shows (in its title) and labels both axes.
Matplotlib with the Agg backend (no display needed); every figure is written atomically as PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from recbole_popprior.formatting import fmt  # noqa: E402
from recbole_popprior.utils import atomic_write  # noqa: E402

#: y-axis label of each measure of the arms figure
MEASURE_LABELS = {"dir_frac": "E_dir / T (share along log p)", "shared_frac": "E_shared / E_dir (context-shared)"}


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _wrap(label: str) -> str:
    return label.replace(" (", "\n(")


def seeds_text(seeds: Sequence[int]) -> str:
    """``seed 2020`` or ``mean over 3 seeds (2020, 2021, 2022)``."""
    seeds = list(seeds)
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"mean over {len(seeds)} seeds ({', '.join(map(str, seeds))})"


def plot_spectra(spectra: Mapping[str, np.ndarray], path: str | os.PathLike, seed: int | None = None) -> Path:
    """Singular values of each model's item-centred learned score matrix ``Zc`` (log scale), one seed."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, values in spectra.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[values > max(values.max(), 1e-300) * 1e-12] if values.size else values
        ax.semilogy(np.arange(1, values.size + 1), values, marker="o", ms=3, label=label)
    ax.set_xlabel("k (index of the singular value)")
    ax.set_ylabel("singular value of Zc = H E^T P_n")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("Spectra of the item-centred learned scores" + (f", seed {seed}" if seed is not None else ""),
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_energy(energies: Mapping[str, Sequence[Mapping[str, float]]], path: str | os.PathLike,
                seeds: Sequence[int]) -> Path:
    """Stacked bars: context-shared and context-specific popularity-direction energy as shares of T,
    each the mean over the seeds (``energies``: label -> one energy dict per seed); dots: each
    seed's ``E_dir / T``."""
    labels = list(energies)

    def share(label: str, key: str) -> np.ndarray:
        return np.array([e[key] / e["total"] for e in energies[label]], dtype=np.float64)

    shared = np.array([share(k, "shared").mean() for k in labels])
    specific = np.array([share(k, "specific").mean() for k in labels])
    fig, ax = plt.subplots(figsize=(max(5.5, 1.9 * len(labels)), 3.9))
    x = np.arange(len(labels))
    ax.bar(x, shared, label="E_shared / T (context-shared)")
    ax.bar(x, specific, bottom=shared, label="E_specific / T (context-specific)")
    for xi, label in zip(x, labels):
        per_seed = share(label, "dir")
        if per_seed.size > 1:
            ax.plot(np.full(per_seed.size, xi), per_seed, "k.", ms=5, label="E_dir / T of one seed" if xi == 0 else None)
        ax.annotate(f"E_dir/T = {fmt(per_seed.mean())}", (xi, per_seed.max()), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(x, [_wrap(k) for k in labels], fontsize=8)
    ax.set_xlabel("model (arm)", fontsize=9)
    ax.set_ylabel("share of the centred score energy T")
    ax.set_ylim(0, max(1.0, float((shared + specific).max()) * 1.15))
    ax.set_title(f"Popularity-direction energy, test set, {seeds_text(seeds)}", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def _null_panel(ax: plt.Axes, null: np.ndarray, observed: float, name: str, title: str = "") -> None:
    """The null of ``R = 1 - E(arm) / E(standard)`` drawn as the energy ratio ``1 - R`` on a log
    axis: a ratio's null is heavy-tailed, and on this axis no draw has to be clipped into a spike
    at the edge of the panel. ``R >= observed`` is a ratio at or left of the observed line."""
    null = np.asarray(null, dtype=np.float64)
    ratio = 1.0 - null[np.isfinite(null)]
    kept = ratio[ratio > 0]
    dropped = null.size - kept.size
    obs_ratio = 1.0 - observed if observed < 1.0 else None
    span = np.log10(np.append(kept, [] if obs_ratio is None else [obs_ratio]))
    ax.hist(kept, bins=np.logspace(span.min() - 0.05, span.max() + 0.05, 61), color="0.6",
            label=f"{kept.size} permutations")
    ax.set_xscale("log")
    if obs_ratio is not None:
        ax.axvline(obs_ratio, color="C3", lw=2, label=f"observed: R_{name} = {fmt(observed)} (ratio {fmt(obs_ratio)})")
    exceed = int(np.count_nonzero(null >= observed))
    ax.set_title(f"{title}R_{name}: {exceed} of {null.size} permutations >= observed", fontsize=9)
    ax.set_xlabel(f"E(arm) / E(standard) = 1 - R_{name} along shuffled item labels (log scale)"
                  + (f"; {dropped} undefined draws left out" if dropped else ""), fontsize=8)
    ax.set_ylabel("permutations (count)", fontsize=8)
    ax.legend(fontsize=8)


def plot_permutation_nulls(arms: Mapping[str, tuple[Mapping[str, np.ndarray], Mapping[str, float]]],
                           path: str | os.PathLike, seed: int | None = None, n_seeds: int = 1) -> Path:
    """One row per compared arm (``label -> (nulls, observed)``): each matched reduction's null, one seed."""
    labels = list(arms)
    names = list(arms[labels[0]][0])
    fig, axes = plt.subplots(len(labels), len(names), figsize=(5.2 * len(names), 3.8 * len(labels)), squeeze=False)
    for row, label in zip(axes, labels):
        nulls, observed = arms[label]
        for ax, name in zip(row, names):
            _null_panel(ax, nulls[name], observed[name], name, f"{label}\n")
    if seed is not None:
        of = f" (the first of {n_seeds} seeds; every seed's p-value is in compare.md)" if n_seeds > 1 else ""
        fig.suptitle(f"Permutation nulls of the matched reductions, seed {seed}{of}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_arms(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike,
              measures: Sequence[str] = ("ndcg@10", "dir_frac", "shared_frac"),
              seeds: Sequence[int] = ()) -> Path:
    """The arms side by side: one panel per measure, one bar per report row (mean over seeds, with
    its interval as error bar where the report has one). A row that is another row's model served
    at another beta gets no energy bar (its energies are that row's)."""
    fig, axes = plt.subplots(1, len(measures), figsize=(4.3 * len(measures), 4.2), squeeze=False)
    labels = [row["label"] for row in summary]
    x = np.arange(len(labels))
    for ax, measure in zip(axes[0], measures):
        serving = "@" in measure  # accuracy depends on beta; energies do not
        cells = [row.get(measure) or {} for row in summary]
        skip = [not serving and bool(row.get("same_model_as")) for row in summary]
        means = np.array([np.nan if c.get("mean") is None or s else c["mean"] for c, s in zip(cells, skip)])
        lows = np.array([c["ci"]["low"] if c.get("ci") and not s else np.nan for c, s in zip(cells, skip)])
        highs = np.array([c["ci"]["high"] if c.get("ci") and not s else np.nan for c, s in zip(cells, skip)])
        ax.bar(x, np.nan_to_num(means), color=[f"C{k % 10}" for k in range(len(labels))])
        for xi, mean, high in zip(x, means, highs):  # the value, above its error bar
            if np.isfinite(mean):
                ax.annotate(fmt(mean), (xi, high if np.isfinite(high) else mean), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
        has = np.isfinite(lows)
        if has.any():
            ax.errorbar(x[has], means[has], yerr=[means[has] - lows[has], highs[has] - means[has]], fmt="none",
                        ecolor="k", capsize=3)
        for xi, s in zip(x, skip):
            if s:
                ax.annotate("same model\nas the bar\nbefore", (xi, 0), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, [_wrap(label) for label in labels], fontsize=7, rotation=30, ha="right")
        ax.set_xlabel("model (arm), as served", fontsize=8)
        ax.set_ylabel(MEASURE_LABELS.get(measure, f"{measure} (test)"), fontsize=9)
        ax.set_title(measure, fontsize=10)
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.08)  # room for the values
        ax.grid(axis="y", alpha=0.3)
    n = len(seeds)
    whiskers = "interval over the seeds" if any(row.get(m, {}).get("ci") for row in summary for m in measures) \
        else "no interval below 3 seeds"
    fig.suptitle(f"Arms side by side, test set, {seeds_text(seeds) if n else 'mean over the seeds'} "
                 f"(error bars: {whiskers})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["plot_spectra", "plot_energy", "plot_permutation_nulls", "plot_arms",
           "seeds_text", "MEASURE_LABELS"]
