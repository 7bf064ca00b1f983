"""The tau sweep's report: per-run measures from the saved runs, intervals over seeds, the markdown,
the figure, and the comparison report of two of its runs (docs/DESIGN.md §12).

Pure functions of what :mod:`recbole_popprior.tau_sweep` saves (each run's ``run.json`` record and
its ``contexts.npz`` arrays), so the report can be rebuilt, and tested, without training. Every
run is measured against the ``tau = 0`` run of its seed along that run's ``l`` (the training
estimate ``p_hat``): ``dir_frac``, ``shared_frac`` and ``subspace_frac`` by
:func:`energy_from_stats`, ``R_dir`` and ``R_shared`` by the comparison's ``_matched``. On the
synthetic data, :mod:`recbole_popprior.evaluator.truth` adds the known-truth measures and the
``true PMI`` row: the floor that separation can reach.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import numpy as np

from recbole_popprior.arms import ARMS
from recbole_popprior.compare import _arm_info, _matched, _Plan, _write_compare, output_set, score_singular_values
from recbole_popprior.compare_report import summarise
from recbole_popprior.evaluator.energy import ContextStats, energy_from_stats, reduction_from_energies
from recbole_popprior.evaluator.truth import (kl_to_truth, ndcg_at_k, optimum_table, row_spearman,
                                              score_decomposition, table_energy)
from recbole_popprior.evaluator.uncertainty import mean_interval, paired_test
from recbole_popprior.errors import PopPriorError

TRUTH_ROW = "true PMI"
REFERENCE_KEY = "tau=0"  # tau_sweep.Variant(0.0).key
#: the fine tau grid of the population optimum's curve (synthetic data)
OPTIMUM_GRID = np.round(np.arange(0.0, 2.0001, 0.05), 4)
#: numeric columns summarised over seeds, in table order
COLUMNS = ("tau", "dir_frac", "shared_frac", "dir_shared", "dir_specific", "p_own", "null_mean_own", "R_dir",
           "R_shared", "p_value_dir",
           "pop_slope", "ndcg", "ndcg_beta0",
           "recall", "dir_frac_true_l", "spearman_pmi", "kl_truth", "pop_coef", "pmi_coef",
           "subspace_frac", "subspace_frac_true", "epochs", "best_epoch", "fit_seconds", "wall_seconds")


# --------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------
def _state(arrays: Mapping[str, np.ndarray]) -> SimpleNamespace:
    """What ``compare._matched`` reads from an evaluation: the contexts' sums and the item table."""
    return SimpleNamespace(contexts=ContextStats.from_H(arrays["H"]), E=arrays["E"])


def pop_slope(mean_row: np.ndarray, log_prior: np.ndarray) -> float:
    """``b`` of the least squares ``mean_c Zc = b (P_n log p_hat)``: the context-shared popularity of the
    scores in units of ``log p_hat`` (padding entry 0 dropped). §1 predicts ``1 - tau`` at the optimum
    (up to ``log p - log p_hat``); where it crosses 0 is the tau that removes the shared part."""
    z, lp = mean_row[1:] - mean_row[1:].mean(), log_prior[1:] - log_prior[1:].mean()
    return float(z @ lp / (lp @ lp))


def kept_epoch(curve: Sequence[Sequence[float]], bigger: bool = True) -> int | None:
    """The validated epoch whose model RecBole keeps and tests: the *last* of the tied best scores.

    RecBole's ``early_stopping`` updates on ``value >= best``, and its valid scores are rounded to
    4 digits, so ties are common; a plain ``max`` names the first of them, a model RecBole discarded."""
    if not curve:
        return None
    sign = 1.0 if bigger else -1.0
    return int(max(reversed(list(curve)), key=lambda c: sign * c[1])[0])


def _split(energy: Mapping[str, Any]) -> dict[str, float]:
    """``dir_frac`` cut into its context-shared and context-specific parts, ``E_shared / T + E_specific / T``
    (DESIGN §12: estimating ``p`` and mis-weighting it can only add to the shared part)."""
    total = energy["total"]
    return {"dir_shared": energy["shared"] / total, "dir_specific": energy["specific"] / total}


def _windows(arrays: Mapping[str, np.ndarray], key: str) -> np.ndarray | None:
    W = arrays.get(key)
    return W if W is not None and W.ndim == 2 and W.shape[0] > 1 else None


def _best_epoch(run: Mapping[str, Any]) -> int | None:
    """1-based kept epoch, from the saved validation curve (runs saved before ``valid_metric_bigger``
    was recorded used RecBole's default, bigger is better)."""
    kept = kept_epoch(run.get("valid_curve") or [], bool(run.get("valid_metric_bigger", True)))
    if kept is None and run.get("best_epoch") is not None:
        kept = int(run["best_epoch"])
    return None if kept is None else kept + 1


def measure_run(run: Mapping[str, Any], arrays: Mapping[str, np.ndarray], ref_arrays: Mapping[str, np.ndarray]
                ) -> dict[str, Any]:
    """Every measure of one run against its seed's ``tau = 0`` run (``ref_arrays``; itself for the reference)."""
    name, topk = run["name"], int(run["topk"])
    l_hat = ref_arrays["log_prior_estimate"]
    if not np.allclose(np.exp(arrays["log_prior_estimate"][1:]), np.exp(l_hat[1:]), rtol=1e-6, atol=1e-12):
        raise PopPriorError(f"run {run['key']} seed {run['seed']} counted another training prior than tau=0")
    state = _state(arrays)
    energy = energy_from_stats(state.contexts, arrays["E"], l_hat,
                               windows_log_prior=_windows(arrays, "log_prior_windows"))
    metrics = run["record"]["metrics"]
    out: dict[str, Any] = {
        "key": run["key"], "seed": run["seed"], "tau": run["record"]["tau"][name],
        "dir_frac": energy["dir_frac"], "shared_frac": energy["shared_frac"], **_split(energy), "E_dir": energy["dir"],
        "E_shared": energy["shared"], "subspace_frac": energy.get("subspace_frac"),
        "ndcg": metrics[name].get(f"ndcg@{topk}"), "recall": metrics[name].get(f"recall@{topk}"),
        "ndcg_beta0": metrics.get(f"{name}_beta0", {}).get(f"ndcg@{topk}"),
        "pop_slope": pop_slope(arrays["E"] @ arrays["H"].mean(axis=0), l_hat),
        # the run's own permutation test of dir_frac (PopPermutation at its test evaluation, DESIGN §3.1)
        "p_own": run["record"]["specificity"][name].get("p_value"),
        "null_mean_own": run["record"]["specificity"][name].get("null_mean"),
        "epochs": run["epochs"], "best_epoch": _best_epoch(run),
        "fit_seconds": run["fit_seconds"],
        "wall_seconds": run["wall_seconds"], "stopped_early": run["stopped_early"]}
    if arrays is not ref_arrays:
        red = _matched(_state(ref_arrays), state, l_hat, int(run["permutations"]), int(run["energy_seed"]), {},
                       names=(("tau=0", run["model"]), (run["key"], run["model"])))
        out.update({k: red.get(k) for k in ("R_dir", "R_shared", "p_value_dir", "p_value_shared")})
    if "truth_pmi" in arrays:
        out.update(_truth_measures(arrays, out["tau"]))
    return out


def _truth_measures(arrays: Mapping[str, np.ndarray], tau: float) -> dict[str, Any]:
    pmi, log_p, prev = arrays["truth_pmi"], arrays["truth_log_p"], arrays["prev"]
    Z = (arrays["H"] @ arrays["E"].T)[:, 1:]
    P = pmi[prev][:, 1:]
    logits = Z + tau * arrays["log_prior_model"][1:]
    out = {"dir_frac_true_l": energy_from_stats(ContextStats.from_H(arrays["H"]), arrays["E"], log_p)["dir_frac"],
           "spearman_pmi": row_spearman(Z, P), "kl_truth": kl_to_truth(logits, P + log_p[None, 1:])}
    out.update(score_decomposition(Z, P, log_p[1:]))
    W = _windows(arrays, "truth_log_p_windows")
    if W is not None:
        out["subspace_frac_true"] = energy_from_stats(ContextStats.from_H(arrays["H"]), arrays["E"], log_p,
                                                      windows_log_prior=W)["subspace_frac"]
    return out


def truth_row(ref_run: Mapping[str, Any], ref_arrays: Mapping[str, np.ndarray],
              ref_measures: Mapping[str, Any]) -> dict[str, Any]:
    """The true PMI on the same contexts (row = each context's previous item): its energies along the
    same ``l``, its ``R_dir`` against the standard run, and the NDCG@K of the Bayes ranking ``log p(i|c)``."""
    pmi, log_p, prev = ref_arrays["truth_pmi"], ref_arrays["truth_log_p"], ref_arrays["prev"]
    l_hat = ref_arrays["log_prior_estimate"]
    energy = table_energy(pmi, prev, l_hat, windows_log_prior=_windows(ref_arrays, "log_prior_windows"),
                          permutations=int(ref_run["permutations"]), seed=int(ref_run["energy_seed"]))
    red = reduction_from_energies(ref_measures["E_dir"], energy["dir"], ref_measures["E_shared"], energy["shared"])
    scores = pmi[prev] + log_p[None, :]
    scores[:, 0] = -np.inf
    out = {"key": TRUTH_ROW, "seed": ref_run["seed"], "dir_frac": energy["dir_frac"],
           "shared_frac": energy["shared_frac"], **_split(energy), "R_dir": red["R_dir"], "R_shared": red["R_shared"],
           "dir_frac_true_l": table_energy(pmi, prev, log_p)["dir_frac"], "spearman_pmi": 1.0,
           "ndcg": ndcg_at_k(scores, ref_arrays["target"], int(ref_run["topk"])),
           "pop_slope": pop_slope(np.nan_to_num(pmi[prev]).mean(axis=0), l_hat),
           "subspace_frac": energy.get("subspace_frac"), "p_own": energy.get("p_value"),
           "null_mean_own": energy.get("null_mean")}
    W = _windows(ref_arrays, "truth_log_p_windows")
    if W is not None:
        out["subspace_frac_true"] = table_energy(pmi, prev, log_p, windows_log_prior=W)["subspace_frac"]
    return out


def optimum_curve(ref_arrays: Mapping[str, np.ndarray], grid: Sequence[float] = OPTIMUM_GRID) -> dict[str, Any]:
    """``dir_frac`` of the population optimum ``PMI + log p - tau log p_hat`` against tau, on the same
    contexts and ``l``, for the estimated prior and for the true one; and where each is smallest."""
    pmi, log_p, prev = ref_arrays["truth_pmi"], ref_arrays["truth_log_p"], ref_arrays["prev"]
    l_hat = ref_arrays["log_prior_estimate"]
    out: dict[str, Any] = {"tau": [float(t) for t in grid]}
    for source, prior in (("estimate", l_hat), ("truth", log_p)):
        curve = [table_energy(optimum_table(pmi, log_p, prior, t), prev, l_hat)["dir_frac"] for t in grid]
        out[source] = curve
        out[f"argmin_{source}"] = float(grid[int(np.argmin(curve))])
    return out


# --------------------------------------------------------------------------------------
# Over seeds
# --------------------------------------------------------------------------------------
def _cell(values: Sequence[Any], confidence: float) -> dict[str, Any] | None:
    finite = [float(v) for v in values if v is not None and not isinstance(v, bool) and math.isfinite(float(v))]
    if not finite:
        return None
    interval = mean_interval(finite, confidence)
    cell = {"mean": interval.mean, "n": interval.n, "per_seed": list(values), "ci": None}
    if interval.defined:
        cell["ci"] = [interval.low, interval.high]
    return cell


def summarise_sweep(runs: Sequence[tuple[Mapping[str, Any], Mapping[str, np.ndarray]]], *,
                    order: Sequence[str] | None = None, confidence: float | None = None) -> dict[str, Any]:
    """The report payload from every complete run (``(run.json, contexts.npz)`` pairs).

    Each seed needs its ``tau = 0`` run; a seed without one is left out (and named in ``missing``).
    ``order``: the variant keys in table order (default: as found).
    """
    if not runs:
        raise PopPriorError("the tau sweep has no complete run to report")
    first = runs[0][0]
    confidence = float(confidence if confidence is not None else first["confidence"])
    by_seed: dict[int, dict[str, tuple]] = {}
    for run, arrays in runs:
        by_seed.setdefault(int(run["seed"]), {})[run["key"]] = (run, arrays)
    keys = list(order or dict.fromkeys(run["key"] for run, _ in runs))
    reference = REFERENCE_KEY
    per_run, missing, optimum = [], [], None
    for seed in sorted(by_seed):
        runs_of_seed = by_seed[seed]
        if reference not in runs_of_seed:
            missing += [f"{key} seed {seed}" for key in runs_of_seed]
            continue
        ref_run, ref_arrays = runs_of_seed[reference]
        digests = {run["data_digest"] for run, _ in runs_of_seed.values()}
        if len(digests) != 1:
            raise PopPriorError(f"seed {seed}: the runs did not get the same data split; the sweep is not matched")
        ref_measures = measure_run(ref_run, ref_arrays, ref_arrays)
        per_run.append(ref_measures)
        if "truth_pmi" in ref_arrays:
            per_run.append(truth_row(ref_run, ref_arrays, ref_measures))
            optimum = optimum if optimum is not None else optimum_curve(ref_arrays)
        for key in keys:
            if key != reference and key in runs_of_seed:
                per_run.append(measure_run(runs_of_seed[key][0], runs_of_seed[key][1], ref_arrays))
    rows = []
    row_keys = [reference] + ([TRUTH_ROW] if any(r["key"] == TRUTH_ROW for r in per_run) else []) + \
        [k for k in keys if k != reference]
    ref_by_seed = {r["seed"]: r for r in per_run if r["key"] == reference}
    for key in row_keys:
        mine = [r for r in per_run if r["key"] == key]
        if not mine:
            continue
        variant = next((run["variant"] for run, _ in runs if run["key"] == key), None)
        row: dict[str, Any] = {"key": key, "variant": variant, "seeds": [r["seed"] for r in mine]}
        for col in COLUMNS:
            row[col] = _cell([r.get(col) for r in mine], confidence)
        if key not in (reference, TRUTH_ROW) and len(mine) >= 2:
            pairs = [(r["ndcg"], ref_by_seed[r["seed"]]["ndcg"]) for r in mine]
            test = paired_test([a for a, _ in pairs], [b for _, b in pairs], confidence)
            row["ndcg_delta"] = {"mean": test.mean_diff, "ci": [test.low, test.high], "p_value": test.p_value}
        rows.append(row)
    return {"model": first["model"], "dataset": first["dataset"], "topk": int(first["topk"]),
            "tau_zero_slope": _zero_crossing(rows, reference), "residual": _residual(per_run, confidence),
            "confidence": confidence, "permutations": int(first["permutations"]), "reference": reference,
            "seeds": sorted(ref_by_seed), "rows": rows, "per_run": per_run, "optimum": optimum,
            "missing": missing, "prior_alpha": first.get("prior_alpha")}


def _residual(per_run: Sequence[Mapping[str, Any]], confidence: float) -> list[dict[str, Any]]:
    """Per tau with both priors (synthetic): the separated model's ``dir_frac`` above the true PMI's, with
    the estimated and with the true prior, and their difference (the part due to estimating p), paired
    by seed."""
    by = {(r["key"], r["seed"]): r for r in per_run}
    out = []
    for key in dict.fromkeys(r["key"] for r in per_run):
        if not key.endswith(",prior=truth"):
            continue
        est_key = key[: -len(",prior=truth")]
        seeds = [s for (k, s) in by if k == key and (est_key, s) in by and (TRUTH_ROW, s) in by]
        if not seeds:
            continue
        entry = {"tau_key": est_key, "seeds": seeds}
        for part in ("dir_frac", "dir_shared", "dir_specific"):
            floor = [by[(TRUTH_ROW, s)][part] for s in seeds]
            est = [by[(est_key, s)][part] for s in seeds]
            tru = [by[(key, s)][part] for s in seeds]
            entry[part] = {"floor": _cell(floor, confidence),
                           "above_floor_estimate": _cell([e - f for e, f in zip(est, floor)], confidence),
                           "above_floor_truth": _cell([t - f for t, f in zip(tru, floor)], confidence),
                           "estimation": _cell([e - t for e, t in zip(est, tru)], confidence)}
        out.append(entry)
    return out


def _zero_crossing(rows: Sequence[Mapping[str, Any]], reference: str) -> float | None:
    """Where the mean ``pop_slope`` of the static, estimated-prior runs crosses 0 (linear between taus)."""
    points = sorted((row["tau"]["mean"], row["pop_slope"]["mean"]) for row in rows
                    if row.get("pop_slope") and row.get("tau") and row.get("variant")
                    and (row["key"] == reference or (row["variant"]["source"] == "estimate"
                                                     and row["variant"]["mode"] == "static"
                                                     and row["variant"]["tau"] != "learned")))
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if b0 == 0:
            return t0
        if b0 * b1 < 0:
            return t0 + (t1 - t0) * b0 / (b0 - b1)
    return points[-1][0] if points and points[-1][1] == 0 else None


# --------------------------------------------------------------------------------------
# Markdown and CSV
# --------------------------------------------------------------------------------------
def _num(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    x = float(x)
    return f"{x:.2e}" if digits >= 2 and x != 0 and abs(x) < 10 ** -(digits - 1) else f"{x:.{digits}f}"


def fmt(cell: Mapping[str, Any] | None, digits: int = 4) -> str:
    """``mean [low, high]``, or ``mean`` alone with one seed."""
    if cell is None:
        return ""
    text = _num(cell["mean"], digits)
    if cell.get("ci"):
        text += f" [{_num(cell['ci'][0], digits)}, {_num(cell['ci'][1], digits)}]"
    return text


#: counts and times: the mean with the seeds' range (a t interval of a wall time says little)
_RANGE_COLUMNS = ("epochs", "best_epoch", "wall_seconds")


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, int]]) -> list[str]:
    lines = ["| run | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = []
        for col, _, digits in columns:
            if col == "ndcg_delta":
                d = row.get(col)
                cells.append("" if d is None else f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] "
                                                  f"(p={_num(d['p_value'], 2)})")
            elif col in _RANGE_COLUMNS and row.get(col):
                values = [float(v) for v in row[col]["per_seed"] if v is not None]
                cells.append(f"{row[col]['mean']:.{digits}f} ({min(values):.0f}-{max(values):.0f})")
            else:
                cells.append(fmt(row.get(col), digits))
        lines.append(f"| {row['key']} | " + " | ".join(cells) + " |")
    return lines


def _has(rows: Sequence[Mapping[str, Any]], col: str) -> bool:
    return any(row.get(col) is not None for row in rows)


def sweep_markdown(payload: Mapping[str, Any]) -> str:
    """The report's tables: means over seeds with their t intervals (DESIGN §3.2)."""
    k, rows = payload["topk"], payload["rows"]
    conf = int(round(100 * payload["confidence"]))
    out = [f"# Tau sweep: {payload['model']} on {payload['dataset']}", "",
           f"Seeds {', '.join(map(str, payload['seeds']))}; mean [{conf}% t interval over seeds]. Energies along "
           f"l = the centred log p_hat of the training targets (alpha = {payload.get('prior_alpha')}), on the test "
           f"contexts; R against the tau=0 run of the same seed (B = {payload['permutations']}). `p (own test)`: "
           f"the run's own item-label permutation test of its dir_frac (mean of the per-seed p).", ""]
    if payload.get("config_files"):  # e.g. a speed preset: the numerics the runs trained with
        out[-1:] = ["", f"Config files (in order): {', '.join(f'`{f}`' for f in payload['config_files'])}.", ""]
    cols = [("tau", "trained tau", 3), ("dir_frac", "dir_frac", 4), ("shared_frac", "shared_frac", 3),
            ("p_own", "p (own test)", 3),
            ("R_dir", "R_dir", 4), ("R_shared", "R_shared", 4), ("pop_slope", "pop slope", 3),
            ("ndcg", f"NDCG@{k}", 4),
            ("ndcg_delta", f"delta NDCG@{k} (paired p)", 4), ("ndcg_beta0", f"NDCG@{k} at beta=0", 4),
            ("epochs", "epochs (range)", 1), ("wall_seconds", "wall s (range)", 0)]
    out += _table([r for r in rows if r["key"] != TRUTH_ROW], cols)
    if payload.get("tau_zero_slope") is not None:
        out += ["", f"pop slope: the context-shared popularity of the learned scores in units of log p_hat "
                    f"(least squares of the mean centred score row on P_n log p_hat); it crosses 0 at tau = "
                    f"{payload['tau_zero_slope']:.3f} (linear between the swept taus)."]
    if _has(rows, "spearman_pmi"):
        out += ["", "## Against the known truth", "",
                "`true PMI`: the generator's PMI rows of each context's previous item (the floor of separation); "
                "its NDCG is the Bayes ranking log p(i|c). `dir_frac (true l)`: along the centred true log p. "
                "Spearman: mean over contexts of the rank correlation of the learned scores with the true PMI row. "
                "KL: mean KL(p(.|c) || the model's softmax), nats. pop / PMI coefficient: least squares "
                "Zc = a PMIc + b (P_n log p).", ""]
        out += _table(rows, [("dir_frac", "dir_frac", 4), ("dir_shared", "shared part", 4),
                             ("dir_specific", "specific part", 4), ("p_own", "p (own test)", 3),
                             ("null_mean_own", "null mean", 4), ("dir_frac_true_l", "dir_frac (true l)", 4),
                             ("R_dir", "R_dir", 4), ("spearman_pmi", "Spearman(PMI)", 4),
                             ("kl_truth", "KL to truth", 4), ("pop_coef", "pop coef b", 3),
                             ("pmi_coef", "PMI coef a", 3), ("ndcg", f"NDCG@{k}", 4)])
    if payload.get("residual"):
        out += ["", "## How much of the residual is estimation", "",
                "dir_frac above the true PMI's (the floor), with the estimated prior and with the true one, and "
                "their difference (estimate - truth), paired by seed; split into the context-shared part "
                "(E_shared / T) and the context-specific part (E_specific / T).", "",
                "| tau | part | floor (true PMI) | above floor, p_hat | above floor, true p | estimation |",
                "|---|---|---|---|---|---|"]
        for entry in payload["residual"]:
            for part, name in (("dir_frac", "all"), ("dir_shared", "shared"), ("dir_specific", "specific")):
                cells = entry[part]
                out.append(f"| {entry['tau_key']} | {name} | {fmt(cells['floor'])} | "
                           f"{fmt(cells['above_floor_estimate'])} | {fmt(cells['above_floor_truth'])} | "
                           f"{fmt(cells['estimation'])} |")
    if payload.get("optimum"):
        opt = payload["optimum"]
        out += ["", f"Population optimum `PMI + log p - tau log prior` on the same contexts: dir_frac is smallest at "
                    f"tau = {opt['argmin_estimate']:g} with the estimated prior and at tau = "
                    f"{opt['argmin_truth']:g} with the true one (grid step 0.05)."]
    if any((r.get("variant") or {}).get("mode") == "windowed" for r in rows):
        out += ["", "## Popularity subspace", "",
                "subspace_frac: the share of the learned scores' centred energy in the span of the windowed "
                "log priors (estimated on the training targets; `true`: the generator's window marginals).", ""]
        out += _table(rows, [("subspace_frac", "subspace_frac", 4), ("subspace_frac_true", "subspace_frac (true)", 4),
                             ("dir_frac", "dir_frac", 4), ("ndcg", f"NDCG@{k}", 4)])
    out += ["", "## Per seed", "", "| run | seed | tau | dir_frac | R_dir | p(R_dir) | NDCG | epochs | best epoch | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["per_run"]:
        out.append(f"| {r['key']} | {r['seed']} | {_num(r.get('tau'), 3)} | {_num(r.get('dir_frac'))} | "
                   f"{_num(r.get('R_dir'))} | {_num(r.get('p_value_dir'), 2)} | {_num(r.get('ndcg'))} | "
                   f"{_num(r.get('epochs'))} | {_num(r.get('best_epoch'))} | {_num(r.get('wall_seconds'), 1)} |")
    if payload.get("missing"):
        out += ["", f"Not reported (their seed has no tau=0 run yet): {', '.join(payload['missing'])}."]
    return "\n".join(out) + "\n"


def sweep_csv(payload: Mapping[str, Any]) -> str:
    """One line per run and seed (and the true PMI per seed)."""
    keys = ["key", "seed"] + [c for c in COLUMNS if c != "tau"] + ["tau"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in payload["per_run"]:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in keys})
    return buffer.getvalue()


# --------------------------------------------------------------------------------------
# The comparison report of two runs
# --------------------------------------------------------------------------------------
def compare_from_runs(pairs: Sequence[tuple[tuple, tuple]], out_dir: Any, *, standard_spec: Any) -> dict[str, Any]:
    """``--compare``'s report (``compare.{json,csv,md}`` and its figures) from saved sweep runs.

    ``pairs``: per seed ``((ref_run, ref_arrays), (run, arrays))``, the ``tau = 0`` run and the
    separated one. Each seed's record is assembled from the two runs' own records (measured as
    the comparison measures an arm) plus the matched reduction of their saved statistics.
    """
    per_seed, spectra, nulls, taus = [], {}, {}, None
    for (ref_run, ref_arrays), (run, arrays) in pairs:
        rename = {run["name"]: "separated", f"{run['name']}_beta0": "separated_beta0"}
        record: dict[str, Any] = {"seed": ref_run["seed"], "reductions": {}, "data_digest": {}}
        for r in (ref_run, run):
            for part, values in r["record"].items():
                record.setdefault(part, {}).update({rename.get(k, k): v for k, v in values.items()})
            record["data_digest"][rename.get(r["name"], r["name"])] = r["data_digest"]
        null: dict[str, np.ndarray] = {}
        l_hat = ref_arrays["log_prior_estimate"]
        record["reductions"]["separated"] = _matched(_state(ref_arrays), _state(arrays), l_hat,
                                                     int(run["permutations"]), int(run["energy_seed"]), null,
                                                     names=(("standard", run["model"]), ("separated", run["model"])))
        if not per_seed:
            taus = record["tau"]
            nulls["separated"] = null or None
            for name, arr in (("standard", ref_arrays), ("separated", arrays)):
                spectra[name] = score_singular_values(arr["H"].T @ arr["H"], arr["E"])
        per_seed.append(record)
    model, dataset = pairs[0][0][0]["model"], pairs[0][0][0]["dataset"]
    plans = [_Plan(standard_spec, {}, 0.0), _Plan(ARMS["separated"], {}, pairs[0][1][0]["variant"]["tau"])]
    arms_info = [_arm_info(plan, model, taus[plan.spec.name]) for plan in plans]
    first = pairs[0][0][0]
    payload = summarise(model, dataset, arms_info, per_seed, topk=int(first["topk"]),
                        permutations=int(first["permutations"]), confidence=float(first["confidence"]))
    payload["tau"] = taus.get("separated")
    labelled = {_arm_info(plan, model, taus[plan.spec.name])["label"]: spectra[plan.spec.name] for plan in plans}
    with output_set(Path(out_dir), "compare", "compare.json") as stage:  # committed as one, as --compare's
        files = _write_compare(stage, payload, labelled, nulls)
    payload["files"] = {k: str(v) for k, v in files.items()}
    return payload


__all__ = ["measure_run", "truth_row", "optimum_curve", "summarise_sweep", "sweep_markdown", "sweep_csv",
           "compare_from_runs", "fmt", "TRUTH_ROW", "COLUMNS"]
