"""Matched comparison of RecBole's model (tau = 0) and its prior-separated version (docs/DESIGN.md §1, §3).

``run_compare`` trains, for every seed, both arms under one config (only ``prior_tau``
differs), evaluates both on the SAME test contexts (one shared test loader; the arms' data
splits are checked to be identical) and reports accuracy, popularity-band recall, coverage,
average popularity, the energy fractions and the matched reductions ``R_dir`` and ``R_shared``
with their permutation p-values. The energies come from the same collector that feeds the
``PopEnergy`` metric, so the comparison's figures and the metrics' figures are one computation.
``run_beta_sweep`` serves one trained prior-separated model at several ``beta`` without
retraining.

Outputs (each file atomic; ``compare.json`` last, so its presence means the set is complete):
``compare.{csv,md}``, ``spectra.png``, ``energy.png``, ``permutation.png`` and ``compare.json``;
``beta_sweep.{csv,md,json}``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from recbole.utils import get_local_time

from recbole_popprior import plots
from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator.collector import EnergyState
from recbole_popprior.evaluator.energy import item_table, matched_reduction, reduction_null
from recbole_popprior.prior import estimate_log_prior
from recbole_popprior.quick_start import build_config, build_pipeline, train_and_test
from recbole_popprior.serving import evaluate_at, sweep_beta
from recbole_popprior.utils import atomic_write, to_jsonable, write_json

#: RecBole metrics every comparison evaluates (PopBandRecall: head/mid/tail recall; PopEnergy and
#: EmbeddingSpectrum: the statistics the matched reductions are computed from)
COMPARE_METRICS = ["Recall", "MRR", "NDCG", "ItemCoverage", "AveragePopularity", "PopBandRecall",
                   "PopEnergy", "EmbeddingSpectrum"]
_ENERGY_METRICS = ("PopEnergy", "EmbeddingSpectrum")
STD, SEP, SEP0 = "standard", "separated", "separated_beta0"
_ENERGY_KEYS = ("total", "dir", "shared", "specific", "dir_frac", "shared_frac", "m")


# --------------------------------------------------------------------------------------
# One arm
# --------------------------------------------------------------------------------------
@dataclass
class Arm:
    """One trained model of a comparison: its pipeline, its result record, and the energy
    statistics of its latest evaluation on the shared test contexts."""

    name: str
    pipe: Any
    result: dict[str, Any]
    state: EnergyState | None = None


def _with_energy_metrics(metrics: Any) -> list[str]:
    names = list(metrics)
    known = {str(m).lower() for m in names}
    return names + [m for m in _ENERGY_METRICS if m.lower() not in known]


def arm_config(model: str, dataset: str, config_file_list: list[str] | None, config_dict: dict | None,
               *, seed: int | None, baseline: bool, run_dir: Path | None = None, tau: float | None = None):
    """The plugin ``Config`` of one arm: the user's settings, this seed, and the arm's ``prior_tau``."""
    overrides = dict(config_dict or {})
    overrides["metrics"] = _with_energy_metrics(overrides.get("metrics", COMPARE_METRICS))
    overrides.update(popprior_baseline=bool(baseline), prior_beta=None)
    if seed is not None:
        overrides["seed"] = int(seed)
    if baseline:
        overrides["prior_tau"] = 0.0
    elif tau is not None:
        overrides["prior_tau"] = tau
    if run_dir is not None:
        overrides["run_dir"] = str(run_dir)
    return build_config(model, dataset, config_file_list, overrides)


def train_arm(name: str, config: Any, *, saved: bool = True) -> Arm:
    """Build, train and test one arm with the plugin's pipeline (RecBole's own loop)."""
    pipe = build_pipeline(config)
    result = train_and_test(pipe, saved=saved)
    return Arm(name, pipe, result)


def data_digest(pipe: Any) -> str:
    """Hash of the arm's data split: user and item ids of its train, valid and test examples."""
    h = hashlib.sha256()
    for loader in (pipe.train_data, pipe.valid_data, pipe.test_data):
        ds = loader.dataset
        for f in (ds.uid_field, ds.iid_field):
            h.update(ds.inter_feat[f].to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def measure(arm: Arm, eval_data: Any, beta: float | None = None) -> dict[str, float]:
    """Evaluate ``arm`` on ``eval_data`` (at serving ``beta``) and keep the energy statistics that
    the evaluation's ``PopEnergy`` metric was computed from."""
    metrics = evaluate_at(arm.pipe.trainer, eval_data, beta)
    arm.state = arm.pipe.trainer.eval_collector.last_state
    return metrics


def score_singular_values(G: np.ndarray, E: Any) -> np.ndarray:
    """Singular values of the item-centred learned scores ``Zc = H E1^T P_n`` (padding excluded).

    From the d x d problem: with ``G = H^T H`` and ``C = (P_n E1)^T (P_n E1)``, the squared
    singular values of ``Zc`` are the eigenvalues of ``G^(1/2) C G^(1/2)``; no m x n matrix.
    """
    G = np.asarray(G, dtype=np.float64)
    C = item_table(E, np.shape(E)[0], G.shape[0])[2]
    w, V = np.linalg.eigh(G)
    root = (V * np.sqrt(np.clip(w, 0.0, None))) @ V.T
    s2 = np.linalg.eigvalsh(root @ C @ root)
    return np.sqrt(np.clip(s2, 0.0, None))[::-1]


# --------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------
_TABLE_METRICS = ("ndcg", "recall", "mrr", "headrecall", "midrecall", "tailrecall",
                  "itemcoverage", "averagepopularity")


def _output_dir(output: str | Path | None, config: Any, kind: str) -> Path:
    if output:
        return Path(output)
    return Path(config["output"]) / f"{kind}-{config['model']}-{config['dataset']}-{get_local_time()}"


def _seed_list(config: Any, seeds: int) -> list[int]:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise PopPriorError(f"--seeds must be an integer >= 1, got {seeds!r}")
    base = int(config["seed"])
    return [base + k for k in range(seeds)]


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def run_compare(model: str, dataset: str, config_file_list: list[str] | None = None,
                config_dict: dict | None = None, seeds: int = 3, output: str | Path | None = None) -> dict[str, Any]:
    """Train RecBole's ``model`` (tau = 0) and its prior-separated version per seed; compare them.

    Both arms of a seed share the config, the data split, the seed and the test contexts.
    Returns the ``compare.json`` payload (``summary``, ``reductions``, ``per_seed``, ``files``).
    """
    logger = getLogger()
    probe = arm_config(model, dataset, config_file_list, config_dict, seed=None, baseline=False)
    tau = probe["prior_tau"]
    if tau != "learned" and float(tau) == 0.0:
        raise PopPriorError("--compare needs a non-zero prior_tau for the prior-separated arm")
    topk = int(probe["topk"][0])
    permutations = int(probe["energy_permutations"])
    energy_seed = int(probe["energy_seed"])
    out_dir = _output_dir(output, probe, "compare")
    seed_values = _seed_list(probe, seeds)

    per_seed, spectra, first_null = [], {}, None
    for seed in seed_values:
        arms = {}
        for name, baseline in ((STD, True), (SEP, False)):
            config = arm_config(model, dataset, config_file_list, config_dict, seed=seed, baseline=baseline,
                                run_dir=out_dir / "runs" / f"seed{seed}-{name}")
            arms[name] = train_arm(name, config)
        log_prior = _training_log_prior(arms[STD], arms[SEP])
        record = _compare_seed(arms[STD], arms[SEP], log_prior, permutations, energy_seed)
        record["seed"] = seed
        per_seed.append(record)
        if len(per_seed) == 1:  # the plots show the first seed
            first_null = _null(arms[STD].state, arms[SEP].state, log_prior, permutations, energy_seed)
            spectra = {_row_label(key, model, record["tau"]): score_singular_values(arms[key].state.contexts.G,
                                                                                     arms[key].state.E)
                       for key in (STD, SEP) if arms[key].state.contexts is not None}
        logger.info(f"compare seed {seed}: R_dir={record['reduction']['R_dir']:.4f} "
                    f"R_shared={record['reduction']['R_shared']:.4f}")

    payload = _summarise(model, dataset, per_seed, topk, permutations)
    files = _write_compare(out_dir, payload, spectra, first_null)
    payload["files"] = {k: str(v) for k, v in files.items()}
    print(payload["markdown"])
    return payload


def _compare_seed(std: Arm, sep: Arm, log_prior: np.ndarray, permutations: int, energy_seed: int) -> dict[str, Any]:
    """Evaluate one seed's pair on the same contexts: accuracy, energies, matched reductions."""
    digests = {STD: data_digest(std.pipe), SEP: data_digest(sep.pipe)}
    if digests[STD] != digests[SEP]:
        raise RuntimeError("the two arms did not get the same data split: compare is not matched")
    shared_test = std.pipe.test_data  # both models are measured on one loader: same contexts, same order
    tau = sep.pipe.model.training_tau()  # the learned value when prior_tau is "learned"
    metrics = {STD: measure(std, shared_test), SEP0: measure(sep, shared_test, 0.0),
               SEP: measure(sep, shared_test, None)}
    energy = {key: {k: arm.state.energy()[k] for k in _ENERGY_KEYS} for key, arm in ((STD, std), (SEP, sep))}
    energy[SEP0] = energy[SEP]  # beta changes serving only; the learned dot product is the same
    reduction = _matched(std.state, sep.state, log_prior, permutations, energy_seed)
    return {
        "tau": tau,
        "metrics": metrics,
        "energy": energy,
        "reduction": reduction,
        "data_digest": digests,
        "energy_path": {STD: std.state.path, SEP: sep.state.path},
        "best_valid_score": {STD: std.result.get("best_valid_score"), SEP: sep.result.get("best_valid_score")},
        "run_dir": {STD: std.result.get("run_dir"), SEP: sep.result.get("run_dir")},
    }


def _training_log_prior(std: Arm, sep: Arm) -> np.ndarray:
    """``log p_hat`` of the training targets (docs/DESIGN.md §2): what both arms' measures use."""
    train = std.pipe.train_data.dataset
    log_prior = estimate_log_prior(train.inter_feat[train.iid_field], train.item_num,
                                   float(std.pipe.config["prior_alpha"])).double().numpy()
    if not np.allclose(np.exp(log_prior[1:]), np.exp(sep.pipe.model.log_prior.double().cpu().numpy()[1:]),
                       rtol=1e-5, atol=1e-9):
        raise RuntimeError("the two arms counted different training priors")
    return log_prior


def _matched(std: EnergyState, sep: EnergyState, log_prior: np.ndarray, permutations: int,
             seed: int) -> dict[str, Any]:
    """``matched_reduction`` on the two evaluations' statistics (docs/DESIGN.md §3)."""
    if std.contexts is not None and sep.contexts is not None:
        return matched_reduction((std.contexts, std.E), (sep.contexts, sep.E), permutations=permutations,
                                 seed=seed, log_prior=log_prior)
    # the streaming fallback (scores that are not H E^T) keeps the energies, not their factors
    e_std, e_sep = std.energy(), sep.energy()
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"R_dir": 1.0 - e_sep["dir"] / e_std["dir"], "R_shared": 1.0 - e_sep["shared"] / e_std["shared"],
                "std_dir": e_std["dir"], "sep_dir": e_sep["dir"], "std_shared": e_std["shared"],
                "sep_shared": e_sep["shared"]}


def _null(std: EnergyState, sep: EnergyState, log_prior: np.ndarray, permutations: int,
          seed: int) -> dict[str, np.ndarray] | None:
    """The permutation nulls behind ``_matched``'s p-values (the same draws), for the plot."""
    if permutations <= 0 or std.contexts is None or sep.contexts is None:
        return None
    return reduction_null((std.contexts, std.E), (sep.contexts, sep.E), log_prior=log_prior,
                          permutations=permutations, seed=seed)


def _row_label(key: str, model: str, tau: float) -> str:
    return {STD: f"RecBole {model} (tau=0)",
            SEP: f"prior-separated {model} (tau={tau:g}, beta={tau:g})",
            SEP0: f"prior-separated {model} (tau={tau:g}, beta=0)"}[key]


def _summarise(model: str, dataset: str, per_seed: list[dict], topk: int, permutations: int) -> dict[str, Any]:
    tau = per_seed[0]["tau"]
    columns = [f"{m}@{topk}" for m in _TABLE_METRICS] + ["dir_frac", "shared_frac"]
    rows = []
    for key in (STD, SEP, SEP0):
        row: dict[str, Any] = {"row": key, "label": _row_label(key, model, tau)}
        for col in columns:
            if col in ("dir_frac", "shared_frac"):
                values = [rec["energy"][key][col] for rec in per_seed]
            else:
                values = [rec["metrics"][key].get(col, math.nan) for rec in per_seed]
            row[col] = dict(zip(("mean", "sd"), _mean_sd(values)))
        rows.append(row)
    red_keys = ["R_dir", "R_shared", "p_value_dir", "p_value_shared", "null_mean_dir", "null_q95_dir",
                "null_mean_shared", "null_q95_shared"]
    reductions = {}
    for key in red_keys:
        values = [rec["reduction"].get(key, math.nan) for rec in per_seed]
        mean, sd = _mean_sd(values)
        reductions[key] = {"mean": mean, "sd": sd, "per_seed": values}
    payload = {
        "model": model, "dataset": dataset, "tau": tau, "seeds": [rec["seed"] for rec in per_seed],
        "topk": topk, "permutations": permutations, "columns": columns, "summary": rows,
        "reductions": reductions, "per_seed": per_seed,
    }
    payload["markdown"] = _compare_markdown(payload)
    return payload


def _fmt(cell: dict[str, float]) -> str:
    mean, sd = cell["mean"], cell["sd"]
    if mean is None or not math.isfinite(mean):
        return "n/a"
    digits = 4 if abs(mean) < 100 else 1
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _compare_markdown(payload: dict[str, Any]) -> str:
    cols = payload["columns"]
    lines = [f"# {payload['model']} on {payload['dataset']}: RecBole baseline vs prior-separated",
             "", f"Seeds {payload['seeds']} (mean ± sd); same data split, seed and test contexts per pair.", "",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in payload["summary"]:
        lines.append(f"| {row['label']} | " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    red = payload["reductions"]
    lines += ["", f"Matched reductions (same contexts, same l; B = {payload['permutations']} item-label permutations):", "",
              "| measure | R (mean ± sd) | p-value per seed | null mean | null 95th pct |", "|---|---|---|---|---|"]
    for name in ("dir", "shared"):
        ps = ", ".join("n/a" if p is None or not math.isfinite(p) else f"{p:.4g}"
                       for p in red[f"p_value_{name}"]["per_seed"])
        lines.append(f"| R_{name} | {_fmt(red[f'R_{name}'])} | {ps} | {_fmt(red[f'null_mean_{name}'])} | "
                     f"{_fmt(red[f'null_q95_{name}'])} |")
    return "\n".join(lines) + "\n"


def _compare_csv(payload: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "metric", "mean", "sd", "n_seeds"])
    n = len(payload["seeds"])
    for row in payload["summary"]:
        for col in payload["columns"]:
            writer.writerow([row["label"], col, row[col]["mean"], row[col]["sd"], n])
    for key, cell in payload["reductions"].items():
        writer.writerow(["matched", key, cell["mean"], cell["sd"], n])
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> Path:
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return path


def _write_compare(out_dir: Path, payload: dict[str, Any], spectra: dict[str, np.ndarray],
                   nulls: dict[str, np.ndarray] | None) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": _write_text(out_dir / "compare.csv", _compare_csv(payload)),
             "md": _write_text(out_dir / "compare.md", payload["markdown"])}
    if spectra:
        files["spectra"] = plots.plot_spectra(spectra, out_dir / "spectra.png")
    energy_rows = {row["label"]: payload["per_seed"][0]["energy"][row["row"]] for row in payload["summary"][:2]}
    files["energy"] = plots.plot_energy(energy_rows, out_dir / "energy.png")
    if nulls is not None:
        first = payload["per_seed"][0]["reduction"]
        files["permutation"] = plots.plot_permutation_null(
            nulls, {"dir": first["R_dir"], "shared": first["R_shared"]}, out_dir / "permutation.png")
    payload["files"] = {k: str(v) for k, v in {**files, "json": out_dir / "compare.json"}.items()}
    files["json"] = write_json(out_dir / "compare.json", {k: v for k, v in payload.items() if k != "markdown"})
    return files


# --------------------------------------------------------------------------------------
# The beta sweep command
# --------------------------------------------------------------------------------------
def run_beta_sweep(model: str, dataset: str, betas: Sequence[float], config_file_list: list[str] | None = None,
                   config_dict: dict | None = None, output: str | Path | None = None) -> list[dict[str, Any]]:
    """Train one prior-separated model, then serve it at every ``beta`` (no retraining).

    Writes ``beta_sweep.{json,csv,md}``; returns one row per beta (RecBole's test metrics).
    """
    if not betas:
        raise PopPriorError("--beta-sweep needs at least one beta value")
    probe = arm_config(model, dataset, config_file_list, config_dict, seed=None, baseline=False)
    out_dir = _output_dir(output, probe, "beta_sweep")
    config = arm_config(model, dataset, config_file_list, config_dict, seed=int(probe["seed"]),
                        baseline=False, run_dir=out_dir / "run")
    arm = train_arm(SEP, config)
    rows = sweep_beta(arm.pipe.trainer, arm.pipe.test_data, betas)
    tau = arm.pipe.model.training_tau()
    for row in rows:
        row["tau"] = tau
    _write_sweep(out_dir, model, dataset, rows)
    return rows


def _write_sweep(out_dir: Path, model: str, dataset: str, rows: list[dict[str, Any]]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ["beta", "tau"] + sorted({k for row in rows for k in row} - {"beta", "tau"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in keys})
    md = [f"# Serve-time beta sweep: prior-separated {model} on {dataset}", "",
          "| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    for row in rows:
        md.append("| " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
    text = "\n".join(md) + "\n"
    print(text)
    files = {"csv": _write_text(out_dir / "beta_sweep.csv", buffer.getvalue()),
             "md": _write_text(out_dir / "beta_sweep.md", text)}
    files["json"] = write_json(out_dir / "beta_sweep.json", {"model": model, "dataset": dataset,
                                                            "rows": to_jsonable(rows)})  # last: the set is complete
    return files


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else "n/a"
    return "" if value is None else str(value)


__all__ = ["run_compare", "run_beta_sweep", "arm_config", "train_arm", "measure", "score_singular_values",
           "COMPARE_METRICS"]
