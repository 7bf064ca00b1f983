"""Datasets and dataloaders: RecBole's, with the plugin's fast atomic-file loader and, for
sequential models, the lean sequence data (``sequence_data: lean``, DESIGN.md §5.2).

Unlike ``recbole.data.create_dataset`` / ``data_preparation``, nothing here unpickles a
saved dataset or dataloader: datasets are always built from the atomic files.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any

from recbole.data.dataloader import TrainDataLoader
from recbole.data.dataset import KnowledgeBasedDataset
from recbole.data.utils import create_samplers, get_dataloader
from recbole.sampler import KGSampler
from recbole.utils import ModelType

from recbole_popprior.data.atomic_files import AtomicFileGuard, RecBoleReaderGuard
from recbole_popprior.data.fast_loader import FastLoadMixin, _Unsupported
from recbole_popprior.data.lean_dataset import LeanSequentialDataset, lean_unsupported, missing_time_field
from recbole_popprior.data.loaders import LeanTrainDataLoader
from recbole_popprior.data.synthetic import ensure_synthetic_dataset
from recbole_popprior.errors import PopPriorError
from recbole_popprior.model.registry import recbole_model_name

_TYPE2CLASS = {
    ModelType.GENERAL: "Dataset",
    ModelType.SEQUENTIAL: "SequentialDataset",
    ModelType.CONTEXT: "Dataset",
    ModelType.KNOWLEDGE: "KnowledgeBasedDataset",
    ModelType.TRADITIONAL: "Dataset",
    ModelType.DECISIONTREE: "Dataset",
}


@functools.lru_cache(maxsize=None)
def _loader_class(base: type, fast: bool) -> type:
    # the reader guard sits right above RecBole's reader, which the fast loader falls back to
    bases = (AtomicFileGuard, FastLoadMixin, RecBoleReaderGuard, base) if fast else (
        AtomicFileGuard, RecBoleReaderGuard, base)
    return type(base.__name__, bases, {"__module__": __name__})


def _recbole_class(config: Any) -> type:
    module = importlib.import_module("recbole.data.dataset")
    # by the record's name: a user's subclass of GRU4RecKG needs RecBole's GRU4RecKGDataset
    return getattr(module, recbole_model_name(config) + "Dataset", None) or getattr(module, _TYPE2CLASS[config["MODEL_TYPE"]])


def dataset_class(config: Any) -> type:
    """RecBole's dataset class for the model, with the fast loader unless ``fast_loader: False``
    and, either way, one-line errors for malformed atomic files (:mod:`.atomic_files`)."""
    return _loader_class(_recbole_class(config), bool(config["fast_loader"]))


def check_dataset_files(config: Any) -> None:
    """Stop with one line when an atomic file the dataset needs is missing: the ``.inter`` file,
    the ``.kg`` and ``.link`` files of knowledge-graph models (KSR, GRU4RecKG), and one file per
    ``additional_feat_suffix``."""
    if config["dataset"] == "synthetic":
        ensure_synthetic_dataset(config)
    folder, name = config["data_path"], config["dataset"]
    inter = os.path.join(folder, f"{name}.inter")
    if not os.path.isfile(inter) and not config["benchmark_filename"]:
        hint = config["dataset_hint"] if "dataset_hint" in config else None
        raise PopPriorError(hint or f"dataset {name!r} not found: expected the atomic file {inter} "
                            "(set --data_path=DIR, where DIR/<dataset>/<dataset>.inter exists)")
    if issubclass(_recbole_class(config), KnowledgeBasedDataset):
        missing = [f"{name}.{s}" for s in ("kg", "link") if not os.path.isfile(os.path.join(folder, f"{name}.{s}"))]
        if missing:
            raise PopPriorError(f"{config['model']} needs the knowledge-graph atomic files {name}.kg and "
                                f"{name}.link in {folder}; missing: {', '.join(missing)}")
        load_col = config["load_col"]
        if isinstance(load_col, dict) and not {"kg", "link"} <= set(load_col):
            raise PopPriorError(f"{config['model']} reads the knowledge graph: load_col needs kg and link entries, "
                                "e.g. {inter: [user_id, item_id, timestamp], kg: [head_id, relation_id, tail_id], "
                                "link: [item_id, entity_id]}")
    for suffix in config["additional_feat_suffix"] or []:
        path = os.path.join(folder, f"{name}.{suffix}")
        if not os.path.isfile(path):
            raise PopPriorError(f"additional_feat_suffix lists {suffix!r}, but {path} does not exist")


def _check_time_field(config: Any, dataset) -> None:
    """Sequential data is ordered by time: RecBole's augmentation fails on a dataset without its
    time field much later, with an error about an interaction's fields."""
    if config["MODEL_TYPE"] == ModelType.SEQUENTIAL and dataset.time_field not in dataset.field2type:
        raise missing_time_field(dataset.time_field)


def create_dataset(config: Any):
    """Build the dataset from its atomic files (never from a pickle).

    Sequential models get :class:`~recbole_popprior.data.lean_dataset.LeanSequentialDataset`
    unless ``sequence_data: recbole``, or where it cannot promise RecBole's exact data: then
    RecBole's class, with one INFO line saying why.
    """
    check_dataset_files(config)
    if config["MODEL_TYPE"] == ModelType.SEQUENTIAL and config["sequence_data"] == "lean":
        reason = lean_unsupported(config)
        if reason is None:
            try:
                return LeanSequentialDataset(config)
            except _Unsupported as why:
                reason = str(why)
        logging.getLogger().info(f"sequence_data: lean is not used ({reason}); using RecBole's sequential data")
    try:
        dataset = dataset_class(config)(config)
    except ValueError as exc:
        if not str(exc).startswith("Some feat is empty"):
            raise
        raise PopPriorError(f"dataset {config['dataset']!r}: no interaction is left after filtering "
                            f"(user_inter_num_interval={config['user_inter_num_interval']!r}, "
                            f"item_inter_num_interval={config['item_inter_num_interval']!r})") from None
    _check_time_field(config, dataset)
    return dataset


def check_splits(config: Any, dataset, built_datasets) -> None:
    """One line for splits RecBole would train or evaluate on anyway: an empty train, valid or test
    split (a run that tests nothing, or fails in torch's sampler), and a ``topk`` larger than the
    candidates an evaluation ranks (torch's ``topk`` fails after the first epoch)."""
    name, split = config["dataset"], (config["eval_args"] or {}).get("split") or {}
    sizes = [len(built) for built in built_datasets]
    mode = split.get("LS") if isinstance(split, dict) else None
    ratios = split.get("RS") if isinstance(split, dict) else None
    if mode is not None:  # leave-one-out: the parts its mode fills (RecBole's leave_one_mode)
        wanted = {"valid_and_test": ("train", "valid", "test"), "valid_only": ("train", "valid"),
                  "test_only": ("train", "test")}.get(mode, ("train",))
    elif isinstance(ratios, (list, tuple)):  # ratios: the parts given a share
        wanted = tuple(part for part, share in zip(("train", "valid", "test"), ratios) if share)
    else:
        wanted = ("train",)
    # interactions a user needs for a first example in the part: train, then test, then valid
    need = {"train": 2, "test": 3, "valid": 4 if mode == "valid_and_test" else 3}
    for part, size in zip(("train", "valid", "test"), sizes):
        if size == 0 and part in wanted:
            hint = (f"; leave-one-out gives a user's first example to train, then one to test, then one to "
                    f"valid: a user needs at least {need[part]} interactions for a {part} example"
                    if mode is not None and config["MODEL_TYPE"] == ModelType.SEQUENTIAL else "")
            raise PopPriorError(f"dataset {name!r}: the {part} split is empty ({'/'.join(map(str, sizes))} "
                                f"train/valid/test examples){hint}")
    largest = max(config["topk"] or [0])
    for phase in ("valid", "test"):
        mode = ((config["eval_args"] or {}).get("mode") or {}).get(phase)
        sampled = (config[f"{phase}_neg_sample_args"] or {}).get("sample_num")
        candidates = dataset.item_num - 1 if mode == "full" else (
            sampled + 1 if isinstance(sampled, int) and not isinstance(sampled, bool) else None)
        if candidates is not None and largest > candidates:
            raise PopPriorError(f"topk {config['topk']} asks for {largest} items, but the {phase} evaluation ranks "
                                f"{candidates} ({'the catalogue' if mode == 'full' else mode}); lower topk")


def data_preparation(config: Any, dataset):
    """Split and wrap in RecBole dataloaders, as ``recbole.data.data_preparation`` without pickles."""
    built_datasets = dataset.build()
    check_splits(config, dataset, built_datasets)
    train_dataset, valid_dataset, test_dataset = built_datasets
    train_sampler, valid_sampler, test_sampler = create_samplers(config, dataset, built_datasets)
    if config["MODEL_TYPE"] != ModelType.KNOWLEDGE:
        loader = get_dataloader(config, "train")
        if isinstance(dataset, LeanSequentialDataset) and loader is TrainDataLoader and config["single_spec"] and len(train_dataset):
            loader = LeanTrainDataLoader
        train_data = loader(config, train_dataset, train_sampler, shuffle=config["shuffle"])
    else:
        kg_sampler = KGSampler(dataset, config["train_neg_sample_args"]["distribution"],
                               config["train_neg_sample_args"]["alpha"])
        train_data = get_dataloader(config, "train")(config, train_dataset, train_sampler, kg_sampler, shuffle=True)
    valid_data = get_dataloader(config, "valid")(config, valid_dataset, valid_sampler, shuffle=False)
    test_data = get_dataloader(config, "test")(config, test_dataset, test_sampler, shuffle=False)
    return train_data, valid_data, test_data
