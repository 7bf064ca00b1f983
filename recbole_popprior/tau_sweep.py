"""The tau sweep: one model trained per prior weight ``tau`` and seed, every run measured against the
``tau = 0`` run of its seed on the same contexts (docs/DESIGN.md §12).

``run_tau_sweep`` trains, for every seed, the reference ``tau = 0`` (RecBole's own model, as the
``standard`` arm of ``--compare``) and one prior-separated model per variant: a ``tau`` (a number
or ``learned``), a ``prior_source`` (``estimate`` or, on the synthetic data, ``true``) and a
``prior_mode`` (``static`` or ``windowed``). Training and measuring go through the comparison's
own pieces (:func:`recbole_popprior.compare.arm_config`, ``_measure_arm``, ``_matched``), so
every number means what it means in ``--compare``.

**Resumable.** Each (variant, seed) run lives in ``<output>/runs/<variant>/seed<seed>/`` and is
complete when its ``run.json`` exists (written last, after ``contexts.npz``). A rerun of the same
command skips complete runs and restarts a run that was killed midway; a run whose settings
differ from the command's is an error, never silently mixed in. The report
(:mod:`recbole_popprior.tau_sweep_report`) is rebuilt from the saved runs alone.

What a run saves besides RecBole's own run folder (``recbole/``): the comparison's one-arm record
(metrics at ``beta = tau`` and ``beta = 0``, energies, own permutation tests, trained ``tau``),
epochs trained and the validation curve, wall times, and in ``contexts.npz`` the test contexts'
``H``, the item table ``E``, each context's previous and target item, the training prior and
windowed priors, and on the synthetic data its truth in RecBole ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from recbole_popprior.arms import ARMS, ArmSpec, resolve_arm
from recbole_popprior.compare import (COMPARE_METRICS, Arm, _ENERGY_METRICS, _measure_arm, _Plan,
                                      _training_log_prior, arm_config, data_digest, release_arm)
from recbole_popprior.data.synthetic import load_truth, truth_in_recbole_ids
from recbole_popprior.errors import PopPriorError
from recbole_popprior.evaluator.energy import ContextStats
from recbole_popprior.model.factors import factors
from recbole_popprior.prior import estimate_windowed_log_prior
from recbole_popprior.prior_source import PRIOR_SOURCES
from recbole_popprior.quick_start import build_pipeline, train_and_test
from recbole_popprior.tau_sweep_plot import plot_tau_sweep
from recbole_popprior.tau_sweep_report import compare_from_runs, kept_epoch, summarise_sweep, sweep_csv, sweep_markdown
from recbole_popprior.trained import with_metrics
from recbole_popprior.utils import atomic_write, write_json

REFERENCE_NAME = "standard"  # the tau = 0 run's name inside its record (the comparison's reference arm)
RUN_FILE, CONTEXTS_FILE = "run.json", "contexts.npz"
MODES = ("static", "windowed")
#: keys the sweep chooses per run; the user's config must leave them alone
SWEPT_KEYS = ("prior_tau", "prior_source", "prior_mode", "popprior_baseline")
#: settings that do not change a run's numbers (left out of its digest, so a resume may differ in them);
#: ``seed`` only picks the first of the sweep's seeds: each run's own seed is in its digest, so runs of
#: ``--seed=2022 --seeds=1`` (another machine, another folder) join a ``--seeds=3`` sweep of base 2020
_COSMETIC_KEYS = frozenset({"output", "show_progress", "state", "checkpoint_dir", "seed"})


# --------------------------------------------------------------------------------------
# What is swept
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One trained configuration of the sweep: ``tau`` (a float or ``"learned"``), the prior's source and mode."""

    tau: float | str
    source: str = "estimate"
    mode: str = "static"

    @property
    def reference(self) -> bool:
        """The ``tau = 0`` run (RecBole's own model): its source and mode do not matter."""
        return self.tau == 0.0

    @property
    def key(self) -> str:
        """``tau=1``, ``tau=learned``, ``tau=1,prior=truth``, ``tau=1,windowed``."""
        parts = [f"tau={tau_text(self.tau)}"]
        if not self.reference and self.source != "estimate":
            parts.append(f"prior={self.source}")
        if not self.reference and self.mode != "static":
            parts.append(self.mode)
        return ",".join(parts)

    @property
    def folder(self) -> str:
        return self.key.replace("=", "").replace(",", "-")

    def overrides(self) -> dict[str, Any]:
        if self.reference:
            return {"prior_tau": 0.0}
        return {"prior_tau": self.tau, "prior_source": self.source, "prior_mode": self.mode}

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, **dataclasses.asdict(self)}


def tau_text(tau: float | str) -> str:
    return tau if isinstance(tau, str) else f"{tau:g}"


def parse_taus(text: str | Sequence[Any]) -> list[float | str]:
    """``"0,0.5,1,1.5,learned"`` -> ``[0.0, 0.5, 1.0, 1.5, "learned"]``; ``0`` must be among them."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    items = [t for t in items if t != ""]
    taus: list[float | str] = []
    for item in items:
        if isinstance(item, str) and item.lower() == "learned":
            value: float | str = "learned"
        else:
            try:
                value = float(item)
            except (TypeError, ValueError):
                raise PopPriorError(f"--taus takes numbers or 'learned' separated by commas, got {item!r}") from None
            if not math.isfinite(value):
                raise PopPriorError(f"--taus: tau must be finite, got {item!r}")
        if value in taus:
            raise PopPriorError(f"--taus names tau={tau_text(value)} twice")
        taus.append(value)
    if 0.0 not in taus:
        raise PopPriorError("--taus must include 0: every run is measured against the tau=0 run of its seed")
    return taus


def _parse_choices(values: str | Iterable[str], allowed: Sequence[str], flag: str) -> list[str]:
    items = [v.strip() for v in (values.split(",") if isinstance(values, str) else values) if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise PopPriorError(f"{flag} takes {', '.join(allowed)} separated by commas, got {','.join(items)!r}")
    if len(set(items)) != len(items):
        raise PopPriorError(f"{flag} names a value twice: {','.join(items)}")
    return items


def plan_variants(taus: Sequence[float | str], sources: str | Iterable[str] = ("estimate",),
                  modes: str | Iterable[str] = ("static",)) -> list[Variant]:
    """The reference first, then every non-zero tau x source x mode. ``prior_source: truth`` has one
    pooled marginal, so it is not crossed with ``windowed`` (config._validate refuses the pair)."""
    sources = _parse_choices(sources, PRIOR_SOURCES, "--prior-sources")
    modes = _parse_choices(modes, MODES, "--prior-modes")
    variants = [Variant(0.0)]
    for tau in taus:
        if tau == 0.0:
            continue
        variants += [Variant(tau, s, m) for s in sources for m in modes if not (s == "truth" and m == "windowed")]
    return variants


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------
@dataclass
class SweepSetup:
    """Everything every run of one sweep shares."""

    model: str
    dataset: str
    config_file_list: list[str] | None
    config_dict: dict[str, Any]
    out_dir: Path
    standard: ArmSpec  # the reference arm under this config (RecBole's class, or the plugin's at tau=0)
    base_seed: int  # the runs' seeds are base_seed, base_seed + 1, ... (as in --compare)


def _file_digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def run_digest(setup: SweepSetup, variant: Variant, seed: int) -> str:
    """Hash of what decides a run's numbers: model, dataset, settings, config files' contents, variant, seed."""
    payload = {"model": setup.model, "dataset": setup.dataset, "seed": int(seed), "variant": variant.as_dict(),
               "config": {k: repr(v) for k, v in sorted(setup.config_dict.items()) if k not in _COSMETIC_KEYS},
               "files": [_file_digest(p) for p in setup.config_file_list or []]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def run_folder(out_dir: Path, variant: Variant, seed: int) -> Path:
    return Path(out_dir) / "runs" / variant.folder / f"seed{seed}"


def _config(setup: SweepSetup, variant: Variant, seed: int | None, run_dir: Path | None = None) -> Any:
    spec = setup.standard if variant.reference else ArmSpec(variant.key, "")
    overrides = {**variant.overrides(), "popprior_baseline": bool(spec.baseline)}
    return arm_config(setup.model, setup.dataset, setup.config_file_list, setup.config_dict, seed=seed,
                      baseline=spec.baseline, overrides=overrides, run_dir=run_dir)


def context_rows(model: torch.nn.Module, loader: Any) -> dict[str, np.ndarray]:
    """``H [m, d]``, ``E [n_items, d]`` and each context's previous and target item, over ``loader``.

    The energies' own pass (the collector) keeps only sums; the truth measures need the rows.
    """
    device = next(model.parameters()).device
    model.eval()
    Hs, prev, target, E = [], [], [], None
    with torch.no_grad():
        for batch in loader:
            interaction = batch[0].to(device)
            method = getattr(model, "popprior_factors", None)
            pair = method(interaction) if method is not None else factors(model, interaction)
            if pair is None:
                raise PopPriorError(f"the tau sweep needs learned scores H E^T; {type(model).__name__} has none")
            H, E = pair
            seq, length = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
            prev.append(seq[torch.arange(seq.shape[0], device=seq.device), length - 1].cpu())
            target.append(interaction[model.ITEM_ID].cpu())
            Hs.append(H.detach().double().cpu())
    return {"H": torch.cat(Hs).numpy(), "E": E.detach().double().cpu().numpy(),
            "prev": torch.cat(prev).long().numpy(), "target": torch.cat(target).long().numpy()}


def _check_rows(rows: Mapping[str, np.ndarray], arm: Arm) -> None:
    """The rows are the contexts the comparison's energies were computed from (same count, same Gram)."""
    state = arm.state
    if state is None or state.contexts is None:
        raise PopPriorError(f"the tau sweep needs the factorised energy path; {arm.pipe.config['model']} "
                            f"took {getattr(state, 'path', 'none')!r}")
    mine = ContextStats.from_H(rows["H"])
    if mine.m != state.contexts.m:
        raise PopPriorError(f"the tau sweep measures every test context ({mine.m}), the energy metrics saw "
                            f"{state.contexts.m}: remove energy_max_contexts")
    # Other contexts give O(1) differences. The same contexts through two float32 passes (another
    # kernel path or GEMM blocking) agree to ~1e-6 per entry of H, and G's small entries lose that
    # through cancellation: rtol 1e-6 refused a converged ml-100k run with the speed preset.
    scale = float(np.abs(state.contexts.G).max()) or 1.0
    if not np.allclose(mine.G, state.contexts.G, rtol=1e-4, atol=1e-5 * scale):
        raise RuntimeError("the tau sweep's context pass disagrees with the evaluation's contexts")


def _arrays(arm: Arm, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    pipe = arm.pipe
    config, train = pipe.config, pipe.train_data.dataset
    out = dict(rows)
    out["log_prior_estimate"] = _training_log_prior(arm)
    own = getattr(pipe.model, "log_prior", None)
    out["log_prior_model"] = own.double().cpu().numpy() if isinstance(own, torch.Tensor) else out["log_prior_estimate"]
    time_field = config["TIME_FIELD"]
    if time_field and time_field in train.inter_feat:
        out["log_prior_windows"] = estimate_windowed_log_prior(
            train.inter_feat[train.iid_field], train.inter_feat[time_field], train.item_num,
            int(config["prior_windows"]), by=config["prior_window_by"],
            alpha=float(config["prior_alpha"])).log_prior.double().numpy()
    if config["dataset"] == "synthetic":
        truth = truth_in_recbole_ids(load_truth(config), pipe.dataset)
        out.update(truth_log_p=truth["log_p"], truth_pmi=truth["pmi"], truth_log_p_windows=truth["log_p_windows"])
    return out


def train_run(setup: SweepSetup, variant: Variant, seed: int) -> dict[str, Any]:
    """Train and measure one (variant, seed) run; write ``contexts.npz``, then ``run.json`` (the run is complete)."""
    folder = run_folder(setup.out_dir, variant, seed)
    start = time.perf_counter()
    config = _config(setup, variant, seed, run_dir=folder / "recbole")
    pipe = build_pipeline(config)
    curve: list[tuple[int, float]] = []
    result = train_and_test(pipe, saved=True, callback_fn=lambda epoch, score: curve.append((int(epoch), float(score))))
    name = REFERENCE_NAME if variant.reference else variant.key
    arm = Arm(name, pipe, result)
    spec = setup.standard if variant.reference else ArmSpec(name, "")
    plan = _Plan(spec, {}, 0.0 if variant.reference else variant.tau)
    record: dict[str, Any] = {k: {} for k in ("tau", "metrics", "energy", "specificity", "energy_path",
                                              "best_valid_score", "run_dir", "fit_seconds")}
    _measure_arm(record, plan, arm, pipe.test_data, int(config["energy_permutations"]))
    rows = context_rows(pipe.model, pipe.test_data)
    _check_rows(rows, arm)
    arrays = _arrays(arm, rows)
    bigger = bool(config["valid_metric_bigger"])
    best = kept_epoch(curve, bigger)
    epochs, split_digest = len(pipe.trainer.train_loss_dict), data_digest(pipe)
    release_arm(arm)  # the model, trainer and loaders go before the next run trains (what it needs is saved)
    del pipe
    run = {"key": variant.key, "variant": variant.as_dict(), "seed": int(seed), "name": name,
           "digest": run_digest(setup, variant, seed), "model": setup.model, "dataset": setup.dataset,
           "record": record, "data_digest": split_digest, "epochs": epochs, "best_epoch": best,
           "max_epochs": int(config["epochs"]), "stopped_early": epochs < int(config["epochs"]),
           "valid_curve": curve, "valid_metric": config["valid_metric"], "valid_metric_bigger": bigger,
           "fit_seconds": result.get("fit_seconds"), "wall_seconds": time.perf_counter() - start,
           "topk": int(config["topk"][0]), "permutations": int(config["energy_permutations"]),
           "energy_seed": int(config["energy_seed"]), "confidence": float(config["compare_confidence"]),
           "prior_alpha": float(config["prior_alpha"])}
    with atomic_write(folder / CONTEXTS_FILE, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    write_json(folder / RUN_FILE, run)  # last: the run is complete
    getLogger().info(f"tau sweep: {variant.key} seed {seed} done in {run['wall_seconds']:.1f} s "
                     f"({epochs} epochs, tau={record['tau'][name]:.4g})")
    return run


def load_run(folder: Path) -> dict[str, Any] | None:
    """A complete run's record, or ``None`` when the run never finished."""
    path = folder / RUN_FILE
    if not path.is_file() or not (folder / CONTEXTS_FILE).is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise PopPriorError(f"{path} is not valid JSON: remove its run folder to train it again") from None


def load_contexts(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / CONTEXTS_FILE, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def ensure_run(setup: SweepSetup, variant: Variant, seed: int) -> tuple[dict[str, Any], bool]:
    """The run's record, training it unless a complete run with the same settings is saved.
    Returns ``(run, trained_now)``."""
    folder = run_folder(setup.out_dir, variant, seed)
    done = load_run(folder)
    digest = run_digest(setup, variant, seed)
    if done is not None:
        if done.get("digest") != digest:
            raise PopPriorError(f"{folder} holds a run with other settings than this command's; use another "
                                "--output, or remove that folder to train it again")
        return done, False
    if folder.exists():  # killed midway: its partial files go, the run starts again
        shutil.rmtree(folder)
    return train_run(setup, variant, seed), True


def prepare(model: str, dataset: str, config_file_list: list[str] | None, config_dict: Mapping[str, Any] | None,
            output: str | Path | None, variants: Sequence[Variant]) -> SweepSetup:
    """Check the settings of every variant (one line on bad input) before anything trains."""
    settings = dict(config_dict or {})
    chosen = [k for k in SWEPT_KEYS if k in settings]
    if chosen:
        raise PopPriorError(f"{chosen[0]} is chosen per run by the tau sweep (--taus, --prior-sources, "
                            f"--prior-modes); remove --{chosen[0]}")
    settings["metrics"] = with_metrics(settings.get("metrics", COMPARE_METRICS), (*_ENERGY_METRICS, "PopPermutation"))
    probe = arm_config(model, dataset, config_file_list, settings, seed=None, baseline=False)
    if probe["energy_max_contexts"] is not None:
        raise PopPriorError("the tau sweep measures every test context: remove energy_max_contexts")
    standard = resolve_arm(ARMS[REFERENCE_NAME], probe.final_config_dict)
    out_dir = Path(output) if output else Path(probe["output"]) / f"tau_sweep-{model}-{dataset}"
    setup = SweepSetup(model, dataset, list(config_file_list) if config_file_list else None, settings, out_dir,
                       standard, int(probe["seed"]))
    for variant in variants:  # every variant's own checks (e.g. prior_source: truth off the synthetic data)
        _config(setup, variant, None)
    return setup


def run_tau_sweep(model: str, dataset: str, taus: str | Sequence[Any], *, seeds: int = 3,
                  sources: str | Iterable[str] = ("estimate",), modes: str | Iterable[str] = ("static",),
                  config_file_list: list[str] | None = None, config_dict: Mapping[str, Any] | None = None,
                  output: str | Path | None = None, compare_tau: float | None = None,
                  train: bool = True) -> dict[str, Any]:
    """Train (or resume) every run of the sweep, seed by seed, and write its report.

    ``seeds``: the seeds are ``seed, seed + 1, ...`` as in ``--compare``. ``compare_tau``: also
    write the comparison report of the ``tau = 0`` and ``tau = compare_tau`` runs (``compare/``),
    the same files ``--compare`` writes, without training them again. ``train=False`` only
    rebuilds the report from the runs already saved. Returns the report payload.
    """
    tau_list = parse_taus(taus)
    variants = plan_variants(tau_list, sources, modes)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise PopPriorError(f"--seeds must be an integer >= 1, got {seeds!r}")
    if compare_tau is not None and not any(v.tau == compare_tau and v.source == "estimate" and v.mode == "static"
                                           for v in variants if not v.reference):
        raise PopPriorError(f"--compare-tau={compare_tau:g} must be one of the swept non-zero taus")
    setup = prepare(model, dataset, config_file_list, config_dict, output, variants)
    seed_values = [setup.base_seed + k for k in range(seeds)]
    trained = 0
    if train:
        for seed in seed_values:
            for variant in variants:
                trained += ensure_run(setup, variant, seed)[1]
    runs = collect_runs(setup.out_dir, variants, seed_values)
    payload = summarise_sweep(runs, order=[v.key for v in variants])
    payload.update(variants=[v.as_dict() for v in variants], trained_now=trained,
                   config_files=setup.config_file_list, overrides={k: repr(v) for k, v in setup.config_dict.items()})
    if compare_tau is not None:
        pairs = _compare_pairs(runs, Variant(0.0).key, Variant(float(compare_tau)).key)
        if pairs:
            compare = compare_from_runs(pairs, setup.out_dir / "compare", standard_spec=setup.standard)
            payload["compare"] = compare["files"]
    payload["files"] = write_sweep(setup.out_dir, payload)
    return payload


def collect_runs(out_dir: Path, variants: Sequence[Variant], seeds: Sequence[int]
                 ) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """The complete runs of these variants and seeds (a missing one is skipped: the report says so)."""
    out = []
    for seed in seeds:
        for variant in variants:
            folder = run_folder(out_dir, variant, seed)
            run = load_run(folder)
            if run is not None:
                out.append((run, load_contexts(folder)))
    return out


def _compare_pairs(runs: Sequence[tuple[dict, dict]], ref_key: str, key: str) -> list[tuple[tuple, tuple]]:
    by = {(run["key"], run["seed"]): (run, arrays) for run, arrays in runs}
    return [(by[(ref_key, seed)], by[(key, seed)]) for seed in sorted({s for _, s in by})
            if (ref_key, seed) in by and (key, seed) in by]


def write_sweep(out_dir: Path, payload: dict[str, Any], figure: bool = True) -> dict[str, str]:
    """``sweep.md``, ``sweep.csv``, ``tau_sweep.png``, then ``sweep.json`` (last: the set is complete)."""
    out_dir = Path(out_dir)
    files = {"md": out_dir / "sweep.md", "csv": out_dir / "sweep.csv", "json": out_dir / "sweep.json"}
    if figure:
        files["png"] = out_dir / "tau_sweep.png"
    for kind, text in (("md", sweep_markdown(payload)), ("csv", sweep_csv(payload))):
        with atomic_write(files[kind], "w") as handle:
            handle.write(text)
    if figure:
        plot_tau_sweep([payload], files["png"])
    payload["files"] = {k: str(v) for k, v in files.items()}
    write_json(files["json"], payload)
    return payload["files"]


__all__ = ["Variant", "parse_taus", "plan_variants", "run_tau_sweep", "ensure_run", "load_run", "load_contexts",
           "collect_runs", "write_sweep", "context_rows", "run_folder", "SweepSetup", "prepare", "REFERENCE_NAME"]
