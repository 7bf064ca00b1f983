"""One tuning trial: train once, then pick the serving weight ``beta`` on validation for free.

DESIGN.md §1: ``tau`` (training) and ``beta`` (serving) are independent, and ``beta`` costs no
retraining. A trial therefore trains one model at the sampled ``tau`` (and whatever else the
search space holds), and then re-evaluates the best checkpoint on validation over a grid of
``beta`` values; the objective is the validation metric at the best ``beta``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna

from recbole_popprior.quick_start import Pipeline, build_config, build_pipeline, train_and_test
from recbole_popprior.tuning.space import Param, suggest
from recbole_popprior.utils import to_jsonable, write_json

#: the default serving grid; the trained ``tau`` is always added (DESIGN.md §1: beta = tau
#: serves the same ranking family as the standard model)
DEFAULT_BETA_GRID: tuple[float, ...] = tuple(0.25 * k for k in range(9))

#: seconds to sleep at the start of every trial; a hook for the tests that kill a worker
#: mid-trial, never set in normal use
TEST_SLEEP_ENV = "POPPRIOR_TUNING_TEST_SLEEP"

logger = logging.getLogger("recbole_popprior.tuning")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` for ``fail_reason`` and logs."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def beta_grid(tau: float, grid: Sequence[float] | None = None) -> list[float]:
    """The serving weights to try: ``grid`` (default 0..2 step 0.25) plus the trained ``tau``."""
    values = {round(float(b), 12) for b in (DEFAULT_BETA_GRID if grid is None else grid)}
    if math.isfinite(tau):
        values.add(round(float(tau), 12))
    return sorted(values)


def sweep_beta(pipe: Pipeline, betas: Sequence[float], data: Any = None) -> list[tuple[float, dict]]:
    """Evaluate the loaded model at each serving weight ``beta`` on ``data`` (default: validation).

    No retraining: only ``model.prior_beta`` changes between evaluations (DESIGN.md §1); the
    evaluation itself is :func:`recbole_popprior.compare.sweep_beta`. The trainer's stage is set
    to ``valid`` on validation data, so test-only metrics (PopPermutation) do not run per beta.
    """
    from recbole_popprior.compare import sweep_beta as compare_sweep_beta

    trainer = pipe.trainer
    data = pipe.valid_data if data is None else data
    old_stage = getattr(trainer, "eval_stage", "test")
    trainer.eval_stage = "valid" if data is pipe.valid_data else "test"
    try:
        rows = compare_sweep_beta(trainer, data, [float(b) for b in betas])
    finally:
        trainer.eval_stage = old_stage
    return [(float(row.pop("beta")), row) for row in rows]


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
    betas: Sequence[float] | None = None
    extra_attrs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        for name, value in self.extra_attrs.items():
            trial.set_user_attr(name, value)
        try:
            return self._run(trial)
        except optuna.TrialPruned:
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
        if os.environ.get(TEST_SLEEP_ENV):
            time.sleep(float(os.environ[TEST_SLEEP_ENV]))
        config_dict = {**self.config_dict, **params, "run_dir": str(run_dir), "prior_beta": None}
        config = build_config(self.model, self.dataset, self.config_file_list, config_dict)
        pipe = build_pipeline(config)
        callback = self._pruning_callback(trial) if self.prune and not self.multi_objective else None
        record = train_and_test(pipe, saved=True, callback_fn=callback)

        tau = float(getattr(pipe.model, "beta", math.nan))  # beta defaults to the trained tau
        if hasattr(pipe.model, "prior_beta"):
            sweep = sweep_beta(pipe, beta_grid(tau, self.betas))
            best_beta, valid_result = choose_beta(sweep, self.valid_metric, self.bigger, tau)
            pipe.model.prior_beta = best_beta
            test_result = dict(pipe.trainer.evaluate(pipe.test_data, load_best_model=False) or {})
        else:  # a RecBole baseline (popprior_baseline: True): nothing to sweep
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
