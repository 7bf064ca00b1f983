"""The heavy half of the command line: one function per command of :data:`recbole_popprior.cli.COMMANDS`.

:mod:`recbole_popprior.cli` parses and checks the arguments with the standard library only and
then calls ``commands.<Command.run>(options, overrides)``: ``options`` are the parsed options
(every option of every command, defaults included), ``overrides`` the config settings
(``--key=value``, ``--output``, ``--data_path``). Importing this module loads torch and RecBole.
"""

from __future__ import annotations

import os
from typing import Any

from recbole_popprior.beta_sweep import run_beta_sweep
from recbole_popprior.compare import run_compare
from recbole_popprior.distributed import run_distributed
from recbole_popprior.quick_start import run_recbole_popprior, show_dumps_on_console
from recbole_popprior.trained import evaluate_trained
from recbole_popprior.tuning import run_tuning


def _start(options: dict[str, Any]) -> None:
    show_dumps_on_console(bool(options["verbose"]))


def train(options: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """Train and test one model; with ``--checkpoint``, evaluate a trained one; with ``--nproc``, DDP."""
    _start(options)
    model, dataset, files = options["model"], options["dataset"], options["config_files"]
    if options["checkpoint"] is not None:
        return evaluate_trained(options["checkpoint"], model, dataset, files, overrides,
                                trust_pickle=options["trust_pickled_checkpoint"])
    if options["nproc"] > 1 or options["world_size"] > 1 or "LOCAL_RANK" in os.environ:
        return run_distributed(model, dataset, config_file_list=files, config_dict=overrides, options=options)
    return run_recbole_popprior(model, dataset, config_file_list=files, config_dict=overrides)


def compare(options: dict[str, Any], overrides: dict[str, Any]) -> Any:
    _start(options)
    return run_compare(options["model"], options["dataset"], config_file_list=options["config_files"],
                       config_dict=overrides, seeds=options["seeds"], output=overrides.get("output"),
                       arms=options["arms"])


def beta_sweep(options: dict[str, Any], overrides: dict[str, Any]) -> Any:
    _start(options)
    return run_beta_sweep(options["model"], options["dataset"], options["beta_sweep"],
                          config_file_list=options["config_files"], config_dict=overrides,
                          output=overrides.get("output"), checkpoint=options["checkpoint"],
                          trust_pickle=options["trust_pickled_checkpoint"])


def tune(options: dict[str, Any], overrides: dict[str, Any]) -> Any:
    _start(options)
    return run_tuning(options["model"], options["dataset"], config_file_list=options["config_files"],
                      config_dict=overrides, options=options)


__all__ = ["train", "compare", "beta_sweep", "tune"]
