"""The results of a tuning run: one row per model (best value, best tau, best beta, trial
counts) as CSV, JSON and Markdown, and Optuna's plots as HTML (plotly) and PNG (matplotlib).

Everything is read back from the study storage, so the report covers every worker's trials.
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable

import matplotlib
import matplotlib.pyplot as plt
import optuna
import plotly.io as pio
from optuna import visualization as vis
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import matplotlib as vis_mpl
from matplotlib.ticker import MaxNLocator
from plotly.offline import get_plotlyjs

from recbole_popprior.formatting import fmt
from recbole_popprior.utils import atomic_write, to_jsonable, write_json

matplotlib.use("Agg")  # files only, no display
logger = logging.getLogger("recbole_popprior.tuning")

#: the table's columns, in order
COLUMNS = ("model", "objective", "best_value", "best_tau", "best_beta", "best_alpha", "shared_frac",
           "best_trial", "complete", "pruned", "failed", "running", "test_value", "checkpoint")


def _best_trial(study: optuna.Study, multi_objective: bool, bigger: bool) -> FrozenTrial | None:
    """The best completed trial; with two objectives, the Pareto trial best on the first one."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return None
    if not multi_objective:
        return study.best_trial
    front = study.best_trials
    return (max if bigger else min)(front, key=lambda t: t.values[0])


def summarize(study: optuna.Study, model: str, metric: str, bigger: bool,
              multi_objective: bool = False) -> dict[str, Any]:
    """One table row for ``study`` (plus, when multi-objective, its Pareto front)."""
    counts = {state: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    best = _best_trial(study, multi_objective, bigger)
    row: dict[str, Any] = {
        "model": model, "study": study.study_name, "objective": metric,
        "complete": counts[TrialState.COMPLETE], "pruned": counts[TrialState.PRUNED],
        "failed": counts[TrialState.FAIL], "running": counts[TrialState.RUNNING] + counts[TrialState.WAITING],
        "best_value": None, "best_tau": None, "best_beta": None, "best_alpha": None, "shared_frac": None,
        "best_trial": None, "test_value": None, "checkpoint": None, "params": {},
    }
    if best is not None:
        attrs = best.user_attrs
        row.update({
            "best_value": best.values[0], "best_trial": best.number, "params": dict(best.params),
            "best_tau": best.params.get("prior_tau", attrs.get("tau")), "best_beta": attrs.get("best_beta"),
            "best_alpha": best.params.get("prior_alpha"), "shared_frac": attrs.get("shared_frac"),
            "test_value": (attrs.get("test_result") or {}).get(metric), "checkpoint": attrs.get("checkpoint"),
        })
    if multi_objective:
        row["pareto"] = [{"trial": t.number, "values": list(t.values), "params": dict(t.params),
                          "best_beta": t.user_attrs.get("best_beta")} for t in study.best_trials]
    failures = [{"trial": t.number, "reason": t.user_attrs.get("fail_reason", "unknown")}
                for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
    if failures:
        row["failures"] = failures
    return row


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return fmt(value) if math.isfinite(value) else str(value)
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    """A GitHub Markdown table of ``rows``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def empty_column_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Why a column of the summary is empty, in words (one line per reason)."""
    notes = []
    if any(row.get("best_trial") is None for row in rows):
        notes.append("A model with no completed trial has no best_* values, test_value or checkpoint: its trials "
                     "were pruned, failed or are still running (see the counts; summary.json lists each failure's "
                     "reason).")
    if any(row.get("best_trial") is not None and row.get("shared_frac") is None for row in rows):
        notes.append("shared_frac is empty: it comes from the PopEnergy metric on validation, which these trials "
                     "did not compute. Add PopEnergy to `metrics`, or tune with --multi-objective (which adds it).")
    return notes


def write_tables(rows: list[dict[str, Any]], folder: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """``summary.csv``, ``summary.json`` and ``summary.md`` in ``folder`` (atomic writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / "summary.csv", "json": folder / "summary.json", "md": folder / "summary.md"}
    with atomic_write(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in COLUMNS})  # full precision
    write_json(paths["json"], {**meta, "models": rows})
    with atomic_write(paths["md"], "w") as handle:
        handle.write(f"# Tuning study `{meta['study_name']}` on `{meta['dataset']}`\n\n")
        handle.write(f"Objective: {meta['objective']} on validation, at the best serving beta per trial; "
                     "test_value: the best trial's test score at that beta.\n\n")
        handle.write(markdown_table(rows))
        notes = empty_column_notes(rows)
        if notes:
            handle.write("\n" + "\n".join(f"- {note}" for note in notes) + "\n")
    return paths


# --- plots ---------------------------------------------------------------------------------
def _save_plotly(fig: Any, path: Path) -> None:
    script = path.parent / "plotly.min.js"
    if not script.exists():
        with atomic_write(script, "w") as handle:
            handle.write(get_plotlyjs())
    with atomic_write(path, "w") as handle:
        handle.write(pio.to_html(fig, include_plotlyjs="directory"))


def _save_matplotlib(ax: Any, path: Path) -> None:
    figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


#: below this many completed trials the parameter importances are said to be rough
FEW_TRIALS = 10


def _titles(study: optuna.Study, model: str, metric: str, n_complete: int) -> dict[str, str]:
    few = (f" (from {n_complete} completed trial{'s' if n_complete != 1 else ''}: rough, "
           f"needs {FEW_TRIALS}+)" if n_complete < FEW_TRIALS else f" (from {n_complete} completed trials)")
    name = study.study_name  # <study-name>.<Model>: it names the model already
    head = name if name.endswith(f".{model}") else f"{name}, {model}"
    return {"history": f"{head}: validation {metric} per trial",
            "importances": f"{head}: parameter importances for {metric}{few}",
            "pareto": f"{head}: Pareto front, {metric} vs shared_frac"}


def _integer_trials(ax: Any) -> None:
    """Trial numbers are integers: no 0.5 ticks on the trial axis."""
    for axis in ax.flat if hasattr(ax, "flat") else [ax]:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _dress_plotly(fig: Any, name: str, title: str, n_trials: int) -> Any:
    fig.update_layout(title=title)
    if name == "history":
        fig.update_xaxes(title="trial", tickformat="d", dtick=max(1, math.ceil(n_trials / 10)))
    return fig


def _dress_matplotlib(ax: Any, name: str, title: str) -> Any:
    first = ax.flat[0] if hasattr(ax, "flat") else ax
    for side in ("left", "right"):  # Optuna's own generic title sits on the left
        first.set_title("", loc=side)
    first.set_title(title.replace(": ", ":\n", 1), fontsize=9)
    if name == "history":
        _integer_trials(ax)
        first.set_xlabel("trial")
    return ax


def write_plots(study: optuna.Study, folder: Path, model: str, metric: str,
                multi_objective: bool = False) -> list[Path]:
    """History, parameter importances and (multi-objective) Pareto front, as HTML and PNG; each
    titled with the study and the model, the history with integer trial ticks, the importances
    said to be rough below :data:`FEW_TRIALS` completed trials.

    A plot that cannot be drawn (no completed trial, a single trial for importances, a search
    space that never varied) is skipped with a logged note.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    target: Callable[[FrozenTrial], float] | None = (lambda t: t.values[0]) if multi_objective else None
    plots: list[tuple[str, Callable[..., Any], dict[str, Any], int]] = [
        ("history", "plot_optimization_history", {"target": target, "target_name": metric}, 1),
        ("importances", "plot_param_importances", {"target": target, "target_name": metric}, 2),
    ]
    if multi_objective:
        plots.append(("pareto", "plot_pareto_front", {"target_names": [metric, "shared_frac"]}, 1))
    varying = {name for name in {k for t in complete for k in t.params}
               if len({repr(t.params.get(name)) for t in complete}) > 1}
    written: list[Path] = []
    for name, func, kwargs, needed in plots:
        if len(complete) < needed or (name == "importances" and not varying):
            logger.info(f"{model}: skipping the {name} plot ({len(complete)} completed trial(s)"
                        f"{', no parameter varied' if name == 'importances' and not varying else ''})")
            continue
        stem = folder / f"{model}_{name}"
        title = _titles(study, model, metric, len(complete))[name]
        n_trials = len(study.get_trials(deepcopy=False))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _save_plotly(_dress_plotly(getattr(vis, func)(study, **kwargs), name, title, n_trials),
                             stem.with_suffix(".html"))
                written.append(stem.with_suffix(".html"))
                _save_matplotlib(_dress_matplotlib(getattr(vis_mpl, func)(study, **kwargs), name, title),
                                 stem.with_suffix(".png"))
                written.append(stem.with_suffix(".png"))
        except Exception as exc:  # noqa: BLE001 - a plot must never fail the study
            logger.info(f"{model}: skipping the {name} plot: {type(exc).__name__}: {exc}")
    return written


def write_report(studies: dict[str, optuna.Study], folder: Path, meta: dict[str, Any],
                 bigger: bool, multi_objective: bool = False, plots: bool = True) -> dict[str, Any]:
    """Summaries, tables and plots for every model's study; returns the JSON payload."""
    rows = [summarize(study, model, meta["objective"], bigger, multi_objective) for model, study in studies.items()]
    paths = write_tables(rows, folder, meta)
    plot_paths: list[Path] = []
    if plots:
        for model, study in studies.items():
            plot_paths += write_plots(study, folder / "plots", model, meta["objective"], multi_objective)
    logger.info("tuning summary\n" + markdown_table(rows).rstrip())
    for note in empty_column_notes(rows):
        logger.info(note)
    return to_jsonable({**meta, "models": rows, "files": {k: str(v) for k, v in paths.items()},
                        "plots": [str(p) for p in plot_paths]})

