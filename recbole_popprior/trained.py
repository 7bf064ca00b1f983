"""Measuring and serving a model that is already trained: ``--checkpoint=PATH`` (docs/DESIGN.md §1, §3).

The model is rebuilt from the settings saved in its checkpoint (the architecture, the data
processing and the prior as they were when it was trained; your ``--key=value`` win), the data
are loaded and split as for training, the trained weights are restored, and nothing trains.

- A plugin checkpoint (``model.pth`` of any run) loads with ``weights_only=True`` and its digest
  is checked (:func:`recbole_popprior.checkpoint.load_checkpoint`).
- A checkpoint of RecBole itself is a pickle: it is refused unless ``--trust-pickled-checkpoint``
  (:func:`recbole_popprior.checkpoint.load_trained_checkpoint`), and then served by the plugin's
  class at ``prior_tau: 0``, which is RecBole's model, with the training prior counted from the data.
"""

from __future__ import annotations

from logging import getLogger
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from recbole.utils import get_local_time

from recbole_popprior import checkpoint
from recbole_popprior.config import parse_literal
from recbole_popprior.errors import PopPriorError
from recbole_popprior.quick_start import Pipeline, build_config, build_pipeline, log_report_folder
from recbole_popprior.serving import evaluate_at
from recbole_popprior.utils import to_jsonable, write_json

#: saved settings that describe where and how a run ran, not the model: never carried over
ENVIRONMENT_KEYS = frozenset({
    "model", "dataset", "config_files", "device", "gpu_id", "use_gpu", "local_rank", "single_spec", "world_size",
    "nproc", "offset", "ip", "port", "ddp_backend", "ddp_init_method", "checkpoint_dir", "run_dir", "output",
    "state", "show_progress", "tensorboard", "log_wandb", "wandb_project"})
#: settings RecBole derives while it builds a config (saved as text, rebuilt from the others)
DERIVED_KEYS = frozenset({"MODEL_TYPE", "MODEL_INPUT_TYPE", "eval_type", "train_neg_sample_args",
                          "eval_neg_sample_args", "valid_neg_sample_args", "test_neg_sample_args"})
#: settings that only shape the start of training, which the restored weights replace (a file
#: they name need not exist where the model is evaluated)
TRAINING_ONLY_KEYS = frozenset({"ace_init", "pre_model_path"})
#: the energy metrics an evaluation of a trained model adds to the configured ones (DESIGN §3-4)
ENERGY_METRICS = ("PopEnergy", "EmbeddingSpectrum")
_PRIOR_BUFFERS = ("log_prior", "log_prior_windows", "prior_window_edges")


def checkpoint_settings(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The saved config of a checkpoint, without the keys of :data:`ENVIRONMENT_KEYS`,
    :data:`DERIVED_KEYS` and :data:`TRAINING_ONLY_KEYS`: the settings that rebuild the trained
    model and its data."""
    dropped = ENVIRONMENT_KEYS | DERIVED_KEYS | TRAINING_ONLY_KEYS
    return {k: v for k, v in saved.items() if k not in dropped}


def with_metrics(metrics: Any, needed: Sequence[str]) -> list[str]:
    """``metrics`` plus each of ``needed`` that it lacks (case-insensitive); ``metrics`` may be the
    text of ``--metrics=...`` (a literal list, or one name)."""
    if isinstance(metrics, str):
        metrics = parse_literal(metrics)
    names = [metrics] if isinstance(metrics, str) else list(metrics or [])
    known = {str(m).lower() for m in names}
    return names + [m for m in needed if m.lower() not in known]


def trained_config(path: str | Path, model: str | None = None, dataset: str | None = None,
                   config_file_list: list[str] | None = None, config_dict: Mapping[str, Any] | None = None, *,
                   trust_pickle: bool = False, metrics: Sequence[str] = ENERGY_METRICS) -> tuple[Any, dict[str, Any]]:
    """The config that rebuilds the model saved in ``path``, and the loaded checkpoint.

    ``model`` and ``dataset`` default to the checkpoint's (a different model is an error);
    ``config_dict`` (e.g. ``data_path``, ``topk``) goes on top of the saved settings; ``metrics``
    are added to the configured metrics.
    """
    state = checkpoint.load_trained_checkpoint(path, trust_pickle=trust_pickle)
    saved = state["meta"].get("config") or {}
    if not isinstance(saved, dict):
        raise PopPriorError(f"checkpoint {path} holds no settings to rebuild its model from")
    saved_model = saved.get("model")
    if model is not None and saved_model is not None and str(model).lower() != str(saved_model).lower():
        raise PopPriorError(f"checkpoint {path} holds a {saved_model}, not a {model}: drop --model or change it")
    model = saved_model or model
    dataset = dataset or saved.get("dataset")
    if model is None or dataset is None:
        raise PopPriorError(f"checkpoint {path} does not say which model and dataset it holds: "
                            "give --model and --dataset")
    settings = checkpoint_settings(saved)
    if state["meta"].get("source") == "recbole":  # RecBole's own model is the plugin's class at tau = 0
        settings.update(prior_tau=0.0, prior_beta=None, popprior_baseline=False)
    settings.update(config_dict or {})
    settings["metrics"] = with_metrics(settings.get("metrics") or ["Recall", "MRR", "NDCG"], metrics)
    return build_config(model, dataset, config_file_list, settings), state


def restore_trained(config: Any, state: Mapping[str, Any], path: str | Path) -> Pipeline:
    """Load and split the data as for training, build the model and put the trained weights in."""
    pipe = build_pipeline(config)
    logger = getLogger()
    from_recbole = state["meta"].get("source") == "recbole"
    state_dict = dict(state["state_dict"])
    own = pipe.model.state_dict()
    if from_recbole:  # RecBole's checkpoint has no prior: the one counted from these data serves
        state_dict.update({k: own[k] for k in _PRIOR_BUFFERS if k in own and k not in state_dict})
    elif "log_prior" in own and "log_prior" in state_dict and own["log_prior"].shape == state_dict["log_prior"].shape \
            and not torch.allclose(own["log_prior"].cpu(), state_dict["log_prior"].cpu()):
        logger.warning(f"the training prior saved in {path} differs from the one these data give: are they the "
                       "data it was trained on? Its own prior serves")
    checkpoint.restore_model(pipe.model, {**state, "state_dict": state_dict}, path)
    logger.info(f"loaded the trained {config['model']} from {path} ({'RecBole' if from_recbole else 'plugin'} "
                f"checkpoint, epoch {state['meta'].get('epoch')}); nothing is trained")
    return pipe


def load_trained(path: str | Path, model: str | None = None, dataset: str | None = None,
                 config_file_list: list[str] | None = None, config_dict: Mapping[str, Any] | None = None, *,
                 trust_pickle: bool = False, metrics: Sequence[str] = ENERGY_METRICS) -> Pipeline:
    """Rebuild the model saved in ``path`` on its data, with its trained weights: a
    :class:`~recbole_popprior.quick_start.Pipeline` that evaluates without training
    (:func:`trained_config`, then :func:`restore_trained`)."""
    config, state = trained_config(path, model, dataset, config_file_list, config_dict, trust_pickle=trust_pickle,
                                   metrics=metrics)
    return restore_trained(config, state, path)


def evaluation_run_dir(output: str | Path, model: str | None, dataset: str | None) -> Path:
    """``<output>/eval-<model>-<dataset>-<time>`` (``-k`` added if it exists)."""
    stem = Path(output) / f"eval-{model or 'model'}-{dataset or 'data'}-{get_local_time()}"
    run_dir, k = stem, 1
    while run_dir.exists():
        k += 1
        run_dir = stem.with_name(f"{stem.name}-{k}")
    return run_dir


def evaluate_trained(path: str | Path, model: str | None = None, dataset: str | None = None,
                     config_file_list: list[str] | None = None, config_dict: Mapping[str, Any] | None = None, *,
                     trust_pickle: bool = False) -> dict[str, Any]:
    """Validation and test metrics of the trained model in ``path``, with the energy metrics;
    written to ``<output>/eval-<model>-<dataset>-<time>/results.json`` (nothing is trained)."""
    config, state = trained_config(path, model, dataset, config_file_list, config_dict, trust_pickle=trust_pickle)
    if not ("run_dir" in config and config["run_dir"]):
        config["run_dir"] = str(evaluation_run_dir(config["output"], config["model"], config["dataset"]))
    pipe = restore_trained(config, state, path)
    trainer, logger = pipe.trainer, getLogger()
    stage, trainer.eval_stage = trainer.eval_stage, "valid"
    try:
        valid_result = evaluate_at(trainer, pipe.valid_data)
    finally:
        trainer.eval_stage = stage
    test_result = evaluate_at(trainer, pipe.test_data)
    logger.info(f"valid result: {to_jsonable(valid_result)}")
    logger.info(f"test result: {to_jsonable(test_result)}")
    config, model_obj = pipe.config, pipe.model
    result = {
        "model": config["model"], "dataset": config["dataset"], "checkpoint": str(path), "trained": False,
        "prior_tau": model_obj.training_tau() if hasattr(model_obj, "training_tau") else 0.0,
        "prior_beta": model_obj.effective_beta() if hasattr(model_obj, "effective_beta") else None,
        "valid_result": valid_result, "test_result": test_result, "run_dir": str(pipe.run_dir),
    }
    write_json(pipe.run_dir / "results.json", result)
    log_report_folder(pipe.run_dir, "results.json, run.log")
    return result


__all__ = ["load_trained", "trained_config", "restore_trained", "evaluate_trained", "checkpoint_settings", "with_metrics", "evaluation_run_dir",
           "ENVIRONMENT_KEYS", "DERIVED_KEYS", "TRAINING_ONLY_KEYS", "ENERGY_METRICS"]
