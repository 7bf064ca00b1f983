"""``--tune``: an Optuna study per model over the prior weights, on one process, K local
processes, or any number of machines sharing one storage.

    python run_recbole_popprior.py --tune --model=SASRec,GRU4Rec --dataset=ml-100k --n-trials=20 \
        [--storage=URL] [--study-name=NAME] [--timeout=SECONDS] [--search-space=FILE] \
        [--n-workers=K] [--multi-objective] [--pruner=median|hyperband|none]

``--n-trials`` counts the trials *this command adds* to each model's study (as Optuna's own
``n_trials``); rerunning a command resumes the study and adds that many more. ``--n-trials=0``
only rewrites the report from the storage. ``--timeout`` is the whole command's budget: no new
trial starts after it.

Tuning settings that are not CLI options are config keys (yaml or ``--key=value``):
``tune_beta_grid`` (serving weights swept per trial; default 0..2 step 0.25, plus the trained
tau), ``tune_heartbeat_interval`` (seconds, RDB storages; default 60, 0 = off),
``tune_grace_period`` (default twice the interval), ``tune_seed`` (sampler seed; worker k of
``--n-workers`` uses seed + k), ``tune_max_failures`` (stop a model after that many failed
trials in a row; default 3, 0 = never), ``tune_plots`` (default True).

Checked before any study starts: the dataset's files for every model (``--model=all`` skips the
models the dataset cannot feed, e.g. KSR without a knowledge graph, with a warning; a named model
is an error), the folder of a ``--storage`` file (never created), and the search space: a key
that no tuned model's settings define (RecBole's, the model yaml's, the plugin's) is an error
with a did-you-mean, a key only some models lack is a warning. Ctrl-C stops the trials (each
running one is recorded as FAIL, "interrupted"), writes the report of what finished
(``summary.{csv,json,md}``, no plots) and exits with status 130.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import multiprocessing
import os
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from recbole.evaluator.register import metrics_dict
from sqlalchemy.exc import SQLAlchemyError

from recbole_popprior.unknown_settings import PLUGIN_PREFIXES, other_unknown_keys, unknown_key_warnings
from recbole_popprior.data.dataset import check_dataset_files
from recbole_popprior.errors import PopPriorError
from recbole_popprior.model import check_supported, supported_models
from recbole_popprior.quick_start import build_config, make_folder
from recbole_popprior.tuning.objective import Objective
from recbole_popprior.tuning.report import write_report
from recbole_popprior.tuning.space import Param, load_search_space
from recbole_popprior.tuning.storage import check_storage, default_storage, make_storage, redact, storage_file
from recbole_popprior.tuning.studies import claim_folder, create_studies, fail_dead_trials

logger = logging.getLogger("recbole_popprior.tuning")
_HANDLER_TAG = "_recbole_popprior_tuning"
_PRUNERS = ("median", "hyperband", "none")
#: the tuning settings that are config keys (defaults in properties/overall.yaml, checks in config._validate)
TUNE_KEYS = ("tune_beta_grid", "tune_heartbeat_interval", "tune_grace_period", "tune_seed",
             "tune_max_failures", "tune_plots", "tune_search_space")


@dataclass
class TuningPlan:
    """Everything a worker process needs (plain data, so it pickles into spawned workers)."""

    models: list[str]
    dataset: str
    config_file_list: list[str] | None
    config_dict: dict[str, Any]
    space: dict[str, Param]
    study_name: str
    storage_url: str
    folder: Path
    metrics: dict[str, tuple[str, bool]]  # model -> (valid metric key, bigger is better)
    epochs: dict[str, int]
    multi_objective: bool = False
    pruner: str = "median"
    n_workers: int = 1
    show_progress: bool = False
    storage_given: bool = False  # --storage named it (else: the default under <output>/tuning/)
    settings: dict[str, Any] = field(default_factory=dict)  # the TUNE_KEYS values
    warnings: list[str] = field(default_factory=list)  # logged once the tuning log is open

    def study_of(self, model: str) -> str:
        """The Optuna study name for ``model``: ``<study-name>.<Model>``."""
        return f"{self.study_name}.{model}"

    def directions(self, model: str) -> list[str]:
        first = "maximize" if self.metrics[model][1] else "minimize"
        return [first, "minimize"] if self.multi_objective else [first]

    def storage(self) -> optuna.storages.BaseStorage:
        return make_storage(self.storage_url, heartbeat_interval=self.settings["tune_heartbeat_interval"],
                            grace_period=self.settings["tune_grace_period"])


# --- options -> plan ------------------------------------------------------------------------
def parse_models(model: str) -> list[str]:
    """``"SASRec,GRU4Rec"`` or ``"all"`` -> RecBole's spellings, in order, without repeats."""
    names = supported_models() if model.strip().lower() == "all" else [m for m in model.split(",") if m.strip()]
    if not names:
        raise PopPriorError("--model is empty: give a model name, a comma-separated list, or 'all'")
    return list(dict.fromkeys(check_supported(name.strip()) for name in names))


def make_plan(model: str, dataset: str, config_file_list: list[str] | None = None,
              config_dict: dict[str, Any] | None = None, options: dict[str, Any] | None = None) -> TuningPlan:
    """Check every option once, in the parent, and turn them into a :class:`TuningPlan`."""
    options = dict(options or {})
    config_dict = dict(config_dict or {})
    models = parse_models(model)
    n_workers = int(1 if options.get("n_workers") is None else options["n_workers"])
    if n_workers < 1:
        raise PopPriorError(f"--n-workers must be >= 1, got {n_workers}")
    pruner = str(options.get("pruner") or "median").lower()
    if pruner not in _PRUNERS:
        raise PopPriorError(f"--pruner must be one of {', '.join(_PRUNERS)}, got {options.get('pruner')!r}")
    multi = bool(options.get("multi_objective"))
    if multi:
        if "popenergy" not in metrics_dict:
            raise PopPriorError("--multi-objective needs the PopEnergy metric, which is not registered")
    metrics: dict[str, tuple[str, bool]] = {}
    epochs: dict[str, int] = {}
    known: dict[str, set[str]] = {}
    notes: list[str] = []
    first = None
    unread: set[str] = set()
    for name in list(models):
        overrides = dict(config_dict)
        config = build_config(name, dataset, config_file_list, overrides)
        if multi and "popenergy" not in [str(m).lower() for m in config["metrics"]]:
            config_dict["metrics"] = [*config["metrics"], "PopEnergy"]
            config = build_config(name, dataset, config_file_list, dict(config_dict))
        try:
            check_dataset_files(config)  # before any study starts: a missing file fails every trial
        except PopPriorError as exc:
            if model.strip().lower() != "all":
                raise
            models.remove(name)  # --model=all: tune the models this dataset can feed
            notes.append(f"{name} is skipped: {exc}")
            continue
        metrics[name] = (str(config["valid_metric"]).lower(), bool(config["valid_metric_bigger"]))
        epochs[name] = int(config["epochs"])
        # what RecBole, the model and the plugin define (the user's own keys do not make a key real)
        known[name] = set(config.internal_config_dict) | (set(config.final_config_dict) - set(config.external_config_dict))
        unread = unread & set(config.unknown_keys) if first else set(config.unknown_keys)
        first = first or config
    if first is None:
        raise PopPriorError(f"no model can be tuned on {dataset!r}: {notes[0] if notes else 'none given'}")
    settings = {key: first[key] for key in TUNE_KEYS}
    space = load_search_space(options.get("search_space"), settings["tune_search_space"])
    # a setting only some tuned models read is no mistake: warn about the ones none reads
    notes += unknown_key_warnings({key: None for key in first.external_config_dict if key in unread})
    others = [key for key in first.unknown_keys if key in unread and not key.startswith(PLUGIN_PREFIXES)]
    notes += other_unknown_keys(others, set().union(*known.values()), ", ".join(models))
    notes += _unknown_space_keys(space, known)
    study_name = options.get("study_name") or f"popprior-{dataset}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", study_name):
        raise PopPriorError(f"--study-name may use letters, digits, '.', '_' and '-', got {study_name!r}")
    output = first["output"]
    if options.get("storage"):
        check_storage(options["storage"])  # before the tuning folder is made: nothing left behind
    storage_url = options.get("storage") or default_storage(output, study_name, n_workers)
    if n_workers > 1 and ":memory:" in storage_url:
        raise PopPriorError("--n-workers > 1 needs a storage that several processes can open, not :memory:")
    return TuningPlan(
        models=models, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict,
        space=space, study_name=study_name, storage_url=storage_url,
        folder=Path(output) / "tuning" / study_name, metrics=metrics, epochs=epochs,
        multi_objective=multi, pruner=pruner, n_workers=n_workers, storage_given=bool(options.get("storage")),
        show_progress=bool(first["show_progress"]), settings=settings, warnings=notes)


def _unknown_space_keys(space: dict[str, Param], known: dict[str, set[str]]) -> list[str]:
    """Search-space keys no model of the plan knows are an error (a typo would waste the study:
    every trial would train with the same settings); keys some models lack are a warning (one
    space serves several models, e.g. ``n_layers`` of SASRec next to GRU4Rec's ``num_layers``).
    A model knows the keys RecBole, its model yaml and the plugin's yaml define."""
    every = set().union(*known.values())
    for name in space:
        if name not in every:
            close = difflib.get_close_matches(name, sorted(every), n=1, cutoff=0.7)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PopPriorError(f"search space entry {name!r} is not a setting of {', '.join(known)}{hint}")
    return [f"search space entry {name!r} is not a setting of {', '.join(m for m in known if name not in known[m])}; "
            "it has no effect there" for name in space if any(name not in keys for keys in known.values())]


# --- studies --------------------------------------------------------------------------------
def _pruner(plan: TuningPlan, model: str) -> optuna.pruners.BasePruner:
    if plan.pruner == "median":
        return optuna.pruners.MedianPruner()
    if plan.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(plan.epochs[model], 1))
    return optuna.pruners.NopPruner()


class _TrialLog:
    """One log line per finished trial; stops a model after too many failures in a row."""

    def __init__(self, plan: TuningPlan, model: str, n_trials: int):
        self.plan, self.model, self.n_trials = plan, model, n_trials
        self.done = 0
        self.failures_in_row = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.done += 1
        metric = self.plan.metrics[self.model][0]
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        seconds = trial.duration.total_seconds() if trial.duration else float("nan")
        head = f"[{self.done}/{self.n_trials}] {self.model} trial {trial.number}"
        if trial.state == TrialState.COMPLETE:
            beta = trial.user_attrs.get("best_beta")
            extra = f" shared_frac={trial.values[1]:.4g}" if self.plan.multi_objective else ""
            logger.info(f"{head} COMPLETE {metric}={trial.values[0]:.4f}{extra} at beta={beta} | {params} | {seconds:.1f}s")
        elif trial.state == TrialState.PRUNED:
            last = max(trial.intermediate_values) if trial.intermediate_values else None
            logger.info(f"{head} PRUNED after epoch {last} | {params} | {seconds:.1f}s")
        else:
            logger.warning(f"{head} {trial.state.name}: {trial.user_attrs.get('fail_reason', 'unknown')} | {params}")
        self.failures_in_row = self.failures_in_row + 1 if trial.state == TrialState.FAIL else 0
        limit = self.plan.settings["tune_max_failures"]
        if limit and self.failures_in_row >= limit:
            logger.warning(f"{self.model}: {self.failures_in_row} failed trials in a row; moving on "
                           "(tune_max_failures)")
            study.stop()


def init_tuning_logger(folder: Path) -> logging.Logger:
    """The tuning logger: stderr plus ``<folder>/tuning.log``, separate from each trial's run.log."""
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_TAG, False)]:
        logger.removeHandler(handler)
        handler.close()
    make_folder(folder, "the tuning folder")
    formatter = logging.Formatter("%(asctime)s %(processName)s %(levelname)s  %(message)s", "%d %b %H:%M:%S")
    log_file = logging.FileHandler(folder / "tuning.log")
    for handler in (logging.StreamHandler(sys.stderr), log_file):
        handler.setFormatter(formatter)
        setattr(handler, _HANDLER_TAG, True)
        logger.addHandler(handler)
    optimize_logger = logging.getLogger("optuna.study._optimize")
    for old in [f for f in optimize_logger.filters if isinstance(f, _TrialFailures)]:
        optimize_logger.removeFilter(old)
    optimize_logger.addFilter(_TrialFailures(log_file))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return logger


class _TrialFailures(logging.Filter):
    """Keeps Optuna's two warnings about a failed trial (one carries the traceback) off stderr: the
    tuner's own line says it (``_TrialLog``, with ``fail_reason``). The traceback goes to
    ``tuning.log``; for a trial stopped by Ctrl-C (recorded as FAIL, "interrupted") it is dropped."""

    def __init__(self, log_file: logging.Handler):
        super().__init__()
        self._log_file = log_file

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not (message.startswith("Trial ") and " failed with " in message):
            return True
        interrupted = record.exc_info and record.exc_info[0] and issubclass(record.exc_info[0], KeyboardInterrupt)
        if record.exc_info and not interrupted:
            self._log_file.handle(record)
        return False


def work(plan: TuningPlan, worker: int, n_trials: int, deadline: float | None) -> None:
    """Run ``n_trials`` trials of each model's study in this process (one worker)."""
    storage = plan.storage()
    seed = plan.settings["tune_seed"]
    if plan.multi_objective and plan.pruner != "none" and worker == 0:
        logger.info("pruning is off: Optuna cannot prune multi-objective studies")
    for model in plan.models:
        timeout = None if deadline is None else deadline - time.time()
        if n_trials <= 0 or (timeout is not None and timeout <= 0):
            if timeout is not None and timeout <= 0:
                logger.info(f"{model}: timeout reached, no trial started")
            continue
        sampler = optuna.samplers.TPESampler(seed=None if seed is None else seed + worker)
        study = optuna.load_study(study_name=plan.study_of(model), storage=storage, sampler=sampler,
                                  pruner=_pruner(plan, model))
        metric, bigger = plan.metrics[model]
        objective = Objective(
            model=model, dataset=plan.dataset, config_file_list=plan.config_file_list,
            config_dict=plan.config_dict, space=plan.space, trials_dir=plan.folder / "trials" / model,
            valid_metric=metric, bigger=bigger, multi_objective=plan.multi_objective,
            prune=plan.pruner != "none", betas=plan.settings["tune_beta_grid"])
        logger.info(f"{model}: {n_trials} trial(s) on study {study.study_name} ({redact(plan.storage_url)})")
        study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(Exception,),
                       callbacks=[_TrialLog(plan, model, n_trials)], gc_after_trial=True,
                       show_progress_bar=plan.show_progress and plan.n_workers == 1)


def _worker_main(plan: TuningPlan, worker: int, n_trials: int, deadline: float | None) -> None:
    """Entry point of a spawned worker process (unpickling this function imports the package,
    which applies the compat shims and registers the metrics)."""
    init_tuning_logger(plan.folder)
    try:
        work(plan, worker, n_trials, deadline)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: the parent reports, quietly here
        raise SystemExit(130) from None


def _run_workers(plan: TuningPlan, n_trials: int, deadline: float | None) -> None:
    shares = [n_trials // plan.n_workers + (k < n_trials % plan.n_workers) for k in range(plan.n_workers)]
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker_main, args=(plan, k, share, deadline), name=f"worker{k}")
             for k, share in enumerate(shares) if share > 0]
    logger.info(f"starting {len(procs)} worker process(es): {shares} trial(s) each")
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):  # pass Ctrl-C on (a terminal sends it to all):
            for proc in procs:                   # each worker records its trial as failed and exits
                if proc.is_alive() and proc.pid is not None:
                    with contextlib.suppress(OSError):
                        os.kill(proc.pid, signal.SIGINT)
            for proc in procs:
                proc.join(timeout=10)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join()
        raise
    for proc in procs:
        if proc.exitcode != 0:
            logger.warning(f"{proc.name} exited with status {proc.exitcode}; its running trial, if any, "
                           "stays RUNNING until a heartbeat marks it FAIL")


def run_tuning(model: str, dataset: str, config_file_list: list[str] | None = None,
               config_dict: dict[str, Any] | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tune each model's prior weights with Optuna and write the report (see module docstring).

    ``options`` are the CLI's (``n_trials``, ``storage``, ``study_name``, ``timeout``,
    ``search_space``, ``n_workers``, ``multi_objective``, ``pruner``). Returns the summary:
    one row per model with the best value, tau, beta, alpha and trial counts.
    """
    options = dict(options or {})
    n_trials = int(options.get("n_trials", 20) if options.get("n_trials") is not None else 20)
    if n_trials < 0:
        raise PopPriorError(f"--n-trials must be >= 0, got {n_trials}")
    timeout = options.get("timeout")
    if timeout is not None and float(timeout) <= 0:
        raise PopPriorError(f"--timeout must be positive seconds, got {timeout}")
    plan = make_plan(model, dataset, config_file_list, config_dict, options)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # (not "A new study created in RDB ...")
    storage, studies = open_studies(plan)
    init_tuning_logger(plan.folder)
    for line in plan.warnings:
        logger.warning(line)
    with _storage_errors(plan):
        for study in studies.values():
            fail_dead_trials(study)
    deadline = None if timeout is None else time.time() + float(timeout)
    interrupted = False
    try:
        with _storage_errors(plan):
            if n_trials > 0:
                if plan.n_workers == 1:
                    work(plan, 0, n_trials, deadline)
                else:
                    _run_workers(plan, n_trials, deadline)
    except KeyboardInterrupt:  # Ctrl-C: report what finished, then stop with status 130
        interrupted = True
        logger.warning("interrupted: writing the report of the trials that finished")
    with _storage_errors(plan):
        for model, study in studies.items():  # fresh views of every worker's trials
            if isinstance(storage, optuna.storages.RDBStorage) and plan.settings["tune_heartbeat_interval"]:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
            fail_dead_trials(study)
            studies[model] = optuna.load_study(study_name=study.study_name, storage=storage)
    metric, bigger = plan.metrics[plan.models[0]]
    meta = {
        "study_name": plan.study_name, "dataset": plan.dataset, "objective": metric,
        "direction": plan.directions(plan.models[0]), "storage": redact(plan.storage_url),
        "n_trials_added_per_model": n_trials, "n_workers": plan.n_workers, "pruner": plan.pruner,
        "multi_objective": plan.multi_objective,
        "search_space": {name: {k: v for k, v in vars(p).items()
                                if k != "name" and v is not None and v is not False and v != ()}
                         for name, p in plan.space.items()},
        "beta_grid": plan.settings["tune_beta_grid"],
    }
    summary = write_report(studies, plan.folder, meta, bigger, plan.multi_objective,
                           plots=plan.settings["tune_plots"] and not interrupted)  # stop soon after Ctrl-C
    logger.info(f"tuning report: {plan.folder / 'summary.md'}")
    if interrupted:
        done = sum(row.get("complete", 0) for row in summary.get("models", []))
        raise KeyboardInterrupt(f"the report of the {done} completed trial(s) is in {plan.folder / 'summary.md'}")
    _refuse_all_failed(studies, plan.folder / "summary.md")
    return summary


def open_studies(plan: TuningPlan) -> tuple[optuna.storages.BaseStorage, dict[str, optuna.Study]]:
    """Open the storage, check or create each model's study and claim the tuning folder for them;
    on any refusal, leave nothing behind that this command created (the default storage's folder
    and file, a new storage file)."""
    created: list[Path] = []
    path = storage_file(plan.storage_url)
    new_file = path is not None and not path.exists()
    try:
        if not plan.storage_given:
            created = make_folder(plan.folder.parent, "the tuning folder")
        with _storage_errors(plan):
            storage = plan.storage()
            studies = create_studies(plan, storage)
        claim_folder(plan.folder, plan.storage_url, {model: study.user_attrs["uid"] for model, study in studies.items()})
    except BaseException:
        if new_file and path is not None:
            for leftover in (path, path.with_name(path.name + ".lock")):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise
    return storage, studies


@contextlib.contextmanager
def _storage_errors(plan: TuningPlan):
    """A database error from the storage (a corrupt SQLite page, a lost server) as one line."""
    try:
        yield
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise PopPriorError(f"storage {redact(plan.storage_url)} failed: {reason[:200]}") from None


def _refuse_all_failed(studies: dict[str, optuna.Study], report: Path) -> None:
    """A study whose every finished trial failed has no result: one line (exit 2), not exit 0."""
    for model, study in studies.items():
        trials = study.get_trials(deepcopy=False)
        failed = [t for t in trials if t.state == TrialState.FAIL]
        if failed and not any(t.state == TrialState.COMPLETE for t in trials):
            reason = failed[0].user_attrs.get("fail_reason", "unknown")
            raise PopPriorError(f"no trial of {model} completed: {len(failed)} failed, the first with {reason}; "
                                f"the report is in {report}")
