"""Matched comparison of RecBole's model with the prior-separated model and other arms (docs/DESIGN.md §1, §3).

``run_compare`` trains, for every seed, one model per arm (:mod:`recbole_popprior.arms`: by
default RecBole's own model, ``standard``, and the prior-separated model, ``separated``) under
one config, evaluates every arm on the SAME test contexts (the standard arm's test loader; the
arms' data splits are checked to be identical) and reports accuracy, popularity-band recall,
coverage, average popularity, the energy fractions, the embedding spectrum, each arm's own
permutation tests, each non-standard arm's matched reductions ``R_dir`` and ``R_shared``
against ``standard`` with their permutation p-values, and intervals over seeds
(:mod:`recbole_popprior.compare_report`, DESIGN §3.2). The energies come from the same
collector that feeds the ``PopEnergy`` metric, so the comparison's figures and the metrics'
figures are one computation.

Outputs, committed as one set (:mod:`recbole_popprior.staging`: written in a staging folder, then
renamed into place, ``compare.json`` last, so its presence means the set is complete):
``runs/seed<k>-<arm>/``, ``compare.{csv,md}``, ``spectra.png``, ``energy.png``, ``permutation.png``,
``arms.png`` and ``compare.json``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import yaml
from recbole.utils import get_local_time

from recbole_popprior import plots
from recbole_popprior.arms import ARMS, REFERENCE, ArmSpec, arm_overrides, check_arms, parse_arms, resolve_arm
from recbole_popprior.compare_report import SPECIFICITY_KEYS, compare_csv, headline_text, summarise
from recbole_popprior.config import properties_file
from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator.collector import EnergyState
from recbole_popprior.evaluator.energy import item_table, matched_reduction, reduction_from_energies
from recbole_popprior.prior import estimate_log_prior
from recbole_popprior.quick_start import build_config, build_pipeline, log_report_folder, make_folder, train_and_test
from recbole_popprior.serving import evaluate_at
from recbole_popprior.staging import StagedSet
from recbole_popprior.trained import with_metrics
from recbole_popprior.utils import atomic_write, to_jsonable

#: RecBole metrics every comparison evaluates (PopBandRecall: head/mid/tail recall; PopEnergy and
#: EmbeddingSpectrum: the statistics the energy columns and the matched reductions are computed
#: from; ``run_compare`` adds PopPermutation, each arm's own permutation tests)
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
    statistics of its evaluation on the shared test contexts (at its own serving beta)."""

    name: str
    pipe: Any
    result: dict[str, Any]
    state: EnergyState | None = None


def arm_config(model: str, dataset: str, config_file_list: list[str] | None, config_dict: dict | None,
               *, seed: int | None, baseline: bool, run_dir: Path | None = None, tau: float | None = None,
               overrides: Mapping[str, Any] | None = None):
    """The plugin ``Config`` of one arm: the user's settings, this seed, the arm's ``prior_tau``
    and the arm's ``overrides`` (:func:`recbole_popprior.arms.arm_overrides`)."""
    settings = dict(config_dict or {})
    settings["metrics"] = with_metrics(settings.get("metrics", COMPARE_METRICS), _ENERGY_METRICS)
    settings.update(popprior_baseline=bool(baseline), prior_beta=None)
    if seed is not None:
        settings["seed"] = int(seed)
    if baseline:
        settings["prior_tau"] = 0.0
    elif tau is not None:
        settings["prior_tau"] = tau
    settings.update(overrides or {})
    if run_dir is not None:
        settings["run_dir"] = str(run_dir)
    return build_config(model, dataset, config_file_list, settings)


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


def measure(arm: Arm, eval_data: Any, beta: float | None = None, *, primary: bool = True) -> dict[str, float]:
    """Evaluate ``arm`` on ``eval_data`` (at serving ``beta``).

    ``primary``: a test-stage evaluation (the ``PopPermutation`` tests run) whose energy
    statistics become ``arm.state``. Otherwise only the serving metrics are wanted: the learned
    dot product, and so every energy statistic, does not depend on ``beta``, so the permutations
    are skipped and ``arm.state`` is kept.
    """
    trainer = arm.pipe.trainer
    stage, trainer.eval_stage = trainer.eval_stage, "test" if primary else "valid"
    try:
        metrics = evaluate_at(trainer, eval_data, beta)
    finally:
        trainer.eval_stage = stage
    if primary:
        arm.state = trainer.eval_collector.last_state
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
def output_folder(output: str | Path | None, config_output: str | Path, kind: str, model: Any, dataset: Any) -> Path:
    """``--output`` itself when given, else ``<config output>/<kind>-<model>-<dataset>-<time>``."""
    if output:
        return Path(output)
    return Path(config_output) / f"{kind}-{model}-{dataset}-{get_local_time()}"


def _seed_list(config: Any, seeds: int) -> list[int]:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise PopPriorError(f"--seeds must be an integer >= 1, got {seeds!r}")
    base = int(config["seed"])
    return [base + k for k in range(seeds)]


def _shipped_defaults(config: Any) -> dict[str, Any]:
    """The plugin's ``properties/overall.yaml``, read with RecBole's yaml loader (the keys arms may set)."""
    with open(properties_file("overall.yaml"), encoding="utf-8") as handle:
        return yaml.load(handle, Loader=config.yaml_loader) or {}


@dataclass(frozen=True)
class _Plan:
    """What one arm trains with and which rows it reports."""

    spec: ArmSpec
    overrides: dict[str, Any]
    tau: Any  # the configured prior_tau (a number or "learned")

    @property
    def rows(self) -> tuple[str, ...]:
        """``name``, plus ``name_beta0`` for a prior-separated arm (served at beta = tau and at 0)."""
        if self.spec.baseline or (self.tau != "learned" and float(self.tau) == 0.0):
            return (self.spec.name,)
        return (self.spec.name, f"{self.spec.name}_beta0")


def _plan(names: Sequence[str], table: Mapping[str, ArmSpec], probe: Any) -> list[_Plan]:
    defaults = _shipped_defaults(probe)
    check_arms(names, table, defaults, probe.final_config_dict)
    plans = []
    for name in names:
        spec = resolve_arm(table[name], probe.final_config_dict)
        tau = 0.0 if spec.baseline else spec.overrides.get("prior_tau", probe["prior_tau"])
        plans.append(_Plan(spec, arm_overrides(spec, table, defaults), tau))
    return plans


def run_compare(model: str, dataset: str, config_file_list: list[str] | None = None,
                config_dict: dict | None = None, seeds: int = 3, output: str | Path | None = None,
                arms: str | Iterable[str] | None = None, arm_table: Mapping[str, ArmSpec] | None = None
                ) -> dict[str, Any]:
    """Train every arm per seed and compare each with RecBole's ``model`` (the ``standard`` arm).

    ``arms``: names from ``arm_table`` (default :data:`recbole_popprior.arms.ARMS`); None =
    ``standard,separated``. All arms of a seed share the config, the data split, the seed and
    the test contexts. Returns the ``compare.json`` payload (``summary``, ``deltas``,
    ``specificity``, ``reductions``, ``per_seed``, ``files``; DESIGN §3.2).
    """
    logger = getLogger()
    table = dict(arm_table or ARMS)
    names = parse_arms(arms, table)
    config_dict = dict(config_dict or {})
    config_dict["metrics"] = with_metrics(config_dict.get("metrics", COMPARE_METRICS),
                                          (*_ENERGY_METRICS, "PopPermutation"))
    probe = arm_config(model, dataset, config_file_list, config_dict, seed=None, baseline=False)
    plans = _plan(names, table, probe)
    if SEP in names and probe["prior_tau"] != "learned" and float(probe["prior_tau"]) == 0.0:
        raise PopPriorError("--compare needs a non-zero prior_tau for the prior-separated arm")
    topk = int(probe["topk"][0])
    permutations = int(probe["energy_permutations"])
    energy_seed = int(probe["energy_seed"])
    confidence = float(probe["compare_confidence"])
    out_dir = output_folder(output, probe["output"], "compare", probe["model"], probe["dataset"])
    seed_values = _seed_list(probe, seeds)

    with output_set(out_dir, "compare", "compare.json") as stage:  # one commit: nothing half-written
        per_seed, figures = [], {}
        for seed in seed_values:
            config_of = functools.partial(_seed_config, model, dataset, config_file_list, config_dict, seed,
                                          stage.path())
            record = _run_seed(plans, config_of, permutations, energy_seed, figures if not per_seed else None)
            record["seed"] = seed
            per_seed.append(record)
            for name, red in record["reductions"].items():
                logger.info(f"compare seed {seed} {name}: R_dir={red['R_dir']:.4f} R_shared={red['R_shared']:.4f}")

        taus = per_seed[0]["tau"]  # labels and plots use the first seed
        spectra = {_label(plan, model, taus[plan.spec.name]): figures["spectra"][plan.spec.name]
                   for plan in plans if plan.spec.name in figures["spectra"]}
        first_nulls = figures["nulls"]
        arms_info = [_arm_info(plan, model, taus[plan.spec.name]) for plan in plans]
        payload = summarise(model, dataset, arms_info, per_seed, topk=topk, permutations=permutations,
                            confidence=confidence)
        payload["tau"] = taus.get(SEP)
        files = _write_compare(stage, payload, spectra, first_nulls)
    payload["files"] = {k: str(v) for k, v in files.items()}
    print(headline_text(payload, str(files["md"])), flush=True)
    log_report_folder(out_dir, "compare.md, compare.csv, compare.json, *.png, runs/")
    return payload


@contextlib.contextmanager
def output_set(out_dir: Path, kind: str, marker: str) -> Iterator[StagedSet]:
    """The output folder (created, one line when it cannot be) and a :class:`StagedSet` in it; a
    start that fails leaves no folder it created."""
    created = make_folder(out_dir, "the run folder")
    try:
        with StagedSet(out_dir, kind, marker) as stage:
            yield stage
    except BaseException:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise


def dump_json(handle: Any, payload: Any) -> None:
    json.dump(to_jsonable(payload), handle, indent=2)
    handle.write("\n")


def _seed_config(model: str, dataset: str, config_file_list: list[str] | None, config_dict: dict, seed: int,
                 out_dir: Path, plan: _Plan) -> Any:
    """One arm's config for one seed (its run folder: ``runs/seed<seed>-<arm>``)."""
    return arm_config(model, dataset, config_file_list, config_dict, seed=seed, baseline=plan.spec.baseline,
                      overrides=plan.overrides, run_dir=out_dir / "runs" / f"seed{seed}-{plan.spec.name}")


def _label(plan: _Plan, model: str, tau: float, beta: float | None = None) -> str:
    return plan.spec.label.format(model=model, tau=tau, beta=tau if beta is None else beta)


def _arm_info(plan: _Plan, model: str, tau: float) -> dict[str, Any]:
    """Name, labels and settings of one arm, for the report."""
    labels = {plan.spec.name: _label(plan, model, tau)}
    if len(plan.rows) > 1:
        primary = labels[plan.spec.name]
        labels[plan.rows[1]] = (_label(plan, model, tau, 0.0) if "{beta" in plan.spec.label
                                else f"{primary} served at beta=0")
    return {"name": plan.spec.name, "label": labels[plan.spec.name], "baseline": plan.spec.baseline, "tau": tau,
            "overrides": {k: v for k, v in plan.spec.overrides.items()}, "rows": list(plan.rows),
            "row_labels": labels}


def _run_seed(plans: Sequence[_Plan], config_of: Callable[[_Plan], Any], permutations: int, energy_seed: int,
              figures: dict[str, Any] | None) -> dict[str, Any]:
    """Train and evaluate one seed's arms on the same contexts: accuracy, energies, own tests and
    matched reductions. Arms are trained one after the other, and each is released (model,
    trainer, optimiser, its loaders) as soon as it is measured, before the next one trains: only
    the standard arm's test loader (every arm's test contexts) and the arms' host-side energy
    statistics stay (DESIGN §3.2). ``figures``: filled with the spectra and the permutation
    nulls when given (the first seed)."""
    record: dict[str, Any] = {"tau": {}, "metrics": {}, "energy": {}, "specificity": {}, "reductions": {},
                              "data_digest": {}, "energy_path": {}, "best_valid_score": {}, "run_dir": {},
                              "fit_seconds": {}}
    if figures is not None:
        figures.update(spectra={}, nulls={})
    std_state: EnergyState | None = None
    shared_test = log_prior = None
    for plan in plans:
        name = plan.spec.name
        arm = train_arm(name, config_of(plan))
        record["data_digest"][name] = data_digest(arm.pipe)
        if std_state is None:
            shared_test, log_prior = arm.pipe.test_data, _training_log_prior(arm)
        elif record["data_digest"][name] != record["data_digest"][REFERENCE]:
            raise RuntimeError(f"arm {name} did not get the standard arm's data split: compare is not matched")
        else:
            _check_prior(arm, log_prior)
        _measure_arm(record, plan, arm, shared_test, permutations)  # one loader: same contexts, same order
        model_name = type(arm.pipe.model).__name__
        release_arm(arm)
        if std_state is None:
            std_state, std_model = arm.state, model_name
        else:
            null: dict[str, np.ndarray] = {}
            record["reductions"][name] = _matched(std_state, arm.state, log_prior, permutations, energy_seed, null,
                                                  names=((REFERENCE, std_model), (name, model_name)))
            if figures is not None:
                figures["nulls"][name] = null or None
        if figures is not None and arm.state.contexts is not None:
            figures["spectra"][name] = score_singular_values(arm.state.contexts.G, arm.state.E)
        del arm
    return record


def release_arm(arm: Arm) -> None:
    """Free a measured arm's pipeline (model, trainer, optimiser, data loaders and whatever they hold
    on the device); its energy statistics move to the host first (DESIGN §3.2)."""
    if arm.state is not None:
        arm.state.to_host()
    arm.pipe = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _measure_arm(record: dict[str, Any], plan: _Plan, arm: Arm, shared_test: Any, permutations: int) -> None:
    """Evaluate ``arm`` on the shared test contexts; fill its entries of ``record`` in place."""
    name, model = plan.spec.name, arm.pipe.model
    record["tau"][name] = model.training_tau() if hasattr(model, "training_tau") else 0.0
    record["metrics"][name] = measure(arm, shared_test, None)
    for row in plan.rows[1:]:  # the beta = 0 serving of a prior-separated arm
        record["metrics"][row] = measure(arm, shared_test, 0.0, primary=False)
    energy, embedding = arm.state.energy(), arm.state.embedding()
    values = {k: energy[k] for k in _ENERGY_KEYS}
    values.update(emb_r1=embedding["R1"], emb_erank=embedding["erank"])
    for row in plan.rows:  # beta changes serving only; the learned dot product is the same
        record["energy"][row] = values
    record["specificity"][name] = {k: energy.get(k) for k in SPECIFICITY_KEYS}
    if energy.get("p_value") is None:
        record["specificity"][name]["p_missing"] = (
            "energy_permutations = 0" if permutations == 0 else
            f"the {arm.state.path} energy path of {type(model).__name__} returned no permutation test")
    record["energy_path"][name] = arm.state.path
    record["best_valid_score"][name] = arm.result.get("best_valid_score")
    record["run_dir"][name] = arm.result.get("run_dir")
    record["fit_seconds"][name] = arm.result.get("fit_seconds")


def _training_log_prior(std: Arm) -> np.ndarray:
    """``log p_hat`` of the training targets (docs/DESIGN.md §2): what every arm's measures use."""
    train = std.pipe.train_data.dataset
    return estimate_log_prior(train.inter_feat[train.iid_field], train.item_num,
                              float(std.pipe.config["prior_alpha"])).double().numpy()


def _check_prior(arm: Arm, log_prior: np.ndarray) -> None:
    """A prior-separated arm must have counted the same training prior as the standard arm's data
    (an arm with ``prior_source: truth`` counts nothing: it trains with the generator's marginal)."""
    if getattr(arm.pipe.model, "prior_source", "estimate") == "truth":
        return
    own = getattr(arm.pipe.model, "log_prior", None)
    if isinstance(own, torch.Tensor) and not np.allclose(
            np.exp(log_prior[1:]), np.exp(own.double().cpu().numpy()[1:]), rtol=1e-5, atol=1e-9):
        raise RuntimeError(f"arm {arm.name} counted another training prior than {REFERENCE}")


def _matched(std: EnergyState, sep: EnergyState, log_prior: np.ndarray, permutations: int,
             seed: int, null_out: dict[str, np.ndarray], names: tuple[tuple[str, str], tuple[str, str]]
             ) -> dict[str, Any]:
    """``matched_reduction`` on the two evaluations' statistics (docs/DESIGN.md §3); its null
    draws go to ``null_out`` (for the plot). ``names``: ``(arm, model class)`` of the standard
    and the compared arm. Where the tests cannot run, ``p_missing`` says why (the report prints it)."""
    if std.contexts is not None and sep.contexts is not None:
        out = matched_reduction((std.contexts, std.E), (sep.contexts, sep.E), permutations=permutations,
                                seed=seed, log_prior=log_prior, null_out=null_out)
        if permutations == 0:
            out["p_missing"] = "energy_permutations = 0: no permutation test (p_iso_shared is still exact)"
        return out
    # the streaming fallback (scores that are not H E^T) keeps the energies, not their factors
    e_std, e_sep = std.energy(), sep.energy()
    out = reduction_from_energies(e_std["dir"], e_sep["dir"], e_std["shared"], e_sep["shared"])
    streaming = [f"{arm} ({model})" for (arm, model), state in zip(names, (std, sep)) if state.contexts is None]
    out["p_missing"] = (f"the learned scores of {' and '.join(streaming)} are not H E^T (streaming energy path): "
                        "R is exact, but its permutation tests need both models' factors")
    return out


def _write_text(path: Path, text: str) -> Path:
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return path


def _write_compare(stage: StagedSet, payload: dict[str, Any], spectra: dict[str, np.ndarray],
                   nulls: Mapping[str, dict[str, np.ndarray] | None]) -> dict[str, Path]:
    """Every file of the set into ``stage``, then the commit (``compare.json`` last); returns the
    files' final paths (the payload's paths are the final ones too)."""
    files = {"csv": _write_text(stage.path("compare.csv"), compare_csv(payload)),
             "md": _write_text(stage.path("compare.md"), payload["markdown"])}
    first, seeds = payload["per_seed"][0], payload["seeds"]
    if spectra:
        files["spectra"] = plots.plot_spectra(spectra, stage.path("spectra.png"), seed=first["seed"])
    labels = {arm["name"]: arm["label"] for arm in payload["arms"]}
    files["energy"] = plots.plot_energy({labels[name]: [rec["energy"][name] for rec in payload["per_seed"]]
                                         for name in labels}, stage.path("energy.png"), seeds)
    panels = {labels[name]: (null, {"dir": first["reductions"][name]["R_dir"],
                                    "shared": first["reductions"][name]["R_shared"]})
              for name, null in nulls.items() if null is not None}
    if panels:
        files["permutation"] = plots.plot_permutation_nulls(panels, stage.path("permutation.png"),
                                                            seed=first["seed"], n_seeds=len(seeds))
    files["arms"] = plots.plot_arms(payload["summary"], stage.path("arms.png"),
                                    (f"ndcg@{payload['topk']}", "dir_frac", "shared_frac"), seeds)
    files = {k: stage.final(Path(v)) for k, v in files.items()}
    payload.update(stage.final({k: v for k, v in payload.items() if k != "markdown"}))
    payload["files"] = {k: str(v) for k, v in {**files, "json": stage.out_dir / "compare.json"}.items()}
    files["json"] = stage.commit(lambda handle: dump_json(handle, {k: v for k, v in payload.items()
                                                                   if k != "markdown"}))
    return files


__all__ = ["run_compare", "output_folder", "output_set", "dump_json", "arm_config", "train_arm", "measure",
           "score_singular_values", "release_arm", "COMPARE_METRICS", "Arm"]
