"""One tuning trial: train once, then pick the serving weight ``beta`` on validation for free.

docs/DESIGN.md §1: ``tau`` (training) and ``beta`` (serving) are independent, and ``beta`` costs no
retraining. A trial therefore trains one model at the sampled ``tau`` (and whatever else the
search space holds), and then re-evaluates the best checkpoint on validation over a grid of
``beta`` values; the objective is the validation metric at the best ``beta``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna

from recbole_popprior.errors import PopPriorError
from recbole_popprior.quick_start import build_config, build_pipeline, train_and_test
from recbole_popprior.serving import sweep_beta
from recbole_popprior.tuning.space import Param, suggest
from recbole_popprior.utils import to_jsonable, write_json

logger = logging.getLogger("recbole_popprior.tuning")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` for ``fail_reason`` and logs."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def beta_grid(tau: float, grid: Sequence[float]) -> list[float]:
    """The serving weights to try: ``grid`` (``tune_beta_grid``) plus the trained ``tau``
    (docs/DESIGN.md §1: ``beta = tau`` serves the same ranking family as the standard model)."""
    values = {round(float(b), 12) for b in grid}
    if math.isfinite(tau):
        values.add(round(float(tau), 12))
    return sorted(values)


def choose_beta(results: list[tuple[float, dict]], metric: str, bigger: bool, tau: float) -> tuple[float, dict]:
    """The ``(beta, result)`` with the best ``metric``; ties go to the beta closest to ``tau``."""
    def key(item: tuple[float, dict]) -> tuple[float, float]:
        value = float(item[1][metric])
        value = value if math.isfinite(value) else -math.inf if bigger else math.inf
        return (-value if bigger else value, abs(item[0] - tau))

    return min(results, key=key)


def find_shared_frac(result: dict) -> float | None:
    """The ``pop_shared_frac`` value of the PopEnergy metric in an evaluation result, if any."""
    for name, value in result.items():
        if str(name).lower().endswith("shared_frac"):
            return float(value)
    return None


@dataclass
class Objective:
    """``objective(trial)`` for one model: sample, train through the plugin's quick start,
    sweep ``beta``, return the validation metric (and ``shared_frac`` when multi-objective)."""

    model: str
    dataset: str
    config_file_list: list[str] | None
    config_dict: dict[str, Any]
    space: dict[str, Param]
    trials_dir: Path
    valid_metric: str
    bigger: bool
    multi_objective: bool = False
    prune: bool = True
    betas: Sequence[float] = ()
    extra_attrs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        for name, value in self.extra_attrs.items():
            trial.set_user_attr(name, value)
        try:
            return self._run(trial)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:  # Optuna records the trial as FAIL and stops the study
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        except Exception as exc:
            trial.set_user_attr("fail_reason", one_line(exc))
            raise

    def _pruning_callback(self, trial: optuna.Trial) -> Callable[[int, float], None]:
        def report(epoch_idx: int, valid_score: float) -> None:
            trial.report(float(valid_score), epoch_idx)
            if trial.should_prune():
                # RecBole's fit catches nothing, so this ends training and the trial
                raise optuna.TrialPruned(f"pruned after epoch {epoch_idx}: {self.valid_metric}={valid_score:.4f}")

        return report

    def _run(self, trial: optuna.Trial) -> float | tuple[float, float]:
        params = suggest(trial, self.space)
        run_dir = self.trials_dir / str(trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        if run_dir.is_dir() and any(run_dir.iterdir()):  # a trial's folder is its own (runner.claim_folder)
            raise PopPriorError(f"the trial folder {run_dir} already holds files of another trial; not touched")
        config_dict = {**self.config_dict, **params, "run_dir": str(run_dir), "prior_beta": None}
        config = build_config(self.model, self.dataset, self.config_file_list, config_dict)
        pipe = build_pipeline(config)
        callback = self._pruning_callback(trial) if self.prune and not self.multi_objective else None
        record = train_and_test(pipe, saved=True, callback_fn=callback)

        if hasattr(pipe.model, "prior_beta"):
            tau = pipe.model.effective_beta()  # prior_beta is None here: beta = the trained tau
            rows = sweep_beta(pipe.trainer, pipe.valid_data, beta_grid(tau, self.betas), stage="valid")
            sweep = [(row.pop("beta"), row) for row in rows]
            best_beta, valid_result = choose_beta(sweep, self.valid_metric, self.bigger, tau)
            pipe.model.prior_beta = best_beta
            test_result = dict(pipe.trainer.evaluate(pipe.test_data, load_best_model=False) or {})
        else:  # a RecBole baseline (popprior_baseline: True): nothing to sweep
            tau = math.nan
            sweep, best_beta, valid_result = [], None, record["best_valid_result"]
            test_result = record["test_result"]
        value = float(valid_result[self.valid_metric])
        if not math.isfinite(value):
            raise ValueError(f"validation {self.valid_metric} is {value}")
        attrs = {
            "tau": tau, "best_beta": best_beta, "valid_score_at_tau": record["best_valid_score"],
            "valid_by_beta": {f"{b:g}": r.get(self.valid_metric) for b, r in sweep},
            "valid_result": valid_result, "test_result": test_result,
            "checkpoint": record["checkpoint"],
        }
        shared_frac = find_shared_frac(valid_result)
        if shared_frac is not None:
            attrs["shared_frac"] = shared_frac
        for name, val in attrs.items():
            trial.set_user_attr(name, to_jsonable(val))
        write_json(run_dir / "tuning_trial.json", {
            "study": trial.study.study_name, "trial": trial.number, "model": self.model,
            "dataset": self.dataset, "params": params, "objective": self.valid_metric, "value": value, **attrs})
        if not self.multi_objective:
            return value
        if shared_frac is None:
            raise ValueError("--multi-objective needs pop_shared_frac in the validation result "
                             f"(PopEnergy metric); got keys {sorted(valid_result)}")
        return value, shared_frac
