"""The plugin's ``Config``: RecBole's config, numpy-2 safe, aware of the plugin's models,
``properties/`` defaults and ``dataset_configs/``.

Precedence, as in RecBole: library defaults < plugin defaults (``properties/overall.yaml``)
< model yaml (RecBole's, then ``properties/model/<Model>.yaml``) < dataset yaml (RecBole's,
then ``dataset_configs/<dataset>.yaml``) < ``config_file_list`` < ``config_dict``.
Command-line ``--key=value`` pairs are parsed by :mod:`recbole_popprior.cli` and passed in
as ``config_dict``; unlike RecBole, this class never reads ``sys.argv`` itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from recbole.config import Config as RecBoleConfig

from recbole_popprior import compat
from recbole_popprior.errors import PopPriorError

ROOT = Path(__file__).resolve().parent.parent
PROPERTIES_DIR = ROOT / "properties"
DATASET_CONFIG_DIR = ROOT / "dataset_configs"
_RECBOLE_SAMPLE_YAML = (Path(RecBoleConfig.__module__ and __import__("recbole").__file__).parent
                        / "properties" / "dataset" / "sample.yaml").resolve()


class Config(RecBoleConfig):
    """RecBole ``Config`` for prior-separated models (see module docstring for precedence)."""

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None):
        try:
            super().__init__(model, dataset, config_file_list, config_dict)
        except FileNotFoundError as exc:
            raise PopPriorError(f"config file not found: {exc.filename}") from None
        except yaml.YAMLError as exc:
            raise PopPriorError(f"config file is not valid yaml: {str(exc).splitlines()[0]}") from None
        _validate(self.final_config_dict)

    # Shim 1 (compat.numpy_aliases): RecBole's version crashes under numpy 2.
    def compatibility_settings(self):
        compat.numpy_aliases()

    def _load_cmd_line(self):
        # Never parse sys.argv here (pytest's or a launcher's flags would leak into the
        # config); the CLI turns --key=value pairs into config_dict entries instead.
        return {}

    def _get_model_and_dataset(self, model, dataset):
        from recbole_popprior.model import get_model

        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise PopPriorError("no model given: pass --model=<RecBole model name>")
        if isinstance(model, str):
            model = get_model(model, baseline=bool(self.external_config_dict.get("popprior_baseline")))
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise PopPriorError("no dataset given: pass --dataset=<name>")
        return model.__name__, model, dataset

    def _update_internal_config_dict(self, file):
        config_dict = super()._update_internal_config_dict(file)
        # The plugin's defaults go right after RecBole's generic ones (overall.yaml, the
        # model yaml and dataset/sample.yaml) and before any dataset-specific yaml.
        if Path(file).resolve() == _RECBOLE_SAMPLE_YAML:
            super()._update_internal_config_dict(str(PROPERTIES_DIR / "overall.yaml"))
        return config_dict

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        model_file = PROPERTIES_DIR / "model" / f"{model}.yaml"
        if model_file.is_file():
            self._update_internal_config_dict(str(model_file))
        dataset_file = DATASET_CONFIG_DIR / f"{dataset}.yaml"
        if dataset_file.is_file():
            added = self._update_internal_config_dict(str(dataset_file)) or {}
            self.parameters["Dataset"] += [k for k in added if k not in self.parameters["Dataset"]]

    def _init_device(self):
        """RecBole's device setup; the DDP branch goes through ``compat.init_distributed``.

        Shim 5: RecBole hard-codes NCCL and one GPU per process for DDP. As in RecBole,
        ``gpu_id`` (a string or tuple) becomes ``CUDA_VISIBLE_DEVICES`` and ``local_rank``
        in the config switches distributed training on; this runs once per process, and
        each process must build exactly one ``Config`` (it joins the process group).
        """
        config = self.final_config_dict
        if "local_rank" not in config:
            super()._init_device()
            return
        gpu_id = config.get("gpu_id")
        if isinstance(gpu_id, (tuple, list)):
            gpu_id = ",".join(map(str, gpu_id))
        config["gpu_id"] = "" if gpu_id is None else str(gpu_id)
        os.environ["CUDA_VISIBLE_DEVICES"] = config["gpu_id"]
        compat.init_distributed(config)


def _number(config: dict[str, Any], key: str, *, low: float | None = None, strict: bool = False,
            allow: tuple = ()) -> None:
    value = config.get(key)
    if value in allow:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PopPriorError(f"{key} must be a number, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise PopPriorError(f"{key} must be {'>' if strict else '>='} {low}, got {value!r}")


def _validate(config: dict[str, Any]) -> None:
    """Reject bad plugin settings with one clear line (DESIGN.md §1-3)."""
    if config.get("prior_tau") != "learned":
        _number(config, "prior_tau")
    _number(config, "prior_beta", allow=(None,))
    _number(config, "prior_alpha", low=0.0, strict=True)
    if config.get("prior_mode") not in {"static", "windowed"}:
        raise PopPriorError(f"prior_mode must be 'static' or 'windowed', got {config.get('prior_mode')!r}")
    windows = config.get("prior_windows")
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
        raise PopPriorError(f"prior_windows must be an integer >= 1, got {windows!r}")
    if config.get("prior_window_by") not in {"time", "count"}:
        raise PopPriorError(f"prior_window_by must be 'time' or 'count', got {config.get('prior_window_by')!r}")
    serve = config.get("prior_serve_window")
    if isinstance(serve, bool) or not isinstance(serve, int) or not -windows <= serve < windows:
        raise PopPriorError(f"prior_serve_window must be an integer in [-{windows}, {windows}), got {serve!r}")
    metrics = [str(m).lower() for m in config.get("metrics") or []]
    valid_metric = str(config.get("valid_metric", "")).lower()
    if metrics and valid_metric.split("@")[0] not in metrics:
        raise PopPriorError(f"valid_metric {config.get('valid_metric')!r} is not among metrics {config.get('metrics')}; "
                            "add it to metrics or choose another valid_metric")
    if config.get("sequence_data") not in {"lean", "recbole"}:
        raise PopPriorError(f"sequence_data must be 'lean' or 'recbole', got {config.get('sequence_data')!r}")
    perms = config.get("energy_permutations")
    if isinstance(perms, bool) or not isinstance(perms, int) or perms < 0:
        raise PopPriorError(f"energy_permutations must be an integer >= 0, got {perms!r}")
    if config.get("energy_permutation_stage") not in {"test", "valid", "always"}:
        raise PopPriorError("energy_permutation_stage must be test, valid or always, got "
                            f"{config.get('energy_permutation_stage')!r}")
