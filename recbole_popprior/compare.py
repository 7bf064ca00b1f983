"""Matched comparison of RecBole's model (tau = 0) and its prior-separated version (DESIGN.md §1, §3).

``run_compare`` trains, for every seed, both arms under one config (only ``prior_tau``
differs), evaluates both on the SAME test contexts (one shared test loader; the arms' own
loaders are checked to hold identical contexts) and reports accuracy, popularity-band recall,
coverage, average popularity, the energy fractions and the matched reductions ``R_dir`` and
``R_shared`` with their item-label permutation p-values. ``run_beta_sweep`` serves one trained
prior-separated model at several ``beta`` without retraining.

Outputs (atomic writes): ``compare.{json,csv,md}`` plus ``spectra.png``, ``energy.png`` and
``permutation.png``; ``beta_sweep.{json,csv,md}``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
from dataclasses import dataclass, field
from logging import getLogger
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from recbole.utils import get_local_time

from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator.energy import (ContextStats, matched_reduction, permuted_directions,
                                               popularity_direction, popularity_energy)
from recbole_popprior.prior import estimate_log_prior
from recbole_popprior.utils import atomic_write, to_jsonable, write_json

#: RecBole metrics every comparison / sweep evaluates (PopBandRecall: head/mid/tail recall)
COMPARE_METRICS = ["Recall", "MRR", "NDCG", "ItemCoverage", "AveragePopularity", "PopBandRecall"]
STD, SEP, SEP0 = "standard", "separated", "separated_beta0"
_MAX_SCORE_FALLBACK = 4096  # items up to which a non-factorised model uses scores as H and E = I


# --------------------------------------------------------------------------------------
# Serving beta (DESIGN §1: beta costs no retraining)
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def serving_beta(model: torch.nn.Module, beta: float | None) -> Iterator[torch.nn.Module]:
    """Temporarily serve ``model`` with ``scores = h . e + beta * log p_hat`` (``None`` = tau)."""
    if not hasattr(model, "prior_beta"):
        raise PopPriorError(f"{type(model).__name__} is not a prior-separated model: it has no serving beta")
    previous = model.prior_beta
    model.prior_beta = None if beta is None else float(beta)
    try:
        yield model
    finally:
        model.prior_beta = previous


def _trainer_for(trainer_or_model: Any, eval_data: Any) -> Any:
    if hasattr(trainer_or_model, "evaluate") and hasattr(trainer_or_model, "model"):
        return trainer_or_model
    from recbole_popprior.trainer import get_trainer

    config = eval_data.config
    return get_trainer(config)(config, trainer_or_model)


def evaluate_at(trainer: Any, eval_data: Any, beta: float | None = None) -> dict[str, float]:
    """RecBole's evaluation of ``trainer.model`` on ``eval_data``, served at ``beta`` (no checkpoint load)."""
    model = trainer.model
    context = serving_beta(model, beta) if hasattr(model, "prior_beta") else contextlib.nullcontext()
    with context, torch.no_grad():
        result = trainer.evaluate(eval_data, load_best_model=False, show_progress=False)
    return {k: float(v) for k, v in dict(result or {}).items()}


def sweep_beta(trainer_or_model: Any, eval_data: Any, betas: Sequence[float],
               train_data: Any = None) -> list[dict[str, float]]:
    """Evaluate one trained prior-separated model at every ``beta`` (DESIGN §1), no retraining.

    Accepts the run's trainer (after ``fit``), or a bare model: a trainer is then built from
    ``eval_data.config``, and ``train_data`` must be given (RecBole's popularity metrics count
    items on it). Returns one dict per beta: ``beta`` plus RecBole's metric results at that beta.
    """
    trainer = _trainer_for(trainer_or_model, eval_data)
    if train_data is not None:
        trainer.eval_collector.data_collect(train_data)
    if not hasattr(trainer.model, "prior_beta"):
        raise PopPriorError("the beta sweep needs a prior-separated model (not RecBole's own class)")
    rows = []
    # the energy metrics measure the learned dot product, which beta does not change: the
    # costly permutation test (a test-stage metric) runs at most once, at the first beta
    stage = getattr(trainer, "eval_stage", None)
    try:
        for k, beta in enumerate(betas):
            if stage is not None and k > 0:
                trainer.eval_stage = "valid"
            rows.append({"beta": float(beta), **evaluate_at(trainer, eval_data, float(beta))})
    finally:
        if stage is not None:
            trainer.eval_stage = stage
    return rows


# --------------------------------------------------------------------------------------
# Contexts and factors
# --------------------------------------------------------------------------------------
@dataclass
class Contexts:
    """The evaluation contexts of one model: ``H`` [m, d] and ``E`` [n_items, d] with ``Z = H E^T``."""

    H: np.ndarray
    E: np.ndarray
    users: torch.Tensor
    item_seq: torch.Tensor
    item_len: torch.Tensor
    targets: torch.Tensor
    factorised: bool = True

    @property
    def last_items(self) -> np.ndarray:
        """The last history item of every context (internal ids)."""
        rows = torch.arange(self.item_seq.shape[0])
        return self.item_seq[rows, self.item_len - 1].numpy()

    def digest(self) -> str:
        """Hash of the contexts' identity: users, histories, lengths and targets."""
        h = hashlib.sha256()
        for t in (self.users, self.item_seq, self.item_len, self.targets):
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def _factors(model: torch.nn.Module, interaction: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    from recbole_popprior.model.factors import factors

    try:  # one per-model table serves the plugin's models and RecBole's own
        return factors(model, interaction)
    except (AttributeError, TypeError, KeyError, RuntimeError, ValueError):
        return None


def _learned(model: torch.nn.Module, interaction: Any) -> torch.Tensor:
    from recbole_popprior.evaluator.collector import learned_scores

    return learned_scores(model, interaction)


def collect_contexts(model: torch.nn.Module, eval_data: Any) -> Contexts:
    """One pass over a full-sort loader: the contexts' ``H`` and the item table ``E`` (DESIGN §3).

    ``H E^T`` is checked against the model's learned scores on the first batch; a model whose
    learned score is not that dot product falls back to ``H = learned scores``, ``E = I``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    Hs, users, seqs, lens, targets = [], [], [], [], []
    E = None
    factorised = True
    uid, seq_field, len_field = model.USER_ID, model.ITEM_SEQ, model.ITEM_SEQ_LEN
    try:
        with torch.no_grad():
            for batch in eval_data:
                interaction = batch[0].to(device)
                pair = _factors(model, interaction) if factorised else None
                if pair is not None and E is None:
                    Z = (pair[0].double() @ pair[1].double().T)[:, 1:]
                    ref = _learned(model, interaction).double()[:, 1:]
                    scale = float(ref.abs().max()) or 1.0
                    if Z.shape != ref.shape or not torch.allclose(Z, ref, rtol=1e-5, atol=1e-5 * scale):
                        pair = None
                if pair is None:
                    factorised = False
                    scores = _learned(model, interaction)
                    if scores.shape[1] > _MAX_SCORE_FALLBACK:
                        raise PopPriorError(f"{type(model).__name__}: learned scores are not a dot product "
                                            f"and {scores.shape[1]} items are too many for the dense fallback")
                    scores = scores.clone()
                    scores[:, 0] = 0.0
                    Hs.append(scores.double().cpu())
                    E = torch.eye(scores.shape[1], dtype=torch.float64)
                else:
                    Hs.append(pair[0].double().cpu())
                    E = pair[1].double().cpu()
                users.append(interaction[uid].cpu())
                seqs.append(interaction[seq_field].cpu())
                lens.append(interaction[len_field].cpu())
                targets.append(interaction[model.ITEM_ID].cpu())
    finally:
        model.train(was_training)
    if not Hs:
        raise PopPriorError("the evaluation data holds no contexts")
    if not factorised and len(Hs) > 1 and Hs[0].shape[1] != E.shape[0]:  # pragma: no cover
        raise PopPriorError("inconsistent fallback score widths")
    return Contexts(torch.cat(Hs).numpy(), E.numpy(), torch.cat(users), torch.cat(seqs),
                    torch.cat(lens), torch.cat(targets), factorised)


def score_singular_values(H: np.ndarray, E: np.ndarray) -> np.ndarray:
    """Singular values of the item-centred learned scores ``Zc = H E1^T P_n`` (padding excluded).

    From the d x d problem: with ``G = H^T H`` and ``C = (P_n E1)^T (P_n E1)``, the squared
    singular values of ``Zc`` are the eigenvalues of ``G^(1/2) C G^(1/2)``; no m x n matrix.
    """
    H = np.asarray(H, dtype=np.float64)
    E1 = np.asarray(E, dtype=np.float64)[1:]
    Ec = E1 - E1.mean(axis=0)
    w, V = np.linalg.eigh(H.T @ H)
    root = (V * np.sqrt(np.clip(w, 0.0, None))) @ V.T
    s2 = np.linalg.eigvalsh(root @ (Ec.T @ Ec) @ root)
    return np.sqrt(np.clip(s2, 0.0, None))[::-1]


def reduction_null(std: Contexts, sep: Contexts, log_prior: Any, permutations: int,
                   seed: int) -> dict[str, np.ndarray]:
    """The permutation null of ``R_dir`` and ``R_shared`` (same draws as ``matched_reduction``)."""
    l = popularity_direction(log_prior)
    out = {"dir": np.empty(permutations), "shared": np.empty(permutations)}
    stats = []
    for ctx in (std, sep):
        s = ContextStats.from_H(ctx.H)
        stats.append((s, np.asarray(ctx.E, dtype=np.float64)[1:]))
    pos = 0
    for L in permuted_directions(l, permutations, seed):
        energies = []
        for s, E1 in stats:
            W = L @ E1
            energies.append((np.einsum("bi,ij,bj->b", W, s.G, W), (W @ s.hsum) ** 2 / s.m))
        with np.errstate(divide="ignore", invalid="ignore"):
            out["dir"][pos:pos + L.shape[0]] = 1.0 - energies[1][0] / energies[0][0]
            out["shared"][pos:pos + L.shape[0]] = 1.0 - energies[1][1] / energies[0][1]
        pos += L.shape[0]
    return out


# --------------------------------------------------------------------------------------
# One arm
# --------------------------------------------------------------------------------------
@dataclass
class Arm:
    """One trained model of a comparison: its pipeline, result record and contexts."""

    name: str
    pipe: Any
    result: dict[str, Any]
    contexts: Contexts | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def arm_config(model: str, dataset: str, config_file_list: list[str] | None, config_dict: dict | None,
               *, seed: int | None, baseline: bool, run_dir: Path | None = None, tau: float | None = None):
    """The plugin ``Config`` of one arm: the user's settings, this seed, and the arm's ``prior_tau``."""
    from recbole_popprior.quick_start import build_config

    overrides = dict(config_dict or {})
    overrides.setdefault("metrics", list(COMPARE_METRICS))
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
    from recbole_popprior.quick_start import build_pipeline, train_and_test

    pipe = build_pipeline(config)
    result = train_and_test(pipe, saved=saved)
    return Arm(name, pipe, result)


def _train_digest(pipe: Any) -> str:
    ds = pipe.train_data.dataset
    h = hashlib.sha256()
    for f in (ds.uid_field, ds.iid_field):
        h.update(ds.inter_feat[f].to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def training_log_prior(pipe: Any) -> np.ndarray:
    """``log p_hat`` of the arm's training targets (DESIGN §2), the same for both arms."""
    ds = pipe.train_data.dataset
    alpha = float(pipe.config["prior_alpha"])
    return estimate_log_prior(ds.inter_feat[ds.iid_field], ds.item_num, alpha).double().numpy()


# --------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------
_TABLE_METRICS = ("ndcg", "recall", "mrr", "headrecall", "midrecall", "tailrecall",
                  "itemcoverage", "averagepopularity")


def _output_dir(output: str | Path | None, config: Any, kind: str) -> Path:
    if output:
        return Path(output)
    return Path(config["output"] or "saved") / f"{kind}-{config['model']}-{config['dataset']}-{get_local_time()}"


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
    topk = int((probe["topk"] or [10])[0])
    permutations = int(probe["energy_permutations"])
    energy_seed = int(probe["energy_seed"])
    out_dir = _output_dir(output, probe, "compare")
    seed_values = _seed_list(probe, seeds)

    per_seed, spectra, nulls = [], {}, None
    for seed in seed_values:
        arms = {}
        for name, baseline in ((STD, True), (SEP, False)):
            config = arm_config(model, dataset, config_file_list, config_dict, seed=seed, baseline=baseline,
                                run_dir=out_dir / "runs" / f"seed{seed}-{name}")
            arms[name] = train_arm(name, config)
        std, sep = arms[STD], arms[SEP]
        shared_test = std.pipe.test_data
        record = _compare_seed(std, sep, shared_test, topk, permutations, energy_seed)
        record["seed"] = seed
        per_seed.append(record)
        if nulls is None:  # plots show the first seed
            log_prior = training_log_prior(std.pipe)
            nulls = reduction_null(std.contexts, sep.contexts, log_prior, permutations, energy_seed) \
                if permutations > 0 else None
            spectra = {f"RecBole {model} (tau=0)": score_singular_values(std.contexts.H, std.contexts.E),
                       f"prior-separated (tau={record['tau']:g})": score_singular_values(sep.contexts.H, sep.contexts.E)}
        logger.info(f"compare seed {seed}: R_dir={record['reduction']['R_dir']:.4f} "
                    f"R_shared={record['reduction']['R_shared']:.4f}")

    payload = _summarise(model, dataset, per_seed, topk, permutations)
    files = _write_compare(out_dir, payload, spectra, nulls)
    payload["files"] = {k: str(v) for k, v in files.items()}
    print(payload["markdown"])
    return payload


def _compare_seed(std: Arm, sep: Arm, shared_test: Any, topk: int, permutations: int,
                  energy_seed: int) -> dict[str, Any]:
    """Evaluate one seed's pair on the same contexts; energies, reductions and identity checks."""
    own_std = collect_contexts(std.pipe.model, std.pipe.test_data)
    own_sep = collect_contexts(sep.pipe.model, sep.pipe.test_data)
    contexts_identical = own_std.digest() == own_sep.digest()
    train_identical = _train_digest(std.pipe) == _train_digest(sep.pipe)
    if not (contexts_identical and train_identical):
        raise RuntimeError("the two arms did not get the same data split: compare is not matched")
    # both models are measured and evaluated on one loader: the same contexts, in the same order
    std.contexts = own_std if shared_test is std.pipe.test_data else collect_contexts(std.pipe.model, shared_test)
    sep.contexts = own_sep if shared_test is sep.pipe.test_data else collect_contexts(sep.pipe.model, shared_test)

    log_prior = training_log_prior(std.pipe)
    sep_prior = sep.pipe.model.log_prior.double().cpu().numpy()
    if not np.allclose(np.exp(log_prior[1:]), np.exp(sep_prior[1:]), rtol=1e-5, atol=1e-9):
        raise RuntimeError("the two arms counted different training priors")

    with serving_beta(sep.pipe.model, None) as served:
        tau = float(served.beta)  # beta = tau (the learned value when prior_tau is "learned")
    metrics = {
        STD: evaluate_at(std.pipe.trainer, shared_test),
        SEP: evaluate_at(sep.pipe.trainer, shared_test, None),
        SEP0: evaluate_at(sep.pipe.trainer, shared_test, 0.0),
    }
    energy = {STD: popularity_energy(std.contexts.H, std.contexts.E, log_prior),
              SEP: popularity_energy(sep.contexts.H, sep.contexts.E, log_prior)}
    energy[SEP0] = energy[SEP]  # beta changes serving only; the learned dot product is the same
    reduction = matched_reduction((std.contexts.H, std.contexts.E), (sep.contexts.H, sep.contexts.E),
                                  permutations=permutations, seed=energy_seed, log_prior=log_prior)
    return {
        "tau": tau,
        "metrics": metrics,
        "energy": {k: {key: v[key] for key in ("total", "dir", "shared", "specific", "dir_frac", "shared_frac", "m")}
                   for k, v in energy.items()},
        "reduction": reduction,
        "contexts_identical": contexts_identical,
        "train_identical": train_identical,
        "contexts_digest": {STD: own_std.digest(), SEP: own_sep.digest()},
        "train_digest": {STD: _train_digest(std.pipe), SEP: _train_digest(sep.pipe)},
        "factorised": {STD: std.contexts.factorised, SEP: sep.contexts.factorised},
        "best_valid_score": {STD: std.result.get("best_valid_score"), SEP: sep.result.get("best_valid_score")},
        "run_dir": {STD: std.result.get("run_dir"), SEP: sep.result.get("run_dir")},
    }


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
        "reductions": reductions,
        "contexts_identical": all(rec["contexts_identical"] for rec in per_seed),
        "per_seed": per_seed,
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
    from recbole_popprior import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": write_json(out_dir / "compare.json", {k: v for k, v in payload.items() if k != "markdown"}),
             "csv": _write_text(out_dir / "compare.csv", _compare_csv(payload)),
             "md": _write_text(out_dir / "compare.md", payload["markdown"])}
    files["spectra"] = plots.plot_spectra(spectra, out_dir / "spectra.png")
    energy_rows = {row["label"]: payload["per_seed"][0]["energy"][row["row"]] for row in payload["summary"][:2]}
    files["energy"] = plots.plot_energy(energy_rows, out_dir / "energy.png")
    if nulls is not None:
        first = payload["per_seed"][0]["reduction"]
        files["permutation"] = plots.plot_permutation_null(
            nulls, {"dir": first["R_dir"], "shared": first["R_shared"]}, out_dir / "permutation.png")
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
    tau = arm.pipe.model.tau
    tau = float(tau.detach()) if isinstance(tau, torch.Tensor) else float(tau)
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
    return {"json": write_json(out_dir / "beta_sweep.json", {"model": model, "dataset": dataset,
                                                             "rows": to_jsonable(rows)}),
            "csv": _write_text(out_dir / "beta_sweep.csv", buffer.getvalue()),
            "md": _write_text(out_dir / "beta_sweep.md", text)}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else "n/a"
    return "" if value is None else str(value)


__all__ = ["run_compare", "run_beta_sweep", "sweep_beta", "serving_beta", "evaluate_at", "collect_contexts",
           "score_singular_values", "reduction_null", "Contexts", "COMPARE_METRICS"]
