"""The search space of a tuning study: the training weight ``prior_tau``, the smoothing
``prior_alpha`` (docs/DESIGN.md §1-2) and whatever RecBole keys a yaml file adds.

The serving weight ``prior_beta`` is never searched: it costs no retraining, so every trial
sweeps it on validation instead (docs/DESIGN.md §1).

A search-space file maps config keys to one distribution each::

    learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    hidden_size:   {type: categorical, choices: [16, 32, 64]}
    n_layers:      {type: int, low: 1, high: 3}          # optional: step (int/float), log
    prior_alpha:   ~                                     # null removes a default entry

Entries extend (or replace) the configured ``tune_search_space`` (``properties/overall.yaml``:
``prior_tau`` in [0, 2], ``prior_alpha`` on a log scale in [0.01, 10]); any mistake raises a one-line
:class:`~recbole_popprior.errors.PopPriorError`. Whether a key is a real setting is checked
against each tuned model's config (``runner.make_plan``): unknown to all of them is an error,
to some a warning.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import optuna

from recbole_popprior.errors import PopPriorError
from recbole_popprior.yaml_files import BoundedSafeLoader, read_yaml_file

_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


@dataclass(frozen=True)
class Param:
    """One searched config key and its distribution."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.choices))


#: keys the tuner sets itself, or that cannot vary between trials of one study
_RESERVED = {
    "prior_beta": "prior_beta is swept at serving time on every trial's trained model, not searched",
    "model": "tune several models with --model=A,B instead",
    "dataset": "a study tunes one dataset",
    "run_dir": "the tuner gives every trial its own run_dir",
    "valid_metric": "the objective is fixed for a study",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_param(name: str, spec: Any) -> Param:
    """Validate one ``name: {type: ..., ...}`` entry."""
    where = f"search space entry {name!r}"
    if name in _RESERVED:
        raise PopPriorError(f"{where}: {_RESERVED[name]}")
    if not isinstance(spec, dict):
        raise PopPriorError(f"{where} must be a mapping like {{type: float, low: 0, high: 1}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in _KEYS:
        raise PopPriorError(f"{where}: type must be float, int or categorical, got {kind!r}")
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise PopPriorError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} for type {kind}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise PopPriorError(f"{where}: choices must be a non-empty list")
        for choice in choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise PopPriorError(f"{where}: choices must be numbers, strings, booleans or null, got {choice!r}")
        return Param(name, kind, choices=tuple(choices))
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    if not (_is_number(low) and _is_number(high)):
        raise PopPriorError(f"{where}: low and high must be finite numbers, got low={low!r}, high={high!r}")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise PopPriorError(f"{where}: low and high must be integers for type int")
    if low > high:
        raise PopPriorError(f"{where}: low ({low}) is above high ({high})")
    if not isinstance(log, bool):
        raise PopPriorError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise PopPriorError(f"{where}: a log scale needs low > 0, got {low}")
    if step is not None:
        if not _is_number(step) or step <= 0 or (kind == "int" and not float(step).is_integer()):
            raise PopPriorError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}")
        if log:
            raise PopPriorError(f"{where}: step and log cannot be combined")
    return Param(name, kind, float(low) if kind == "float" else int(low),
                 float(high) if kind == "float" else int(high), log, step)


def parse_space(entries: Any, where: str = "tune_search_space") -> dict[str, Param]:
    """``{name: {type: ..., ...}}`` -> ``{name: Param}``; a ``null`` entry maps to ``None`` (drop)."""
    if entries is None:
        return {}
    if not isinstance(entries, dict):
        raise PopPriorError(f"{where} must map config keys to distributions")
    space: dict[str, Any] = {}
    for name, spec in entries.items():
        if not isinstance(name, str):
            raise PopPriorError(f"{where}: keys must be config names, got {name!r}")
        space[name] = None if spec is None else parse_param(name, spec)
    return space


def load_search_space(path: str | os.PathLike | None, default: dict[str, Any]) -> dict[str, Param]:
    """The configured ``tune_search_space`` (``default``), extended by the yaml file at ``path``
    (a ``null`` entry there drops a key)."""
    space = {name: param for name, param in parse_space(default).items() if param is not None}
    if path is None:
        return space
    entries = read_yaml_file(path, "search space file", loader=BoundedSafeLoader)
    for name, param in parse_space(entries, f"search space file {path}").items():
        if param is None:
            space.pop(name, None)
        else:
            space[name] = param
    return space


def suggest(trial: optuna.Trial, space: dict[str, Param]) -> dict[str, Any]:
    """Draw one value per searched key; the result is a ``config_dict`` update."""
    return {name: param.suggest(trial) for name, param in space.items()}
