"""Command line of ``run_recbole_popprior.py``, in RecBole's conventions.

    python run_recbole_popprior.py --model=SASRec --dataset=ml-100k [--config_files="a.yaml b.yaml"] [--key=value ...]
        --compare [--seeds=3] [--output=DIR]          RecBole baseline vs prior-separated, matched
            [--arms=standard,separated,resn,...]      arms to compare (recbole_popprior.arms.ARMS)
        --beta-sweep=-1,0,0.5,1                        serve one trained model at several beta
        --tune --n-trials=N [--storage=URL] ...        Optuna search over the prior weights
        --nproc=K [--world_size=.. --ip=.. --port=.. --group_offset=..]   distributed training

Every ``--key=value`` that is not a plugin option becomes a RecBole config override, as in
``run_recbole.py``. Bad input ends with one ``error:`` line and exit status 2; Ctrl-C with one
line and status 130.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any, Callable

from recbole_popprior import interrupts
from recbole_popprior.arms import parse_arms
from recbole_popprior.compare import run_beta_sweep, run_compare
from recbole_popprior.distributed import run_distributed
from recbole_popprior.errors import PopPriorError
from recbole_popprior.quick_start import run_recbole_popprior
from recbole_popprior.tuning import run_tuning

#: plugin options: name -> (takes a value, default)
OPTIONS: dict[str, tuple[bool, Any]] = {
    "model": (True, None), "dataset": (True, None), "config_files": (True, None),
    "compare": (False, False), "seeds": (True, 3), "arms": (True, None), "beta_sweep": (True, None),
    "tune": (False, False), "n_trials": (True, 20), "storage": (True, None), "study_name": (True, None),
    "timeout": (True, None), "search_space": (True, None), "n_workers": (True, 1),
    "multi_objective": (False, False), "pruner": (True, "median"),
    "nproc": (True, 1), "world_size": (True, -1), "ip": (True, "127.0.0.1"), "port": (True, "5678"),
    "group_offset": (True, 0), "traceback": (False, False),
}


def parse_args(argv: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``argv`` into plugin options and RecBole ``--key=value`` config overrides."""
    options = {name: default for name, (_, default) in OPTIONS.items()}
    overrides: dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__.strip())
            raise SystemExit(0)
        if not arg.startswith("--") or len(arg) < 3:
            raise PopPriorError(f"unexpected argument {arg!r}: use --key=value")
        key, sep, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        if name in OPTIONS:
            takes_value, _ = OPTIONS[name]
            if takes_value and not sep:
                raise PopPriorError(f"--{key} needs a value: --{key}=...")
            if not takes_value and sep:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise PopPriorError(f"--{key} is a flag; it takes no value")
                options[name] = value.lower() in ("true", "1")
                continue
            options[name] = value if takes_value else True
        elif sep:
            if key in overrides and overrides[key] != value:
                raise PopPriorError(f"--{key} given twice with different values")
            overrides[key] = value
        else:
            raise PopPriorError(f"unknown flag --{key}: config overrides take the form --{key}=value")
    for name in ("seeds", "n_trials", "n_workers", "nproc", "world_size", "group_offset"):
        try:
            options[name] = int(options[name])
        except (TypeError, ValueError):
            raise PopPriorError(f"--{name.replace('_', '-')} must be an integer, got {options[name]!r}") from None
    for name, low in (("seeds", 1), ("n_trials", 0), ("n_workers", 1), ("nproc", 1), ("group_offset", 0)):
        if options[name] < low:
            raise PopPriorError(f"--{name.replace('_', '-')} must be >= {low}, got {options[name]}")
    if options["world_size"] < 1 and options["world_size"] != -1:
        raise PopPriorError(f"--world-size must be >= 1 (or -1: --nproc), got {options['world_size']}")
    if options["timeout"] is not None:
        try:
            options["timeout"] = float(options["timeout"])
        except ValueError:
            raise PopPriorError(f"--timeout must be seconds, got {options['timeout']!r}") from None
        if not 0 < options["timeout"] < float("inf"):
            raise PopPriorError(f"--timeout must be a positive number of seconds, got {options['timeout']!r}")
    if options["config_files"]:
        options["config_files"] = options["config_files"].split()
        for path in options["config_files"]:
            if os.path.isdir(path):
                raise PopPriorError(f"config file {path} is a directory, not a file")
            if not os.path.isfile(path):
                raise PopPriorError(f"config file not found: {path}")
    if options["arms"] is not None:
        if not options["compare"]:
            raise PopPriorError("--arms chooses the arms of --compare; add --compare")
        options["arms"] = parse_arms(options["arms"])
    if options["beta_sweep"] is not None:
        try:
            options["beta_sweep"] = [float(b) for b in options["beta_sweep"].split(",") if b.strip()]
        except ValueError:
            raise PopPriorError(f"--beta-sweep takes numbers separated by commas, got {options['beta_sweep']!r}") from None
    return options, overrides


def _dispatch(options: dict[str, Any], overrides: dict[str, Any]) -> Any:
    model, dataset, files = options["model"], options["dataset"], options["config_files"]
    if model is None:
        raise PopPriorError("--model is required, e.g. --model=SASRec")
    if dataset is None:
        raise PopPriorError("--dataset is required, e.g. --dataset=ml-100k")
    if options["tune"]:
        return run_tuning(model, dataset, config_file_list=files, config_dict=overrides, options=options)
    if options["compare"]:
        return run_compare(model, dataset, config_file_list=files, config_dict=overrides,
                           seeds=options["seeds"], output=overrides.get("output"), arms=options["arms"])
    if options["beta_sweep"] is not None:
        return run_beta_sweep(model, dataset, options["beta_sweep"], config_file_list=files,
                              config_dict=overrides, output=overrides.get("output"))
    if options["nproc"] > 1 or options["world_size"] > 1 or "LOCAL_RANK" in os.environ:
        return run_distributed(model, dataset, config_file_list=files, config_dict=overrides, options=options)
    return run_recbole_popprior(model, dataset, config_file_list=files, config_dict=overrides)


def guarded(func: Callable[[], Any], show_traceback: bool = False) -> int:
    """Run ``func``; turn bad input into one ``error:`` line (exit 2), other failures into one
    line plus the traceback in the log (exit 1); Ctrl-C exits 130."""
    try:
        func()
        return 0
    except PopPriorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # its message, if any, says what was kept (tuning: the report)
        by = " by SIGTERM" if isinstance(exc, interrupts.Terminated) else ""
        print(f"error: interrupted{by}{f'; {exc}' if str(exc) else ''}", file=sys.stderr)
        return 143 if by else 130
    except Exception as exc:  # noqa: BLE001 - the top level of a CLI
        if show_traceback:
            raise
        logging.getLogger().debug("traceback:\n%s", traceback.format_exc())
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: {type(exc).__name__}: {message} (rerun with --traceback for details)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    interrupts.started()  # from here on Ctrl-C is handled below (exit 130, what was kept)
    argv = sys.argv[1:] if argv is None else argv

    def run() -> None:
        with interrupts.sigterm_as_interrupt():
            _dispatch(*parse_args(argv))

    return guarded(run, show_traceback="--traceback" in argv)
