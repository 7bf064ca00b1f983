"""The plugin's quick start: RecBole's pipeline with prior-separated models.

``recbole.quick_start`` imports ray at module level, so it is never imported here
(RECBOLE_NOTES.md). :func:`run_recbole_popprior` is what ``run_recbole_popprior.py`` calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path
from typing import Any

import colorlog
from recbole.utils import get_local_time, init_seed, set_color
from recbole.utils.logger import RemoveColorFilter, log_colors_config

from recbole_popprior import checkpoint
from recbole_popprior.config import Config
from recbole_popprior.data import create_dataset, data_preparation
from recbole_popprior.errors import PopPriorError
from recbole_popprior.remedies.ace import check_ace_file
from recbole_popprior.trainer import get_trainer
from recbole_popprior.utils import to_jsonable, write_json

_HANDLER_TAG = "_recbole_popprior"
#: ``extra=`` of the long dumps (config, dataset, model): run.log always, the console only when verbose
DUMP = {"popprior_dump": True}
_console = {"dumps": False}


def show_dumps_on_console(show: bool = True) -> None:
    """Print RecBole's config, dataset and model dumps on the console too (``--verbose``); they
    always go to the run's ``run.log``. Applies to the loggers set up afterwards in this process."""
    _console["dumps"] = bool(show)


def _not_a_dump(record: logging.LogRecord) -> bool:
    return not getattr(record, "popprior_dump", False)


@dataclass
class Pipeline:
    """Everything one run builds: config, data, model and trainer, and where it writes."""

    config: Config
    dataset: Any
    train_data: Any
    valid_data: Any
    test_data: Any
    model: Any
    trainer: Any
    run_dir: Path


def build_config(model: str | type | None = None, dataset: str | None = None,
                 config_file_list: list[str] | None = None, config_dict: dict | None = None) -> Config:
    """The plugin's :class:`Config` for one run."""
    return Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)


def init_logger(config: Config, run_dir: Path | None = None) -> logging.Logger:
    """RecBole-style logging to the console and to ``run_dir/run.log`` (replaces earlier runs' handlers)."""
    level = getattr(logging, str(config["state"] or "INFO").upper(), logging.INFO)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(handler)
        handler.close()
    stream = logging.StreamHandler()
    stream.setFormatter(colorlog.ColoredFormatter(
        "%(log_color)s%(asctime)-15s %(levelname)s  %(message)s", "%d %b %H:%M", log_colors=log_colors_config))
    if not _console["dumps"]:
        stream.addFilter(_not_a_dump)
    handlers: list[logging.Handler] = [stream]
    if run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "run.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)-15s %(levelname)s  %(message)s", "%a %d %b %Y %H:%M:%S"))
        file_handler.addFilter(RemoveColorFilter())
        handlers.append(file_handler)
    for handler in handlers:
        handler.setLevel(level)
        setattr(handler, _HANDLER_TAG, True)
        root.addHandler(handler)
    root.setLevel(level)
    return root


def make_folder(path: str | Path, what: str, fresh: bool = False) -> list[Path]:
    """``mkdir -p path``; returns the folders it created, outermost first. A file in the way or
    a folder that cannot be written is one :class:`PopPriorError` line naming ``what`` it is.
    ``fresh``: ``path`` itself must be new (``FileExistsError`` when another process made it first)."""
    path = Path(path)
    missing, probe = [], path
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise PopPriorError(f"cannot create {what} {path}: {probe} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(exist_ok=not fresh)
    except FileExistsError:
        if fresh and path.is_dir():
            raise
        raise PopPriorError(f"cannot create {what} {path}: it exists and is not a folder") from None
    except OSError as exc:
        raise PopPriorError(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    return missing[::-1]


def _make_run_dir(config: Config) -> tuple[Path, list[Path]]:
    """The run folder (:func:`run_dir_name`), made here on rank 0, and the folders made for it. A
    folder named after the time is made exclusively: two runs started in the same second (into
    one ``--output``) would otherwise share it, and write over each other's checkpoint and log."""
    named = bool(config["run_dir"] if "run_dir" in config else None)
    for _ in range(100):
        run_dir = run_dir_name(config)
        if config["local_rank"] != 0:
            return run_dir, []
        try:
            return run_dir, make_folder(run_dir, "the run folder", fresh=not named)
        except FileExistsError:  # taken since run_dir_name looked: the next name
            continue
    raise PopPriorError(f"cannot create a run folder in {config['output']}: every name is taken")


def run_dir_name(config: Config) -> Path:
    """The run folder a run uses (not created here): ``config["run_dir"]``, or
    ``<output>/<model>-<dataset>-<time>[-k]`` (the first name not taken)."""
    if config["run_dir"] if "run_dir" in config else None:
        return Path(config["run_dir"])
    stem = Path(config["output"]) / f'{config["model"]}-{config["dataset"]}-{get_local_time()}'
    run_dir, k = stem, 1
    while run_dir.exists():
        k += 1
        run_dir = stem.with_name(f"{stem.name}-{k}")
    return run_dir


def _undo_run_dir(run_dir: Path, created: list[Path]) -> None:
    """After a failed start: close this run's log file and remove the folders the start created,
    as long as they hold nothing but that log (a half-started run leaves no empty run folder)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.absolute():
            root.removeHandler(handler)
            handler.close()
    if not created:
        return
    if run_dir.is_dir() and set(os.listdir(run_dir)) <= {"run.log"}:
        shutil.rmtree(run_dir, ignore_errors=True)
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def check_input_files(config: Config) -> None:
    """The files the model reads besides the dataset, checked before the data loads (one line
    each, instead of an error after loading and logging the data): ``ace_init`` from its arrays'
    headers, and S3Rec's fine-tune ``pre_model_path`` (loaded, digest and structure checked)."""
    if config["ace_init"]:
        check_ace_file(config["ace_init"])
    if "train_stage" in config and config["train_stage"] == "finetune":
        checkpoint.load_checkpoint(config["pre_model_path"] or "<pre_model_path is empty>")


def build_model(config: Config, dataset: Any) -> Any:
    """The model, on its device. RecBole's models and torch's modules check their settings in the
    constructor (``num_layers must be greater than zero``): bad settings, so one line each."""
    try:
        return config.model_class(config, dataset).to(config["device"])
    except (ValueError, TypeError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PopPriorError(f"cannot build {config['model']} with these settings: {message}") from None


def build_pipeline(config: Config, *, log: bool = True) -> Pipeline:
    """Seed, load and split the data, and build the model and its trainer (as RecBole's quick start).

    Nothing is left on disk when this fails: the run folder is removed again if it was created here.
    """
    run_dir, created = _make_run_dir(config)
    try:
        config["checkpoint_dir"] = str(run_dir)
        if log:
            init_logger(config, run_dir if config["local_rank"] == 0 else None)
        logger = getLogger()
        for line in getattr(config, "unknown_key_warnings", ()):
            logger.warning(line)
        logger.info(config, extra=DUMP)
        init_seed(config["seed"], config["reproducibility"])
        check_input_files(config)
        dataset = create_dataset(config)
        summary = str(dataset)  # logged once the splits are checked: a bad split is then one line
        train_data, valid_data, test_data = data_preparation(config, dataset)
        logger.info(summary, extra=DUMP)
        init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
        model = build_model(config, train_data._dataset)
        logger.info(model, extra=DUMP)
        trainer = get_trainer(config)(config, model)
    except BaseException:
        _undo_run_dir(run_dir, created)
        raise
    trainer.saved_model_file = str(run_dir / "model.pth")
    return Pipeline(config, dataset, train_data, valid_data, test_data, model, trainer, run_dir)


def train_and_test(pipe: Pipeline, *, saved: bool = True, callback_fn=None) -> dict[str, Any]:
    """Fit on train/valid, then evaluate the best model on test; return the result record."""
    config, trainer, logger = pipe.config, pipe.trainer, getLogger()
    start = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        pipe.train_data, pipe.valid_data, saved=saved, show_progress=config["show_progress"],
        callback_fn=callback_fn)
    fit_seconds = time.perf_counter() - start
    test_result = trainer.evaluate(pipe.test_data, load_best_model=saved, show_progress=config["show_progress"])
    logger.info(set_color("best valid ", "yellow") + f": {to_jsonable(dict(best_valid_result or {}))}")
    logger.info(set_color("test result", "yellow") + f": {to_jsonable(dict(test_result or {}))}")
    model = pipe.model
    return {
        "model": config["model"],
        "dataset": config["dataset"],
        "seed": config["seed"],
        "prior_tau": config["prior_tau"],
        "prior_beta": model.effective_beta() if hasattr(model, "effective_beta") else None,
        "prior_alpha": config["prior_alpha"],
        "prior_mode": config["prior_mode"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": dict(best_valid_result or {}),
        "test_result": dict(test_result or {}),
        "run_dir": str(pipe.run_dir),
        "checkpoint": trainer.saved_model_file if saved else None,
        "fit_seconds": fit_seconds,  # wall time of fit (training and validation)
    }


def run_recbole_popprior(model: str | None = None, dataset: str | None = None,
                         config_file_list: list[str] | None = None, config_dict: dict | None = None,
                         saved: bool = True) -> dict[str, Any]:
    """Train and test one prior-separated model; save ``results.json`` in the run folder.

    Mirrors ``recbole.quick_start.run_recbole`` (without importing ray). Returns the result
    record: best validation score/result, test result, run folder and checkpoint path.
    """
    config = build_config(model, dataset, config_file_list, config_dict)
    pipe = build_pipeline(config)
    result = train_and_test(pipe, saved=saved)
    if config["local_rank"] == 0:
        write_json(pipe.run_dir / "results.json", result)
        log_report_folder(pipe.run_dir, "results.json, model.pth, run.log")
    return result


def log_report_folder(folder: Path, what: str) -> None:
    """A command's last log line: where its outputs are."""
    getLogger().info(set_color("outputs in", "blue") + f": {folder} ({what})")
