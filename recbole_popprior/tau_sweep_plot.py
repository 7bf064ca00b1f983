"""The tau sweep's figure: ``dir_frac`` and NDCG@K against tau, one column per sweep (docs/DESIGN.md §12).

Takes any number of sweep payloads (``sweep.json`` of :mod:`recbole_popprior.tau_sweep`), one
column each, so a later data set's sweep is one more file. Points are means over seeds with their
t intervals; the learned tau is a star at its mean learned value (with that value's interval);
on the synthetic data, the population optimum's curve (dashed) and the true PMI (dotted) are drawn
with them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from recbole_popprior.errors import PopPriorError  # noqa: E402
from recbole_popprior.utils import atomic_write  # noqa: E402

_STYLE = {"estimate": ("tab:blue", "o", r"separated, $\hat p$ estimated"),
          "truth": ("tab:orange", "s", "separated, true p (drawn 0.03 to the right)")}
_DODGE = {"estimate": 0.0, "truth": 0.03, "reference": 0.0}  # so the two priors' points do not hide each other
_REFERENCE = ("black", "D", "RecBole's model (tau = 0)")


def _points(payload: Mapping[str, Any], col: str, source: str) -> list[tuple[float, float, Any, Any, bool]]:
    """``(x, y, y interval, x interval, learned)`` of the static runs of one prior source."""
    out = []
    for row in payload["rows"]:
        variant, cell, tau = row.get("variant"), row.get(col), row.get("tau")
        if variant is None or cell is None or tau is None or variant.get("mode") != "static":
            continue
        reference = variant["tau"] == 0.0
        if (reference and source != "reference") or (not reference and variant.get("source") != source):
            continue
        dodge = _DODGE[source]
        out.append((tau["mean"] + dodge, cell["mean"], cell.get("ci"),
                    None if not tau.get("ci") else [tau["ci"][0] + dodge, tau["ci"][1] + dodge],
                    variant["tau"] == "learned"))
    return out


def _draw(ax: Any, points: Sequence[tuple], color: str, marker: str, label: str,
          start: Sequence[tuple] = ()) -> None:
    """Points with their intervals; a line through the fixed taus, from the reference (``start``) on."""
    fixed = sorted([p for p in points if not p[4]] + [p[:4] + (False,) for p in start], key=lambda p: p[0])
    for x, y, yci, xci, learned in points:
        yerr = None if not yci else [[y - yci[0]], [yci[1] - y]]
        xerr = None if not (learned and xci) else [[x - xci[0]], [xci[1] - x]]
        ax.errorbar([x], [y], yerr=yerr, xerr=xerr, color=color, marker="*" if learned else marker,
                    ms=13 if learned else 6, capsize=3, lw=1, ls="none", zorder=3,
                    label=(f"{label}, learned tau" if learned else None))
    if len(fixed) > len(start):
        ax.plot([p[0] for p in fixed], [p[1] for p in fixed], color=color, marker=marker, ms=6, lw=1.2,
                label=label, zorder=2)


def _panel(ax_dir: Any, ax_ndcg: Any, payload: Mapping[str, Any], title: str | None) -> None:
    k = payload["topk"]
    for source in ("estimate", "truth"):
        color, marker, label = _STYLE[source]
        for ax, col in ((ax_dir, "dir_frac"), (ax_ndcg, "ndcg")):
            _draw(ax, _points(payload, col, source), color, marker, label, _points(payload, col, "reference"))
    for ax, col in ((ax_dir, "dir_frac"), (ax_ndcg, "ndcg")):
        _draw(ax, _points(payload, col, "reference"), *_REFERENCE)
    opt = payload.get("optimum")
    if opt:
        for source in ("estimate", "truth"):
            ax_dir.plot(opt["tau"], opt[source], color=_STYLE[source][0], ls="--", lw=1, alpha=0.8,
                        label=f"population optimum, {'estimated' if source == 'estimate' else 'true'} prior")
    truth = next((row for row in payload["rows"] if row["key"] == "true PMI"), None)
    if truth is not None:
        ax_dir.axhline(truth["dir_frac"]["mean"], color="tab:green", ls=":", lw=1.5, label="true PMI (floor)")
        ax_ndcg.axhline(truth["ndcg"]["mean"], color="tab:green", ls=":", lw=1.5,
                        label="Bayes ranking log p(i|c)")
    ax_dir.set_yscale("log")
    ax_dir.set_ylabel("dir_frac (log scale)")
    ax_ndcg.set_ylabel(f"test NDCG@{k} (served at beta = tau)")
    ax_ndcg.set_xlabel("tau (training weight of log prior)")
    seeds = len(payload.get("seeds", []))
    ax_dir.set_title(f"{title or payload['model'] + ' on ' + payload['dataset']} "
                     f"({seeds} seed{'s' if seeds != 1 else ''})", fontsize=10)
    for ax in (ax_dir, ax_ndcg):
        ax.grid(alpha=0.3, which="both")



def plot_tau_sweep(payloads: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                   titles: Sequence[str] | None = None) -> Path:
    """One column per sweep: ``dir_frac`` (top) and NDCG@K (bottom) against tau; a PNG at ``path``.
    ``titles``: one per sweep (default ``<model> on <dataset>``)."""
    if not payloads:
        raise PopPriorError("the tau-sweep figure needs at least one sweep.json")
    if titles is not None and len(titles) != len(payloads):
        raise PopPriorError(f"{len(titles)} titles for {len(payloads)} sweeps")
    fig, axes = plt.subplots(2, len(payloads), figsize=(5.6 * len(payloads), 7.4), squeeze=False, sharex="col")
    for column, payload in enumerate(payloads):
        _panel(axes[0][column], axes[1][column], payload, titles[column] if titles else None)
    legend: dict[str, Any] = {}
    for ax in axes.ravel():  # one legend for the figure: every entry once
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    level = int(round(100 * float(payloads[0].get("confidence", 0.95))))
    fig.suptitle(f"Popularity direction of the learned scores and accuracy against tau (mean, {level}% t "
                 "interval over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=min(4, len(legend)),
               fontsize=8, frameon=False)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


__all__ = ["plot_tau_sweep"]
