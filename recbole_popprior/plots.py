"""Figures of the comparison (docs/DESIGN.md §3, §3.2): spectra, energy decomposition, permutation
nulls, and the arms side by side.

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

from recbole_popprior.utils import atomic_write  # noqa: E402

_NULL_FLOOR = -1.0  # reductions below this are drawn at the floor (a ratio null is heavy-tailed)


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_spectra(spectra: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Singular values of each model's item-centred learned score matrix ``Zc`` (log scale)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, values in spectra.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[values > max(values.max(), 1e-300) * 1e-12] if values.size else values
        ax.semilogy(np.arange(1, values.size + 1), values, marker="o", ms=3, label=label)
    ax.set_xlabel("k")
    ax.set_ylabel("singular value of Zc = H E^T P_n")
    ax.set_title("Spectra of the item-centred learned scores")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_energy(energies: Mapping[str, Mapping[str, float]], path: str | os.PathLike) -> Path:
    """Stacked bars: context-shared and context-specific popularity-direction energy, as shares of T."""
    labels = list(energies)
    shared = np.array([energies[k]["shared"] / energies[k]["total"] for k in labels])
    specific = np.array([energies[k]["specific"] / energies[k]["total"] for k in labels])
    fig, ax = plt.subplots(figsize=(max(5.5, 1.8 * len(labels)), 3.8))
    x = np.arange(len(labels))
    ax.bar(x, shared, label="E_shared / T (context-shared)")
    ax.bar(x, specific, bottom=shared, label="E_specific / T (context-specific)")
    for xi, total in zip(x, shared + specific):
        ax.annotate(f"E_dir/T = {total:.3g}", (xi, total), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [k.replace(" (", "\n(") for k in labels], fontsize=8)
    ax.set_ylabel("share of centred score energy T")
    ax.set_title("Popularity-direction energy decomposition")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _null_panel(ax: plt.Axes, null: np.ndarray, observed: float, name: str, title: str = "") -> None:
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    clipped = int(np.count_nonzero(null < _NULL_FLOOR))
    ax.hist(np.maximum(null, _NULL_FLOOR), bins=60, color="0.6")
    ax.axvline(observed, color="C3", lw=2, label=f"observed R_{name} = {observed:.4f}")
    exceed = int(np.count_nonzero(null >= observed))
    ax.set_title(f"{title}R_{name}: {exceed}/{null.size} permutations >= observed", fontsize=9)
    ax.set_xlabel(f"R_{name} under shuffled item labels" + (f" ({clipped} below {_NULL_FLOOR:g} drawn at it)"
                                                            if clipped else ""), fontsize=8)
    ax.legend(fontsize=8)


def plot_permutation_null(nulls: Mapping[str, np.ndarray], observed: Mapping[str, float],
                          path: str | os.PathLike) -> Path:
    """Histogram of each matched reduction's item-label permutation null, observed value marked."""
    names = list(nulls)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        _null_panel(ax, nulls[name], observed[name], name)
    return _save(fig, path)


def plot_permutation_nulls(arms: Mapping[str, tuple[Mapping[str, np.ndarray], Mapping[str, float]]],
                           path: str | os.PathLike) -> Path:
    """One row per compared arm (``label -> (nulls, observed)``): each matched reduction's null."""
    labels = list(arms)
    names = list(arms[labels[0]][0])
    fig, axes = plt.subplots(len(labels), len(names), figsize=(5 * len(names), 3.6 * len(labels)), squeeze=False)
    for row, label in zip(axes, labels):
        nulls, observed = arms[label]
        for ax, name in zip(row, names):
            _null_panel(ax, nulls[name], observed[name], name, f"{label}\n" if len(labels) > 1 else "")
    fig.tight_layout()
    return _save(fig, path)


def plot_arms(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike,
              measures: Sequence[str] = ("ndcg@10", "dir_frac", "shared_frac")) -> Path:
    """The arms side by side: one panel per measure, one bar per report row (mean over seeds,
    with the t interval over seeds as error bar where there is one)."""
    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 4.0), squeeze=False)
    labels = [row["label"] for row in summary]
    x = np.arange(len(labels))
    for ax, measure in zip(axes[0], measures):
        cells = [row.get(measure) or {} for row in summary]
        means = np.array([np.nan if c.get("mean") is None else c["mean"] for c in cells], dtype=np.float64)
        half = np.array([c["ci"]["half_width"] if c.get("ci") else 0.0 for c in cells], dtype=np.float64)
        ax.bar(x, np.nan_to_num(means), yerr=half if half.any() else None, capsize=3,
               color=[f"C{k % 10}" for k in range(len(labels))])
        ax.set_xticks(x, [label.replace(" (", "\n(") for label in labels], fontsize=7, rotation=30, ha="right")
        ax.set_title(measure, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    n = max((len((row.get(measures[0]) or {}).get("per_seed") or []) for row in summary), default=0)
    fig.suptitle(f"Arms side by side (mean over {n} seed{'s' if n != 1 else ''}"
                 + (", t interval" if n > 1 else "") + ")", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["plot_spectra", "plot_energy", "plot_permutation_null", "plot_permutation_nulls", "plot_arms"]
