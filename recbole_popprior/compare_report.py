"""The comparison report: headline, per-arm tables, intervals over seeds, paired tests and specificity (DESIGN §3.2).

Pure functions of the per-seed records that :func:`recbole_popprior.compare.run_compare`
collects (one record per training seed, every arm inside it), so the report can be rebuilt
and tested from hand-made records. The statistics come from
:mod:`recbole_popprior.evaluator.uncertainty`: every interval stays inside the range of its
quantity (:data:`SCALE_OF`) and none is shown below ``MIN_SEEDS`` seeds; numbers are printed by
:mod:`recbole_popprior.formatting` (three significant figures, integers as integers).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Sequence

from recbole_popprior.arms import REFERENCE
from recbole_popprior.evaluator.uncertainty import (MIN_SEEDS, SCALES, combined_p_value, paired_test,
                                                    range_interval, seeds_note)
from recbole_popprior.formatting import fmt, fmt_p, markdown_table

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
#: the range of each reported quantity, which its interval respects (uncertainty.SCALES);
#: everything else lies in [0, 1]
SCALE_OF = {"averagepopularity": "positive", "emb_erank": "positive", "fit_ratio": "positive",
            **{key: "reduction" for key in REDUCTION_KEYS if key not in _P_KEYS}}
_SAME_MODEL = "(same model)"
_NO_SPREAD = 1e-9  # relative spread below which seeds count as all equal (float rounding)


def legend(n_seeds: int, short: bool = False) -> tuple[str, str]:
    """One-line meanings of the headline's measures, for a reader without the docs (``short``:
    only those of the console's table, ``dir_frac`` and ``R_dir``)."""
    over = " (Fisher's method over the seeds)" if n_seeds > 1 else ""
    if short:
        return ("dir_frac: the share of the item-centred score energy that lies along the popularity direction "
                "log p(i).",
                "R_dir: 1 - E_dir(model) / E_dir(standard) on the same test contexts, the matched reduction of "
                f"that energy; p: item-label permutation test{over}.")
    return ("dir_frac: the share of the item-centred score energy that lies along the popularity direction "
            "log p(i); shared_frac: the part of it that every context shares.",
            "R_dir, R_shared: the matched reduction 1 - E(model) / E(standard) of those energies on the same "
            f"test contexts; p: item-label permutation test{over}.")


def scale_of(name: str) -> str:
    """The range (``uncertainty.SCALES``) of a report column: ``ndcg@10`` -> ``unit``."""
    return SCALE_OF.get(name.split("@")[0], "unit")


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def seed_cell(values: Sequence[Any], confidence: float, scale: str = "unit") -> dict[str, Any]:
    """Mean over seeds with an interval inside the quantity's range (``ci`` None below
    ``MIN_SEEDS`` seeds or without spread; ``note`` says why)."""
    finite = _finite(values)
    cell: dict[str, Any] = {"mean": None, "sd": None, "n": len(finite), "per_seed": list(values), "ci": None,
                            "note": None}
    if not finite:
        return cell
    low, high = SCALES[scale][:2]
    if any(not low <= v <= high for v in finite):  # outside its range by rounding, or not what it seemed
        scale = "real"
    interval = range_interval(finite, scale, confidence)
    cell["mean"] = interval.mean
    if len(finite) > 1:
        cell["sd"] = float(sum((v - interval.mean) ** 2 for v in finite) / (len(finite) - 1)) ** 0.5
    cell["note"] = interval.note
    if interval.low is not None:
        cell["ci"] = {"low": interval.low, "high": interval.high, "confidence": confidence, "scale": scale,
                      "cut": interval.cut}
    return cell


def p_cell(values: Sequence[Any]) -> dict[str, Any]:
    """Per-seed p-values and their Fisher combination over seeds (None unless every seed has one)."""
    finite = _finite(values)
    combined = combined_p_value(finite) if finite and len(finite) == len(values) else None
    return {"per_seed": list(values), "combined": combined, "n": len(finite)}


def delta_cell(arm: Sequence[Any], reference: Sequence[Any], confidence: float) -> dict[str, Any]:
    """Arm minus standard, paired by seed: mean difference, its t interval and the paired t-test
    (from ``MIN_SEEDS`` seeds, and only when the difference varies over the seeds)."""
    pairs = [(float(a), float(b)) for a, b in zip(arm, reference) if len(_finite([a, b])) == 2]
    cell: dict[str, Any] = {"mean_diff": None, "sd_diff": None, "n": len(pairs), "ci": None,
                            "statistic": None, "p_value": None, "note": None}
    if not pairs:
        return cell
    test = paired_test([a for a, _ in pairs], [b for _, b in pairs], confidence)
    cell["mean_diff"] = test.mean_diff
    if len(pairs) < MIN_SEEDS:
        cell["note"] = f"n = {len(pairs)} seed{'s' if len(pairs) != 1 else ''}: no interval, no test"
    elif test.sd_diff <= _NO_SPREAD * max(abs(v) for pair in pairs for v in pair):
        # a difference that is the same in every seed (up to rounding) has no spread to test: a t
        # statistic of 1e16 and p = 1e-32 (or scipy's limit p = 0) would say nothing
        cell["note"] = f"the same difference in all {len(pairs)} seeds: no interval, no test"
    else:
        cell.update(sd_diff=test.sd_diff, statistic=test.statistic, p_value=test.p_value,
                    ci={"low": test.low, "high": test.high, "confidence": confidence})
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
            row: dict[str, Any] = {"row": key, "arm": arm["name"], "label": arm["row_labels"][key],
                                   "same_model_as": arm["name"] if key != arm["name"] else None}
            for col in accuracy:
                row[col] = seed_cell([rec["metrics"][key].get(col) for rec in per_seed], confidence, scale_of(col))
            for col in ENERGY_COLUMNS:
                row[col] = seed_cell([_energy_value(rec, arm["name"], key, col) for rec in per_seed], confidence,
                                     scale_of(col))
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
            entry[key] = p_cell(values) if key in _P_KEYS else seed_cell(values, confidence, scale_of(key))
        entry["p_missing"] = _missing_reasons([rec["specificity"][arm["name"]] for rec in per_seed])
        specificity[arm["name"]] = entry
    reductions = {}
    for arm in arms[1:]:
        entry = {"label": arm["label"]}
        for key in REDUCTION_KEYS:
            values = [rec["reductions"][arm["name"]].get(key) for rec in per_seed]
            entry[key] = p_cell(values) if key in _P_KEYS else seed_cell(values, confidence, scale_of(key))
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
# Cells in words
# --------------------------------------------------------------------------------------
def format_cell(cell: Mapping[str, Any]) -> str:
    """``mean [low, high]`` (``†``: cut at a bound of the range, a seed sits on it), or the mean alone."""
    if cell["mean"] is None:
        return "n/a"
    if cell["ci"] is None:
        return fmt(cell["mean"])
    cut = "†" if cell["ci"].get("cut") else ""
    return f"{fmt(cell['mean'])} [{fmt(cell['ci']['low'])}, {fmt(cell['ci']['high'])}]{cut}"


def format_delta(cell: Mapping[str, Any]) -> str:
    """``+mean [low, high], p = ...`` (paired t over seeds), or the mean difference alone."""
    if cell["mean_diff"] is None:
        return "n/a"
    text = fmt(cell["mean_diff"], sign=True)
    if cell["ci"] is None:
        return text
    return (f"{text} [{fmt(cell['ci']['low'], sign=True)}, {fmt(cell['ci']['high'], sign=True)}], "
            f"p = {fmt_p(cell['p_value'])}")


def permutation_p(p: Any, permutations: int) -> str:
    """A permutation p-value; at its floor ``1/(B+1)`` it is written so (no smaller p is possible)."""
    if p is None or not math.isfinite(float(p)):
        return "n/a"
    if permutations > 0 and abs(float(p) * (permutations + 1) - 1.0) < 1e-9:
        return f"1/{permutations + 1}"
    return fmt_p(p)


def _p_list(cell: Mapping[str, Any], permutations: int) -> str:
    return ", ".join(permutation_p(p, permutations) for p in cell["per_seed"])


def _combined(cell: Mapping[str, Any], permutations: int) -> str:
    if cell["combined"] is None:
        return "n/a"
    return fmt_p(cell["combined"]) if cell["n"] > 1 else permutation_p(cell["combined"], permutations)


def specificity_lines(specificity: Mapping[str, Mapping[str, Any]], alpha: float, permutations: int = 0) -> list[str]:
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
        numbers = (f"(p = {_combined(p_dir, permutations)} for dir_frac, p = {_combined(p_sh, permutations)} "
                   f"for the context-shared part{how})")
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
def _reduction_text(payload: Mapping[str, Any], arm: str, measure: str) -> str:
    entry = payload["reductions"].get(arm)
    if entry is None:
        return ""
    return f"{format_cell(entry[f'R_{measure}'])} (p = {_combined(entry[f'p_value_{measure}'], payload['permutations'])})"


def _spread(payload: Mapping[str, Any]) -> str:
    n, conf = len(payload["seeds"]), payload["confidence"]
    if n == 1:
        return f"the value of that seed ({seeds_note(1)}; intervals from {MIN_SEEDS} seeds on)"
    if n < MIN_SEEDS:
        return f"mean over the seeds ({seeds_note(n)}; intervals from {MIN_SEEDS} seeds on)"
    return (f"mean [{conf:.0%} interval over {n} seeds: Student t on the logit scale for quantities in [0, 1], "
            "on the log scale for positive ones and for the energy ratio 1 - R, mapped back]")


def headline_rows(payload: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The headline table: per row NDCG@k, dir_frac and the matched reduction R_dir (with its p)."""
    k = payload["topk"]
    header = ["model", f"NDCG@{k}", "dir_frac", f"R_dir vs {REFERENCE} (p)"]
    rows = []
    for row in payload["summary"]:
        same = row.get("same_model_as")
        rows.append([row["label"], format_cell(row[f"ndcg@{k}"]), _SAME_MODEL if same else format_cell(row["dir_frac"]),
                     "" if same else _reduction_text(payload, row["arm"], "dir")])
    return header, rows


def headline_text(payload: Mapping[str, Any], report: str | None = None) -> str:
    """A few plain lines for the console: the headline table, its legend and where the report is."""
    header, rows = headline_rows(payload)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    seeds, conf = payload["seeds"], payload["confidence"]
    n = len(seeds)
    if n == 1:
        how = f"seed {seeds[0]} (one seed: no interval; intervals from {MIN_SEEDS} seeds on, --seeds={MIN_SEEDS})"
    elif n < MIN_SEEDS:
        how = f"mean of seeds {', '.join(map(str, seeds))} ({seeds_note(n)}; intervals from {MIN_SEEDS} seeds on)"
    else:
        how = f"mean [{conf:.0%} interval] over seeds {', '.join(map(str, seeds))}"
    lines = [f"{payload['model']} on {payload['dataset']}, test set, {how}:", ""]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines += ["", *legend(n, short=True)]
    if report:
        lines.append(f"full report: {report}")
    return "\n".join(lines)


def compare_markdown(payload: Mapping[str, Any]) -> str:
    seeds, conf = payload["seeds"], payload["confidence"]
    n, B = len(seeds), payload["permutations"]
    arms, k = payload["arms"], payload["topk"]
    accuracy, energy_cols = payload["columns"][:len(ACCURACY)], payload["columns"][len(ACCURACY):]
    spread = _spread(payload)
    lines = [f"# {payload['model']} on {payload['dataset']}: " + " vs ".join(a["name"] for a in arms), "",
             f"Test set; seed{'s' if n != 1 else ''} {', '.join(map(str, seeds))}; cells: {spread}. Every arm has the same config, data "
             "split, seed and test contexts; arms differ only by their overrides.", ""]
    lines += [f"- {a['name']}: {a['label']}" + (f" {a['overrides']}" if a.get("overrides") else "") for a in arms]
    header = ["model", f"NDCG@{k}", f"Recall@{k}", "dir_frac", "shared_frac", f"R_dir vs {REFERENCE} (p)",
              f"R_shared vs {REFERENCE} (p)"]
    rows = []
    for row in payload["summary"]:
        same = row.get("same_model_as")
        rows.append([row["label"], format_cell(row[f"ndcg@{k}"]), format_cell(row[f"recall@{k}"]),
                     _SAME_MODEL if same else format_cell(row["dir_frac"]),
                     _SAME_MODEL if same else format_cell(row["shared_frac"]),
                     "" if same else _reduction_text(payload, row["arm"], "dir"),
                     "" if same else _reduction_text(payload, row["arm"], "shared")])
    lines += ["", "## Headline", "", *markdown_table(header, rows), ""]
    lines += [f"- {line}" for line in legend(n)]
    lines += ["- A beta = 0 row is the same trained model served without its prior: its energies are those of "
              "the row above (the learned dot product does not depend on beta).",
              "- †: a seed sits on a bound of the range (e.g. a recall of 0), so the interval is the plain t "
              "interval cut at that bound."]
    how = (f"mean difference [{conf:.0%} t interval], paired t-test p over {n} seed pairs" if n >= MIN_SEEDS
           else f"mean difference; n = {n} seed{'s' if n != 1 else ''}: no interval, no test")
    lines += ["", "## Accuracy", "", *markdown_table(["model", *accuracy], [
        [row["label"], *(format_cell(row[c]) for c in accuracy)] for row in payload["summary"]])]
    lines += ["", f"## Accuracy minus {REFERENCE} ({how})", "", *markdown_table(["model", *accuracy], [
        [row["label"], *(format_delta(row[c]) for c in accuracy)] for row in payload["deltas"]])]
    notes = sorted({row[c]["note"] for row in payload["deltas"] for c in accuracy
                    if row[c].get("note") and "same difference" in row[c]["note"]})
    if notes:
        lines += [""] + [f"- {note} (the cell shows the difference alone)." for note in notes]
    lines += ["", "## Popularity energy, embedding spectrum, training time", "",
              "`emb_r1`, `emb_erank`: the item table's top singular-value share and effective rank. "
              "`fit_ratio`: wall seconds of the arm's `fit` / the standard arm's, same seed.", "",
              *markdown_table(["model", *energy_cols], [
                  [row["label"], *((_SAME_MODEL if row.get("same_model_as") else format_cell(row[c]))
                                   for c in energy_cols)] for row in payload["summary"]])]
    fisher = " Fisher's method combines the seeds' p-values (independent trainings)." if n > 1 else ""
    floor = f" 1/{B + 1} is the smallest p-value {B} permutations can give." if B > 0 else ""
    lines += ["", f"## Specificity: each arm against its own null (B = {B} item-label permutations)", "",
              "p-values of the arm's `dir_frac` and of its context-shared energy `E_shared / T`." + fisher + floor, "",
              *markdown_table(["arm", "p dir_frac per seed", "p shared per seed", "combined p dir_frac",
                               "combined p shared"], [
                  [name, _p_list(e["p_value"], B), _p_list(e["p_value_shared"], B), _combined(e["p_value"], B),
                   _combined(e["p_value_shared"], B)] for name, e in payload["specificity"].items()])]
    lines += [""] + specificity_lines(payload["specificity"], 1.0 - conf, B)
    lines += missing_p_lines(payload["specificity"], ("p_value", "p_value_shared"), "single-model")
    red_rows = []
    for name, entry in payload["reductions"].items():
        for m in ("dir", "shared"):
            red_rows.append([name, f"R_{m}", format_cell(entry[f"R_{m}"]), _p_list(entry[f"p_value_{m}"], B),
                             _combined(entry[f"p_value_{m}"], B),
                             _p_list(entry["p_iso_shared"], 0) if m == "shared" else "",
                             format_cell(entry[f"null_mean_{m}"]), format_cell(entry[f"null_q95_{m}"])])
    lines += ["", f"## Matched reductions against {REFERENCE} (same contexts, same l; B = {B} orthogonalised "
              "item-label permutations)", "", f"R = 1 - E(arm) / E({REFERENCE}); cells: {spread}." + fisher, "",
              *markdown_table(["arm", "measure", "R", "p per seed", "combined p", "p_iso per seed", "null mean",
                               "null 95th pct"], red_rows)]
    dropped = missing_p_lines(payload["reductions"], ("p_value_dir", "p_value_shared"), "matched-reduction")
    if dropped:
        lines += [""] + dropped
    return "\n".join(lines) + "\n"


def compare_csv(payload: Mapping[str, Any]) -> str:
    """One line per (row, measure): mean, sd, interval (and its scale), p-value (paired t or Fisher), per-seed values."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "model", "metric", "mean", "sd", "n_seeds", "ci_low", "ci_high", "confidence",
                     "interval_scale", "p_value", "per_seed"])

    def seeds(values: Sequence[Any]) -> str:
        return ";".join("" if v is None else repr(float(v)) for v in values)

    def cell_line(row: str, label: str, metric: str, cell: Mapping[str, Any]) -> None:
        ci = cell["ci"] or {}
        writer.writerow([row, label, metric, _blank(cell["mean"]), _blank(cell["sd"]), cell["n"],
                         _blank(ci.get("low")), _blank(ci.get("high")), ci.get("confidence", ""),
                         ci.get("scale", ""), "", seeds(cell["per_seed"])])

    def p_line(row: str, label: str, metric: str, cell: Mapping[str, Any]) -> None:
        writer.writerow([row, label, metric, "", "", cell["n"], "", "", "", "", _blank(cell["combined"]),
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
                             ci.get("confidence", ""), "real" if ci else "", _blank(cell["p_value"]), ""])
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
           "compare_csv", "format_cell", "format_delta", "headline_rows", "headline_text", "permutation_p",
           "scale_of", "legend", "ACCURACY", "ENERGY_COLUMNS", "SCALE_OF"]
