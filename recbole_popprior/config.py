# Over 500 lines: every plugin key is checked here, in config._validate (a bad value is one line, exit 2).
"""The plugin's ``Config``: RecBole's config, numpy-2 safe, aware of the plugin's models, its
``properties/`` defaults and its ``dataset_configs/``.

Precedence (later wins), exactly as :meth:`Config._load_internal_config_dict` applies it:

1. RecBole's ``overall.yaml``, its model yaml and its ``dataset/sample.yaml``;
2. the plugin's defaults, ``properties/overall.yaml``;
3. RecBole's dataset yaml (``dataset/<dataset>.yaml``) and its yaml for the model type
   (``quick_start_config/sequential.yaml`` and friends);
4. the plugin's model yaml, ``properties/model/<Model>.yaml``;
5. the plugin's dataset yaml, ``dataset_configs/<dataset>.yaml``;
6. ``config_file_list`` (``--config_files``), in order;
7. ``config_dict`` (``--key=value`` on the command line).

The yaml folders ship inside the package (``recbole_popprior.properties``,
``recbole_popprior.dataset_configs``) and are found through ``importlib.resources``, in an
installed copy and in a checkout alike. Command-line pairs are parsed by
:mod:`recbole_popprior.cli` and passed in as ``config_dict``; unlike RecBole, this class never
reads ``sys.argv``, and string values are parsed as literals, never evaluated. Every plugin
setting has its default in yaml and its check in :func:`_validate`.
"""

from __future__ import annotations

import ast
import contextlib
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import recbole
import torch
import yaml
from recbole.config import Config as RecBoleConfig
from recbole.model.sequential_recommender import CORE

from recbole_popprior import compat
from recbole_popprior import evaluator as _evaluator  # noqa: F401  (importing it registers the energy metrics)
from recbole_popprior.errors import PopPriorError
from recbole_popprior.model import check_loss_type, get_model, trains_without_negatives
from recbole_popprior.model.fast_kernels import FAST_KERNEL_KEYS
from recbole_popprior.model.negatives import AUTO
from recbole_popprior.model.registry import ModelRecord, record_of, require_record
from recbole_popprior.model.remedy_objectives import REMEDIES
from recbole_popprior.model.sampled_softmax import SAMPLERS
from recbole_popprior.optim import check_optimizer_settings
from recbole_popprior.presets import config_file
from recbole_popprior.prior_source import PRIOR_SOURCES
from recbole_popprior.remedies.resn import LINKS
from recbole_popprior.unknown_settings import (INTERNAL_KEYS, PLUGIN_PREFIXES, known_plugin_keys,  # noqa: F401
                                               other_unknown_keys, summarised, unknown_key_warnings)
from recbole_popprior.yaml_files import RecBoleYamlLoader, read_yaml_file, yaml_problem

_RECBOLE_SAMPLE_YAML = (Path(recbole.__file__).parent / "properties" / "dataset" / "sample.yaml").resolve()


def properties_file(*parts: str) -> Path:
    """A file of the plugin's ``properties/`` folder (it may not exist)."""
    return Path(str(resources.files("recbole_popprior.properties").joinpath(*parts)))


def dataset_config_file(dataset: str) -> Path:
    """The plugin's ``dataset_configs/<dataset>.yaml`` (it may not exist)."""
    return Path(str(resources.files("recbole_popprior.dataset_configs").joinpath(f"{dataset}.yaml")))


class Config(RecBoleConfig):
    """RecBole ``Config`` for prior-separated models (see the module docstring for the precedence)."""

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None):
        try:
            super().__init__(model, dataset, config_file_list, config_dict)
        except FileNotFoundError as exc:
            raise PopPriorError(f"config file not found: {exc.filename}") from None
        except yaml.YAMLError as exc:
            raise PopPriorError(f"a config file is not valid yaml: {yaml_problem(exc)}") from None
        _resolve(self.final_config_dict)
        _validate(self.final_config_dict, self.model_class)
        known = set(self.internal_config_dict) | {p for group in self.parameters.values() for p in group}
        #: the given settings that nothing reads: not RecBole's, not the model's, not the plugin's
        self.unknown_keys = [key for key in self.external_config_dict
                             if key not in known and key not in known_plugin_keys() and key not in INTERNAL_KEYS]
        #: one line per unknown setting with a plugin prefix, one for the others (logged by the quick start)
        self.unknown_key_warnings = unknown_key_warnings(self.external_config_dict) + other_unknown_keys(
            [key for key in self.unknown_keys if not key.startswith(PLUGIN_PREFIXES)], known, self["model"])
        for key in self.unknown_keys:  # nothing reads them: never carried whole into logs or checkpoints
            self.final_config_dict[key] = self.external_config_dict[key] = summarised(self.final_config_dict[key])

    # Shim 1 (compat.numpy_aliases): RecBole's version crashes under numpy 2.
    def compatibility_settings(self):
        compat.numpy_aliases()

    def _build_yaml_loader(self):
        return RecBoleYamlLoader

    # RecBole's own checks of metrics, topk, valid_metric and the sampling arguments raise
    # ValueError, TypeError, NotImplementedError or RuntimeError: bad input, so one line each.
    def _set_default_parameters(self):
        metrics = self.final_config_dict.get("metrics")
        if isinstance(metrics, (list, tuple)) and not metrics:  # RecBole: "pop from an empty set"
            raise PopPriorError("metrics is empty: list at least one metric, e.g. [Recall, NDCG]")
        # RecBole refuses sampled negatives for a sequential softmax, and its BPR models need
        # them: None only where the model trains a softmax, unless the user set it (DESIGN §6.2)
        if "train_neg_sample_args" not in self.external_config_dict and trains_without_negatives(
                self.model_class, self.final_config_dict.get("loss_type")):
            self.final_config_dict["train_neg_sample_args"] = None
        with _recbole_checks():
            super()._set_default_parameters()

    def _set_train_neg_sample_args(self):
        with _recbole_checks():
            super()._set_train_neg_sample_args()

    def _set_eval_neg_sample_args(self, phase):
        with _recbole_checks():
            super()._set_eval_neg_sample_args(phase)

    def _load_config_files(self, file_list):
        """RecBole's reader of ``--config_files``, with one line for a file that is not UTF-8,
        not yaml, over the bounds of :mod:`recbole_popprior.yaml_files` (an alias bomb), or not a
        mapping of settings (RecBole raises from ``dict.update``)."""
        merged: dict[str, Any] = {}
        for file in map(config_file, file_list or []):
            loaded = read_yaml_file(file, "config file")
            if loaded is None:  # an empty file sets nothing
                continue
            if not isinstance(loaded, dict):
                raise PopPriorError(f"config file {file} must map settings to values (key: value lines), "
                                    f"got a {type(loaded).__name__}")
            bad = [key for key in loaded if not isinstance(key, str)]
            if bad:
                raise PopPriorError(f"config file {file}: setting names must be strings, got {bad[0]!r}")
            merged.update(loaded)
        return merged

    def _load_cmd_line(self):
        # Never parse sys.argv here (pytest's or a launcher's flags would leak into the
        # config); the CLI turns --key=value pairs into config_dict entries instead.
        return {}

    def _convert_config_dict(self, config_dict):
        """String values to Python literals (``"[10, 20]"`` -> a list); other strings stay strings.

        RecBole's version calls ``eval`` on every string it is given, so a command-line value
        could run code; ``ast.literal_eval`` accepts exactly the literals and nothing else.
        """
        for key, value in config_dict.items():
            if isinstance(value, str):
                config_dict[key] = parse_literal(value)
        return config_dict

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise PopPriorError("no model given: pass --model=<RecBole model name>")
        # a name or a class (a user's subclass or registered model): the prior-separated class
        # of its record, or with popprior_baseline the model class itself (README: your own model)
        model = get_model(model, baseline=bool(self.external_config_dict.get("popprior_baseline")))
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise PopPriorError("no dataset given: pass --dataset=<name>")
        return model.__name__, model, dataset

    def _update_internal_config_dict(self, file):
        config_dict = super()._update_internal_config_dict(file)
        # level 2: the plugin's defaults go right after RecBole's generic files (overall.yaml,
        # the model yaml and dataset/sample.yaml), before anything dataset-specific
        if Path(file).resolve() == _RECBOLE_SAMPLE_YAML:
            super()._update_internal_config_dict(str(properties_file("overall.yaml")))
        return config_dict

    def _load_internal_config_dict(self, model, model_class, dataset):
        # the yaml of the model's record (``MySASRec(SASRec)`` reads SASRec's defaults): RecBole
        # looks its files up by name, and a user's subclass has none of its own
        record = record_of(model_class)
        model = record.name if record is not None else model
        super()._load_internal_config_dict(model, model_class, dataset)  # levels 1-3
        model_file = properties_file("model", f"{model}.yaml")
        if model_file.is_file():  # level 4
            self._update_internal_config_dict(str(model_file))
        dataset_file = dataset_config_file(dataset)
        if dataset_file.is_file():  # level 5
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


@contextlib.contextmanager
def _recbole_checks() -> Iterator[None]:
    try:
        yield
    except (ValueError, TypeError, KeyError, NotImplementedError, RuntimeError, AttributeError) as exc:
        text = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).strip()  # KeyError quotes
        raise PopPriorError(f"invalid setting: {text.splitlines()[0] if text else type(exc).__name__}") from None


def parse_literal(text: str) -> Any:
    """A config string as RecBole means it, without ``eval``: a Python literal when it is one
    (numbers, lists, dicts, ``None``, ``True``), ``true``/``false`` in any case as booleans,
    anything else as the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


# --- settings derived from others ---------------------------------------------------------
def _resolve(config: dict[str, Any]) -> None:
    """Fill the settings whose yaml default depends on another one.

    S3Rec's pretraining runs ``pretrain_epochs`` epochs whatever ``epochs`` says (RecBole's
    default 500), so a short run or a tuning trial would stay in it: ``~`` (the plugin's
    default, properties/model/S3Rec.yaml) means ``epochs``. It saves every ``save_step``
    epochs, and the fine-tune stage needs the last one: ``save_step`` is capped at it.
    """
    if "pretrain_epochs" in config and config["pretrain_epochs"] is None:
        config["pretrain_epochs"] = config.get("epochs")
    epochs, step = config.get("pretrain_epochs"), config.get("save_step")
    if _is_int(epochs) and _is_int(step) and epochs >= 1 and step > epochs:
        config["save_step"] = epochs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- checks of the plugin's settings ------------------------------------------------------
#: the largest float32: settings end up in float32 tensors, where a larger value is infinite
FLOAT32_MAX = 3.4028234663852886e38


def _number(config: dict[str, Any], key: str, *, low: float | None = None, strict: bool = False,
            allow: tuple = (), integer: bool = False, high: float | None = None, strict_high: bool = False) -> None:
    value = config.get(key)
    if value in allow and (value is None or isinstance(value, str)):
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise PopPriorError(f"{key} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise PopPriorError(f"{key} must be a finite number, got {value!r}")
    if not integer and abs(value) > FLOAT32_MAX:
        raise PopPriorError(f"{key} must be a finite float32 number (at most 3.4e38 in size), got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise PopPriorError(f"{key} must be {'>' if strict else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if strict_high else value > high):
        raise PopPriorError(f"{key} must be {'<' if strict_high else '<='} {high}, got {value!r}")


def _choice(config: dict[str, Any], key: str, choices: tuple) -> None:
    if config.get(key) not in choices:
        raise PopPriorError(f"{key} must be one of {', '.join(map(str, choices))}, got {config.get(key)!r}")


def _validate(config: dict[str, Any], model_class: type) -> None:
    """Reject bad plugin settings with one clear line (docs/DESIGN.md §1-3); what the model
    takes comes from its record (:mod:`recbole_popprior.model.registry`)."""
    if config.get("prior_tau") != "learned":
        _number(config, "prior_tau")
    _number(config, "prior_beta", allow=(None,))
    _number(config, "prior_alpha", low=0.0, strict=True)
    _choice(config, "prior_mode", ("static", "windowed"))
    _number(config, "prior_windows", low=1, integer=True)
    _choice(config, "prior_window_by", ("time", "count"))
    _validate_prior_source(config)
    windows = config["prior_windows"]
    serve = config.get("prior_serve_window")
    if isinstance(serve, bool) or not isinstance(serve, int) or not -windows <= serve < windows:
        raise PopPriorError(f"prior_serve_window must be an integer in [-{windows}, {windows}), got {serve!r}")
    metrics = [str(m).lower() for m in config.get("metrics") or []]
    valid_metric = str(config.get("valid_metric", "")).lower()
    if metrics and valid_metric.split("@")[0] not in metrics:
        raise PopPriorError(f"valid_metric {config.get('valid_metric')!r} is not among metrics {config.get('metrics')}; "
                            "add it to metrics or choose another valid_metric")
    _choice(config, "sequence_data", ("lean", "recbole"))
    _validate_running(config, model_class)
    _validate_precision(config)
    _validate_training(config)
    _validate_speed(config)
    _validate_remedies(config, model_class, require_record(model_class))
    _validate_energy(config)
    # the t intervals' level (DESIGN §3.2)
    _number(config, "compare_confidence", low=0.0, strict=True, high=1.0, strict_high=True)
    _validate_tuning(config)
    if "synthetic_users" in config:
        _validate_synthetic(config)


def _validate_prior_source(config: dict[str, Any]) -> None:
    """``prior_source: truth`` reads the synthetic generator's marginal (DESIGN §2): static priors only."""
    if isinstance(config.get("prior_source"), bool):  # yaml and the command line read true / false as booleans
        raise PopPriorError(f"prior_source must be one of {', '.join(PRIOR_SOURCES)}, got {config['prior_source']!r} "
                            "(a boolean: for the generator's marginal write truth)")
    _choice(config, "prior_source", PRIOR_SOURCES)
    if config["prior_source"] != "truth":
        return
    if "synthetic_users" not in config:
        raise PopPriorError(f"prior_source: truth needs a data set with known truth (--dataset=synthetic), "
                            f"not {config.get('dataset')!r}")
    if config["prior_mode"] != "static":
        raise PopPriorError("prior_source: truth gives one (pooled) marginal: use prior_mode: static")


def _validate_running(config: dict[str, Any], model_class: type | None = None) -> None:
    """RecBole settings the pipeline uses before RecBole checks them (if it ever does)."""
    _number(config, "seed", low=0, high=2**32 - 1, integer=True)  # numpy's and torch's seeds
    _number(config, "epochs", low=1, integer=True)  # 0 or less would save an untrained model
    if "pretrain_epochs" in config:
        _number(config, "pretrain_epochs", low=1, integer=True)
    for key in ("train_batch_size", "eval_batch_size"):
        _number(config, key, low=1, integer=True)
    _number(config, "learning_rate", low=0.0, strict=True)
    _number(config, "weight_decay", low=0.0, allow=(None,))
    _number(config, "stopping_step", low=0, integer=True)
    _number(config, "eval_step", integer=True)  # <= 0: no validation (RecBole)
    _number(config, "MAX_ITEM_LIST_LENGTH", low=1, integer=True, allow=(None,))
    if not isinstance(config.get("tensorboard"), bool):
        raise PopPriorError(f"tensorboard must be True or False, got {config.get('tensorboard')!r}")
    _validate_model_sizes(config, model_class)
    _validate_valid_metric(config)


def _validate_model_sizes(config: dict[str, Any], model_class: type | None) -> None:
    """The model settings RecBole's sequential models share: sizes are positive integers (0 would
    train an empty model, or fail after the data loads), dropout rates lie in [0, 1], and the
    attention heads divide the width they split."""
    for key in ("hidden_size", "embedding_size", "inner_size", "n_layers", "num_layers", "n_heads"):
        if config.get(key) is not None:
            _number(config, key, low=1, integer=True)
    for key, value in config.items():
        # fast_dropout names a kernel, not a rate (a switch, checked in _validate_speed)
        if isinstance(key, str) and "dropout" in key and key not in FAST_KERNEL_KEYS and value is not None:
            rates = value if isinstance(value, (list, tuple)) else [value]
            if not rates or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r <= 1
                                    for r in rates):
                raise PopPriorError(f"{key} must be a dropout rate in [0, 1], got {value!r}")
    # the width the heads split: hidden_size in RecBole's model yamls, except CORE's embedding_size
    width_key = "embedding_size" if model_class is not None and issubclass(model_class, CORE) else "hidden_size"
    heads, width = config.get("n_heads"), config.get(width_key)
    if heads is not None and isinstance(width, int) and width % heads:
        raise PopPriorError(f"n_heads ({heads}) must divide {width_key} ({width}): each head takes "
                            f"{width_key} / n_heads dimensions")


def _validate_valid_metric(config: dict[str, Any]) -> None:
    """``valid_metric: NDCG@20`` needs 20 in ``topk``: RecBole evaluates only the listed cut-offs and
    fails with ``KeyError: 'ndcg@20'`` after the first epoch."""
    metric = str(config.get("valid_metric") or "")
    topk = config.get("topk")
    topk = [topk] if isinstance(topk, int) else list(topk or [])
    name, at, cut = metric.partition("@")
    if at and cut.isdigit() and topk and int(cut) not in topk:
        raise PopPriorError(f"valid_metric {metric} needs {cut} in topk, got topk {topk}: add it, or choose "
                            f"{name}@{topk[0]}")


#: autocast dtypes the trainer takes (``amp_dtype``; None = the device's own default)
AMP_DTYPES = ("bfloat16", "float16")


def _validate_precision(config: dict[str, Any]) -> None:
    """RecBole's ``enable_amp`` / ``enable_scaler`` and the plugin's ``amp_dtype`` (DESIGN §9.2)."""
    for key in ("enable_amp", "enable_scaler"):
        if not isinstance(config.get(key, False), bool):
            raise PopPriorError(f"{key} must be True or False, got {config.get(key)!r}")
    _choice(config, "amp_dtype", (None, *AMP_DTYPES))
    device = config.get("device")
    on_cuda = getattr(device, "type", str(device or "cpu").split(":")[0]) == "cuda"
    dtype = config.get("amp_dtype")
    if not config.get("enable_amp", False):
        return
    if dtype == "float16" and not on_cuda:
        raise PopPriorError("amp_dtype: float16 needs a CUDA device (CPU autocast trains in bfloat16, and float16 "
                            "on CPU is emulated and needs a gradient scaler, which RecBole builds for CUDA only); "
                            "use amp_dtype: bfloat16 or ~")
    if dtype == "bfloat16" and on_cuda and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        raise PopPriorError("amp_dtype: bfloat16 is not supported by this GPU; use amp_dtype: float16 with "
                            "enable_scaler: True")


def _sampled(config: dict[str, Any]) -> bool:  # an explicit K > 0 (``auto`` is decided per model, DESIGN §6.1)
    return config["softmax_negatives"] != AUTO and config["softmax_negatives"] > 0


def _validate_speed(config: dict[str, Any]) -> None:
    """The runtime and fast-kernel keys (DESIGN §11); the optimiser's conditions are :mod:`.optim`'s."""
    for key in ("malloc_tuning", *FAST_KERNEL_KEYS, "fast_adam"):
        if not isinstance(config.get(key), bool):
            raise PopPriorError(f"{key} must be True or False, got {config.get(key)!r}")
    _number(config, "torch_threads", low=1, integer=True, allow=(None,))
    check_optimizer_settings(config)


def _validate_training(config: dict[str, Any]) -> None:
    _number(config, "softmax_negatives", low=0, integer=True, allow=(AUTO,))
    _choice(config, "softmax_sampler", SAMPLERS)
    if _sampled(config) and config.get("popprior_baseline"):
        raise PopPriorError("softmax_negatives > 0 needs the plugin's model (popprior_baseline runs RecBole's own "
                            "full softmax); for a standard model with sampled softmax use prior_tau: 0")


def _validate_remedies(config: dict[str, Any], model_class: type, record: ModelRecord) -> None:
    """The losses and remedies of DESIGN §6.2 and §7, and which of them compose."""
    loss_type, model = config.get("loss_type"), config.get("model")
    negatives = config.get("train_neg_sample_args") or {}
    pairwise = loss_type == "BPR" or record.pairwise == "only"
    if not config.get("popprior_baseline"):  # the plugin's model: the mixin's own check, before any data loads
        check_loss_type(model_class, loss_type)
    if pairwise and negatives.get("distribution", "none") == "none":
        raise PopPriorError(f"{config.get('model')} with a BPR loss needs a sampled negative per row: remove "
                            "train_neg_sample_args: ~ (RecBole's default draws one uniform negative)")
    if pairwise and _sampled(config):
        raise PopPriorError("softmax_negatives > 0 is a sampled softmax; it does not apply to a BPR loss")
    _choice(config, "remedy", (None, *REMEDIES))
    if not isinstance(config.get("directspec_plus"), bool):
        raise PopPriorError(f"directspec_plus must be True or False, got {config.get('directspec_plus')!r}")
    for key in ("directspec_alpha", "directspec_kappa", "adap_tau_rho", "adap_tau_warmup_gap"):
        _number(config, key, low=0.0, strict=True)
    for key in ("directspec_shrink_norm", "ace_lambda", "resn_weight"):
        _number(config, key, low=0.0)
    base = config.get("adap_tau_base")
    if base != "mean" and (isinstance(base, bool) or not isinstance(base, (int, float)) or not 0 <= base <= 1):
        raise PopPriorError(f"adap_tau_base must be mean or a quantile in [0, 1], got {base!r}")
    _number(config, "adap_tau_active_quantile", low=0.0, high=1.0, strict_high=True)
    _number(config, "adap_tau_warmup_epochs", low=0, integer=True)
    _choice(config, "resn_link", LINKS)
    _number(config, "resn_power_iter", low=1, integer=True)
    ace_init, remedy = config.get("ace_init"), config.get("remedy")
    if ace_init is not None and not isinstance(ace_init, str):
        raise PopPriorError(f"ace_init must be a file path, got {ace_init!r}")
    if ace_init is not None and not os.path.isfile(ace_init):
        raise PopPriorError(f"ace_init: no such file: {ace_init}")
    if config.get("popprior_baseline") and (remedy is not None or ace_init is not None):
        raise PopPriorError("remedy and ace_init need the plugin's model (popprior_baseline runs RecBole's own "
                            "class); for a standard model with a remedy use prior_tau: 0")
    if ace_init is not None and isinstance(record.ace_tables, str):
        raise PopPriorError(f"{model} cannot take ace_init: {record.ace_tables}")
    # S3Rec's fine-tune stage loads its table from the pretrained checkpoint (its constructor says so too)
    if ace_init is not None and record.name == "S3Rec" and config.get("train_stage") == "finetune":
        raise PopPriorError(f"{model} cannot take ace_init: in the finetune stage its item table comes from the "
                            "pretrained checkpoint (give ace_init to the pretrain stage)")
    if remedy is None:
        return
    refusal = record.factorised_training_refusal()
    if refusal is not None:
        raise PopPriorError(f"{model} cannot train with remedy: {remedy}: {refusal}")
    if pairwise:
        raise PopPriorError(f"remedy: {remedy} replaces or extends a softmax loss; use loss_type: CE")
    if remedy in ("directspec", "adap_tau"):
        if config.get("prior_tau") != 0:
            raise PopPriorError(f"remedy: {remedy} has its own training logits, which take no prior: set prior_tau: 0 "
                                f"(got {config.get('prior_tau')!r})")
        if _sampled(config):
            raise PopPriorError(f"remedy: {remedy} has its own training loss; it does not take softmax_negatives > 0")
    if remedy == "resn" and _sampled(config) and config["resn_link"] != "identity":
        raise PopPriorError("remedy: resn with softmax_negatives > 0 needs resn_link: identity (the other links build "
                            "the [B, n_items] scores that sampled softmax avoids)")


def _validate_energy(config: dict[str, Any]) -> None:
    _number(config, "energy_permutations", low=0, integer=True, high=10**6)  # 16 bytes a draw per model
    _choice(config, "energy_permutation_stage", ("test", "valid", "always"))
    _number(config, "energy_max_contexts", low=1, integer=True, allow=(None,))
    _number(config, "energy_subspace", low=0.0, strict=True, high=1.0)
    _number(config, "energy_seed", integer=True)
    _number(config, "eval_score_budget_mb", low=0.0, strict=True)
    _choice(config, "eval_score_dtype", ("float32", "bfloat16", "float16"))


def _validate_tuning(config: dict[str, Any]) -> None:
    grid = config.get("tune_beta_grid")
    if not isinstance(grid, (list, tuple)) or not grid or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in grid):
        raise PopPriorError(f"tune_beta_grid must be a non-empty list of finite numbers, got {grid!r}")
    _number(config, "tune_heartbeat_interval", low=0, integer=True)
    _number(config, "tune_grace_period", low=1, integer=True, allow=(None,))
    _number(config, "tune_seed", integer=True, allow=(None,))
    _number(config, "tune_max_failures", low=0, integer=True)
    if not isinstance(config.get("tune_plots"), bool):
        raise PopPriorError(f"tune_plots must be True or False, got {config.get('tune_plots')!r}")
    space = config.get("tune_search_space")
    if space is not None and not isinstance(space, dict):
        raise PopPriorError(f"tune_search_space must map config keys to distributions, got {space!r}")


def _validate_synthetic(config: dict[str, Any]) -> None:
    for key in ("synthetic_users", "synthetic_seq_len"):
        _number(config, key, low=1, integer=True)
    _number(config, "synthetic_items", low=2, integer=True)
    _number(config, "synthetic_rank", low=1, integer=True, high=config["synthetic_items"])
    _number(config, "synthetic_windows", low=1, integer=True, high=config["synthetic_users"])
    _number(config, "synthetic_zipf", low=0.0)
    _number(config, "synthetic_pmi_scale", low=0.0)
    _number(config, "synthetic_drift")
    _number(config, "synthetic_pop_pmi", low=0.0)
    _number(config, "synthetic_seed", integer=True)
