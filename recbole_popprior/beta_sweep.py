"""``--beta-sweep``: serve one trained prior-separated model at several ``beta``, with no retraining
(docs/DESIGN.md §1).

``scores = h . e + beta * log p_hat``, and ``beta`` only enters at serving time: the sweep trains one
model (or takes one that is already trained, ``--checkpoint``) and evaluates it on the test set at
every ``beta``. Outputs, in the sweep's folder (``--output``, or ``<output>/beta_sweep-<model>-<dataset>-<time>``):

- ``beta_sweep.md``: one row per beta, accuracy first (NDCG leads); the measures that are the same at
  every beta (the energies of the learned dot product, the context count) are listed once above it;
- ``beta_sweep.csv``: every metric of every beta, one row per beta;
- ``beta_sweep.json``: the same rows and the settings, written last (its presence means the set is complete);
- ``run/``: the run's log (and, when the sweep trained the model, its ``model.pth``).

The set is committed as one (:mod:`recbole_popprior.staging`): a sweep that stops half-way leaves
the one in place as it was.
"""

from __future__ import annotations

import csv
import io
from logging import getLogger
from pathlib import Path
from typing import Any, Sequence

from recbole_popprior.compare import SEP, arm_config, dump_json, output_folder, output_set, train_arm
from recbole_popprior.errors import PopPriorError
from recbole_popprior.formatting import fmt, markdown_table
from recbole_popprior.quick_start import log_report_folder
from recbole_popprior.serving import sweep_beta
from recbole_popprior.trained import ENERGY_METRICS, restore_trained, trained_config
from recbole_popprior.staging import StagedSet
from recbole_popprior.utils import atomic_write, to_jsonable

#: the columns that lead the table, in this order (each ``<name>@<k>``); then the rest, by name
LEAD = ("ndcg", "recall", "mrr", "hit", "precision", "map", "itemcoverage", "averagepopularity", "giniindex",
        "shannonentropy", "tailpercentage", "headrecall", "midrecall", "tailrecall")


def run_beta_sweep(model: str | None, dataset: str | None, betas: Sequence[float],
                   config_file_list: list[str] | None = None, config_dict: dict | None = None,
                   output: str | Path | None = None, *, checkpoint: str | Path | None = None,
                   trust_pickle: bool = False) -> list[dict[str, Any]]:
    """Serve one prior-separated model at every ``beta``: trained here, or the one in ``checkpoint``.

    Returns one row per beta (RecBole's test metrics and the trained ``tau``).
    """
    if not betas:
        raise PopPriorError("--beta-sweep needs at least one beta value")
    config_dict = dict(config_dict or {})
    if checkpoint is None:
        probe = arm_config(model, dataset, config_file_list, config_dict, seed=None, baseline=False)
        out_dir = output_folder(output, probe["output"], "beta_sweep", probe["model"], probe["dataset"])
    else:
        config, state = trained_config(checkpoint, model, dataset, config_file_list, config_dict,
                                       trust_pickle=trust_pickle, metrics=ENERGY_METRICS)
        out_dir = output_folder(output, config["output"], "beta_sweep", config["model"], config["dataset"])
    with output_set(out_dir, "beta_sweep", "beta_sweep.json") as stage:
        if checkpoint is None:
            config = arm_config(model, dataset, config_file_list, config_dict, seed=int(probe["seed"]),
                                baseline=False, run_dir=stage.path("run"))
            pipe = train_arm(SEP, config).pipe
        else:
            config["run_dir"] = str(stage.path("run"))
            pipe = restore_trained(config, state, checkpoint)
        rows = sweep_beta(pipe.trainer, pipe.test_data, betas)
        tau = pipe.model.training_tau()
        for row in rows:
            row["tau"] = tau
        source = {"checkpoint": str(checkpoint) if checkpoint else None, "trained": checkpoint is None}
        write_sweep(stage, pipe.config["model"], pipe.config["dataset"], rows, source)
    return rows


def sweep_columns(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """``(table columns, constant columns)``: beta first, then :data:`LEAD`'s metrics, then the
    rest by name; a measure with the same value at every beta (of several) is a constant."""
    keys = sorted({k for row in rows for k in row} - {"beta"})
    constant = [k for k in keys if len(rows) > 1 and len({repr(row.get(k)) for row in rows}) == 1]
    varying = [k for k in keys if k not in constant]
    rank = {name: i for i, name in enumerate(LEAD)}
    varying.sort(key=lambda k: (rank.get(k.split("@")[0], len(LEAD)), k))
    return ["beta", *varying], constant


def sweep_markdown(model: str, dataset: str, rows: Sequence[dict[str, Any]], source: dict[str, Any]) -> str:
    columns, constant = sweep_columns(rows)
    where = f"the trained model in `{source['checkpoint']}`" if source.get("checkpoint") else "a model trained here"
    lines = [f"# Serve-time beta sweep: prior-separated {model} on {dataset}", "",
             f"Test set; {where}, served with scores h.e + beta log p_hat (no retraining). "
             "beta = tau is the model as trained; beta = 0 serves the PMI ranking.", ""]
    if constant:
        lines += ["The same at every beta (the learned dot product does not depend on beta):", ""]
        lines += [f"- `{k}` = {fmt(rows[0].get(k))}" for k in constant] + [""]
    lines += markdown_table(columns, [[fmt(row.get(c)) for c in columns] for row in rows])
    return "\n".join(lines) + "\n"


def write_sweep(stage: StagedSet, model: str, dataset: str, rows: list[dict[str, Any]],
                source: dict[str, Any] | None = None) -> dict[str, Path]:
    """``beta_sweep.{md,csv}`` into ``stage``, then the commit (``beta_sweep.json`` last: the set is
    complete); logs where."""
    source = source or {}
    columns, constant = sweep_columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns + constant, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns + constant})
    files = {}
    for name, text in (("md", sweep_markdown(model, dataset, rows, source)), ("csv", buffer.getvalue())):
        with atomic_write(stage.path(f"beta_sweep.{name}"), "w") as handle:
            handle.write(text)
        files[name] = stage.out_dir / f"beta_sweep.{name}"
    files["json"] = stage.commit(lambda handle: dump_json(handle, {"model": model, "dataset": dataset, **source,
                                                                   "rows": to_jsonable(rows)}))
    getLogger().info(f"beta sweep at {len(rows)} beta value(s): {files['md']}")
    log_report_folder(stage.out_dir, "beta_sweep.md, beta_sweep.csv, beta_sweep.json, run/")
    return files


__all__ = ["run_beta_sweep", "write_sweep", "sweep_columns", "sweep_markdown", "LEAD"]
