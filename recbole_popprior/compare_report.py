"""The comparison report: per-arm tables, intervals over seeds, paired tests and specificity (DESIGN §3.2).

Pure functions of the per-seed records that :func:`recbole_popprior.compare.run_compare`
collects (one record per training seed, every arm inside it), so the report can be rebuilt
and tested from hand-made records. The statistics come from
:mod:`recbole_popprior.evaluator.uncertainty`.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Sequence

from recbole_popprior.arms import REFERENCE
from recbole_popprior.evaluator.uncertainty import combined_p_value, mean_interval, paired_test

#: accuracy metrics of the table (``<name>@<topk>``), each also reported as arm minus standard
ACCURACY = ("ndcg", "recall", "mrr", "headrecall", "midrecall", "tailrecall", "itemcoverage",
            "averagepopularity")
#: per-arm columns of the energy table (``fit_ratio``: wall seconds of the arm's fit / standard's)
ENERGY_COLUMNS = ("dir_frac", "shared_frac", "emb_r1", "emb_erank", "fit_ratio")
#: per-arm single-model permutation test (DESIGN §3.1, "One model"), from the arm's EnergyState
SPECIFICITY_KEYS = ("p_value", "p_value_shared", "null_mean", "null_q95", "null_mean_shared", "null_q95_shared",
                    "shared_total_frac")
#: matched reduction of each non-standard arm against standard (DESIGN §3.1, "Two models")
REDUCTION_KEYS = ("R_dir", "R_shared", "p_value_dir", "p_value_shared", "p_iso_shared", "null_mean_dir",
                  "null_q95_dir", "null_mean_shared", "null_q95_shared")
_P_KEYS = ("p_value", "p_value_shared", "p_value_dir", "p_iso_shared")


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def seed_cell(values: Sequence[Any], confidence: float) -> dict[str, Any]:
    """Mean over seeds with its Student-t interval (``ci`` None with fewer than 2 finite seeds)."""
    finite = _finite(values)
    cell: dict[str, Any] = {"mean": None, "sd": None, "n": len(finite), "per_seed": list(values), "ci": None}
    if finite:
        interval = mean_interval(finite, confidence)
        cell["mean"] = interval.mean
        if interval.defined:
            cell["sd"] = interval.sd
            cell["ci"] = {"low": interval.low, "high": interval.high, "half_width": interval.half_width,
                          "confidence": confidence}
    return cell


def p_cell(values: Sequence[Any]) -> dict[str, Any]:
    """Per-seed p-values and their Fisher combination over seeds (None unless every seed has one)."""
    finite = _finite(values)
    combined = combined_p_value(finite) if finite and len(finite) == len(values) else None
    return {"per_seed": list(values), "combined": combined, "n": len(finite)}


def delta_cell(arm: Sequence[Any], reference: Sequence[Any], confidence: float) -> dict[str, Any]:
    """Arm minus standard, paired by seed: mean difference, its t interval and the paired t-test."""
    pairs = [(float(a), float(b)) for a, b in zip(arm, reference) if len(_finite([a, b])) == 2]
    cell: dict[str, Any] = {"mean_diff": None, "sd_diff": None, "n": len(pairs), "ci": None,
                            "statistic": None, "p_value": None}
    if not pairs:
        return cell
    test = paired_test([a for a, _ in pairs], [b for _, b in pairs], confidence)
    cell["mean_diff"] = test.mean_diff
    if test.defined:
        cell.update(sd_diff=test.sd_diff, statistic=test.statistic, p_value=test.p_value,
                    ci={"low": test.low, "high": test.high, "half_width": test.half_width, "confidence": confidence})
    return cell


# --------------------------------------------------------------------------------------
# The payload
# --------------------------------------------------------------------------------------
def summarise(model: str, dataset: str, arms: Sequence[Mapping[str, Any]], per_seed: Sequence[Mapping[str, Any]],
              *, topk: int, permutations: int, confidence: float) -> dict[str, Any]:
    """The ``compare.json`` payload (plus its ``markdown``) from the per-seed records.

    ``arms``: one entry per arm, standard first: ``name``, ``label``, ``rows`` (row keys,
    e.g. ``separated`` and ``separated_beta0``) and ``row_labels``. Each record holds per row
    ``metrics`` and ``energy``; per arm ``fit_seconds`` and ``specificity``; per non-standard
    arm ``reductions``.
    """
    accuracy = [f"{m}@{topk}" for m in ACCURACY]
    rows: list[dict[str, Any]] = []
    deltas: list[dict[str, Any]] = []
    for arm in arms:
        for key in arm["rows"]:
            row: dict[str, Any] = {"row": key, "arm": arm["name"], "label": arm["row_labels"][key]}
            for col in accuracy:
                row[col] = seed_cell([rec["metrics"][key].get(col) for rec in per_seed], confidence)
            for col in ENERGY_COLUMNS:
                row[col] = seed_cell([_energy_value(rec, arm["name"], key, col) for rec in per_seed], confidence)
            rows.append(row)
            if arm["name"] != REFERENCE:
                delta = {"row": key, "arm": arm["name"], "label": row["label"]}
                for col in accuracy:
                    delta[col] = delta_cell([rec["metrics"][key].get(col) for rec in per_seed],
                                            [rec["metrics"][REFERENCE].get(col) for rec in per_seed], confidence)
                deltas.append(delta)
    specificity = {}
    for arm in arms:
        entry: dict[str, Any] = {"label": arm["label"]}
        for key in SPECIFICITY_KEYS:
            values = [rec["specificity"][arm["name"]].get(key) for rec in per_seed]
            entry[key] = p_cell(values) if key in _P_KEYS else seed_cell(values, confidence)
        entry["p_missing"] = _missing_reasons([rec["specificity"][arm["name"]] for rec in per_seed])
        specificity[arm["name"]] = entry
    reductions = {}
    for arm in arms[1:]:
        entry = {"label": arm["label"]}
        for key in REDUCTION_KEYS:
            values = [rec["reductions"][arm["name"]].get(key) for rec in per_seed]
            entry[key] = p_cell(values) if key in _P_KEYS else seed_cell(values, confidence)
        entry["p_missing"] = _missing_reasons([rec["reductions"][arm["name"]] for rec in per_seed])
        reductions[arm["name"]] = entry
    payload = {
        "model": model, "dataset": dataset, "seeds": [rec["seed"] for rec in per_seed], "topk": topk,
        "permutations": permutations, "confidence": confidence,
        "arms": [{k: v for k, v in arm.items() if k != "row_labels"} for arm in arms],
        "columns": accuracy + list(ENERGY_COLUMNS), "summary": rows, "deltas": deltas,
        "specificity": specificity, "reductions": reductions, "per_seed": list(per_seed),
    }
    payload["markdown"] = compare_markdown(payload)
    return payload


def _missing_reasons(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The distinct reasons the seeds' records give for p-values they do not hold (``p_missing``)."""
    return sorted({str(rec["p_missing"]) for rec in records if rec.get("p_missing")})


def missing_p_lines(entries: Mapping[str, Mapping[str, Any]], keys: Sequence[str], what: str) -> list[str]:
    """One line per arm with a p-value missing in any seed, saying in which seeds and why: a
    p-value is never left out of the report silently."""
    lines = []
    for name, entry in entries.items():
        missing = {key: [i for i, p in enumerate(entry[key]["per_seed"]) if p is None or not math.isfinite(float(p))]
                   for key in keys}
        missing = {key: seeds for key, seeds in missing.items() if seeds}
        if not missing:
            continue
        which = "; ".join(f"{key} in seed {', '.join(str(i + 1) for i in seeds)}" for key, seeds in missing.items())
        why = "; ".join(entry.get("p_missing") or []) or "not computed (no reason was recorded)"
        lines.append(f"- {name}: no {what} p-value ({which}): {why}.")
    return lines


def _energy_value(record: Mapping[str, Any], arm: str, row: str, col: str) -> Any:
    if col == "fit_ratio":
        fit = record.get("fit_seconds", {})
        base = fit.get(REFERENCE)
        return fit.get(arm) / base if base and fit.get(arm) is not None else None
    return record["energy"][row].get(col)


# --------------------------------------------------------------------------------------
# Specificity in words
# --------------------------------------------------------------------------------------
def _p_text(cell: Mapping[str, Any]) -> str:
    return f"{cell['combined']:.3g}"


def specificity_lines(specificity: Mapping[str, Mapping[str, Any]], alpha: float) -> list[str]:
    """One sentence per arm on its own permutation tests (DESIGN §3.1 "One model") at level ``alpha``.

    The standard arm is expected to carry a significant popularity direction and the others
    not; a departure from that is said in bold. With several seeds the p-values are Fisher's
    combination over the seeds.
    """
    lines = []
    for name, entry in specificity.items():
        p_dir, p_sh = entry["p_value"], entry["p_value_shared"]
        if p_dir["combined"] is None or p_sh["combined"] is None:
            why = "; ".join(entry.get("p_missing") or []) or "a seed has no p-value"
            lines.append(f"- {name}: no combined permutation test ({why}).")
            continue
        how = f"; Fisher over {p_dir['n']} seeds" if p_dir["n"] > 1 else ""
        numbers = f"(p = {_p_text(p_dir)} for dir_frac, p = {_p_text(p_sh)} for the context-shared part{how})"
        sig_dir, sig_sh = p_dir["combined"] <= alpha, p_sh["combined"] <= alpha
        if name == REFERENCE:
            if sig_dir and sig_sh:
                lines.append(f"- the {name} arm carries a significant popularity direction {numbers}, as expected.")
            else:
                lines.append(f"- **the {name} arm shows no significant popularity "
                             f"{'direction' if not sig_dir else 'context-shared energy'}** {numbers}: "
                             "the matched reductions have little popularity to remove.")
        elif sig_dir:
            lines.append(f"- **the {name} arm still carries a significant popularity direction** {numbers}.")
        elif sig_sh:
            lines.append(f"- **the {name} arm still carries significant context-shared popularity energy** "
                         f"{numbers}.")
        else:
            lines.append(f"- the {name} arm carries no significant popularity direction {numbers}.")
    return lines


# --------------------------------------------------------------------------------------
# Markdown and CSV
# --------------------------------------------------------------------------------------
def _num(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


def format_cell(cell: Mapping[str, Any]) -> str:
    """``mean [low, high]`` (the t interval over seeds), or the mean alone with one seed."""
    if cell["mean"] is None:
        return "n/a"
    if cell["ci"] is None:
        return _num(cell["mean"])
    return f"{_num(cell['mean'])} [{_num(cell['ci']['low'])}, {_num(cell['ci']['high'])}]"


def format_delta(cell: Mapping[str, Any]) -> str:
    if cell["mean_diff"] is None:
        return "n/a"
    text = f"{cell['mean_diff']:+.4f}"
    if cell["ci"] is None:
        return text
    return f"{text} [{cell['ci']['low']:+.4f}, {cell['ci']['high']:+.4f}], p = {cell['p_value']:.3g}"


def _p_list(cell: Mapping[str, Any]) -> str:
    return ", ".join("n/a" if p is None or not math.isfinite(p) else f"{p:.4g}" for p in cell["per_seed"])


def _combined(cell: Mapping[str, Any]) -> str:
    if cell["combined"] is None:
        return "n/a"
    return f"{cell['combined']:.3g}" if cell["n"] > 1 else "(1 seed)"


def compare_markdown(payload: Mapping[str, Any]) -> str:
    seeds, conf = payload["seeds"], payload["confidence"]
    n = len(seeds)
    arms = payload["arms"]
    accuracy, energy_cols = payload["columns"][:len(ACCURACY)], payload["columns"][len(ACCURACY):]
    spread = (f"mean [{conf:.0%} t-interval over {n} seeds]" if n > 1 else "1 seed: no interval")
    lines = [f"# {payload['model']} on {payload['dataset']}: " + " vs ".join(a["name"] for a in arms), "",
             f"Seeds {seeds}; cells: {spread}. Every arm has the same config, data split, seed and test "
             "contexts; arms differ only by their overrides.", ""]
    lines += [f"- {a['name']}: {a['label']}" + (f" {a['overrides']}" if a.get("overrides") else "") for a in arms]
    lines += ["", "## Accuracy", "", "| model | " + " | ".join(accuracy) + " |", "|---" * (len(accuracy) + 1) + "|"]
    for row in payload["summary"]:
        lines.append(f"| {row['label']} | " + " | ".join(format_cell(row[c]) for c in accuracy) + " |")
    how = (f"mean difference [{conf:.0%} t-interval], paired t-test p over {n} seed pairs" if n > 1
           else "1 seed: no interval, no test")
    lines += ["", f"## Accuracy minus {REFERENCE} ({how})", "",
              "| model | " + " | ".join(accuracy) + " |", "|---" * (len(accuracy) + 1) + "|"]
    for row in payload["deltas"]:
        lines.append(f"| {row['label']} | " + " | ".join(format_delta(row[c]) for c in accuracy) + " |")
    lines += ["", "## Popularity energy, embedding spectrum, training time", "",
              "`fit_ratio`: wall seconds of the arm's `fit` / the standard arm's, same seed.", "",
              "| model | " + " | ".join(energy_cols) + " |", "|---" * (len(energy_cols) + 1) + "|"]
    for row in payload["summary"]:
        lines.append(f"| {row['label']} | " + " | ".join(format_cell(row[c]) for c in energy_cols) + " |")
    B = payload["permutations"]
    fisher = " Fisher's method combines the seeds' p-values (independent trainings)." if n > 1 else ""
    lines += ["", f"## Specificity: each arm against its own null (B = {B} item-label permutations)", "",
              "p-values of the arm's `dir_frac` and of its context-shared energy `E_shared / T`." + fisher, "",
              "| arm | p dir_frac per seed | p shared per seed | combined p dir_frac | combined p shared |",
              "|---|---|---|---|---|"]
    for name, entry in payload["specificity"].items():
        lines.append(f"| {name} | {_p_list(entry['p_value'])} | {_p_list(entry['p_value_shared'])} | "
                     f"{_combined(entry['p_value'])} | {_combined(entry['p_value_shared'])} |")
    lines += [""] + specificity_lines(payload["specificity"], 1.0 - conf)
    lines += missing_p_lines(payload["specificity"], ("p_value", "p_value_shared"), "single-model")
    lines += ["", f"## Matched reductions against {REFERENCE} (same contexts, same l; B = {B} orthogonalised "
              "item-label permutations)", "",
              f"R = 1 - E(arm) / E({REFERENCE}); cells: {spread}." + fisher, "",
              "| arm | measure | R | p per seed | combined p | p_iso per seed | null mean | null 95th pct |",
              "|---|---|---|---|---|---|---|---|"]
    for name, entry in payload["reductions"].items():
        for m in ("dir", "shared"):
            iso = _p_list(entry["p_iso_shared"]) if m == "shared" else ""
            lines.append(f"| {name} | R_{m} | {format_cell(entry[f'R_{m}'])} | {_p_list(entry[f'p_value_{m}'])} | "
                         f"{_combined(entry[f'p_value_{m}'])} | {iso} | {format_cell(entry[f'null_mean_{m}'])} | "
                         f"{format_cell(entry[f'null_q95_{m}'])} |")
    dropped = missing_p_lines(payload["reductions"], ("p_value_dir", "p_value_shared"), "matched-reduction")
    if dropped:
        lines += [""] + dropped
    return "\n".join(lines) + "\n"


def compare_csv(payload: Mapping[str, Any]) -> str:
    """One line per (row, measure): mean, sd, t interval, p-value (paired t or Fisher), per-seed values."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "model", "metric", "mean", "sd", "n_seeds", "ci_low", "ci_high", "confidence",
                     "p_value", "per_seed"])

    def seeds(values: Sequence[Any]) -> str:
        return ";".join("" if v is None else repr(float(v)) for v in values)

    def cell_line(row: str, label: str, metric: str, cell: Mapping[str, Any]) -> None:
        ci = cell["ci"] or {}
        writer.writerow([row, label, metric, _blank(cell["mean"]), _blank(cell["sd"]), cell["n"],
                         _blank(ci.get("low")), _blank(ci.get("high")), ci.get("confidence", ""), "",
                         seeds(cell["per_seed"])])

    def p_line(row: str, label: str, metric: str, cell: Mapping[str, Any]) -> None:
        writer.writerow([row, label, metric, "", "", cell["n"], "", "", "", _blank(cell["combined"]),
                         seeds(cell["per_seed"])])

    for row in payload["summary"]:
        for col in payload["columns"]:
            cell_line(row["row"], row["label"], col, row[col])
    for row in payload["deltas"]:
        for col in payload["columns"][:len(ACCURACY)]:
            cell = row[col]
            ci = cell["ci"] or {}
            writer.writerow([row["row"], row["label"], f"delta_{col}", _blank(cell["mean_diff"]),
                             _blank(cell["sd_diff"]), cell["n"], _blank(ci.get("low")), _blank(ci.get("high")),
                             ci.get("confidence", ""), _blank(cell["p_value"]), ""])
    for name, entry in payload["specificity"].items():
        for key in SPECIFICITY_KEYS:
            (p_line if key in _P_KEYS else cell_line)(name, entry["label"], f"own_{key}", entry[key])
    for name, entry in payload["reductions"].items():
        for key in REDUCTION_KEYS:
            (p_line if key in _P_KEYS else cell_line)(name, entry["label"], key, entry[key])
    return buffer.getvalue()


def _blank(x: Any) -> Any:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


__all__ = ["summarise", "seed_cell", "p_cell", "delta_cell", "specificity_lines", "compare_markdown",
           "compare_csv", "format_cell", "format_delta", "ACCURACY", "ENERGY_COLUMNS"]
