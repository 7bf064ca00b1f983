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
from recbole.data.utils import create_samplers, get_dataloader
from recbole.sampler import KGSampler
from recbole.utils import ModelType

from recbole_popprior.data.fast_loader import FastLoadMixin, _Unsupported
from recbole_popprior.data.lean_dataset import LeanSequentialDataset, lean_unsupported
from recbole_popprior.data.loaders import LeanTrainDataLoader
from recbole_popprior.data.synthetic import ensure_synthetic_dataset
from recbole_popprior.errors import PopPriorError

_TYPE2CLASS = {
    ModelType.GENERAL: "Dataset",
    ModelType.SEQUENTIAL: "SequentialDataset",
    ModelType.CONTEXT: "Dataset",
    ModelType.KNOWLEDGE: "KnowledgeBasedDataset",
    ModelType.TRADITIONAL: "Dataset",
    ModelType.DECISIONTREE: "Dataset",
}


@functools.lru_cache(maxsize=None)
def _fast_class(base: type) -> type:
    return type(base.__name__, (FastLoadMixin, base), {"__module__": __name__})


def dataset_class(config: Any) -> type:
    """RecBole's dataset class for the model, with the fast loader unless ``fast_loader: False``."""
    module = importlib.import_module("recbole.data.dataset")
    base = getattr(module, config["model"] + "Dataset", None) or getattr(module, _TYPE2CLASS[config["MODEL_TYPE"]])
    return _fast_class(base) if config["fast_loader"] else base


def check_dataset_files(config: Any) -> None:
    """Stop with one line when the dataset's ``.inter`` atomic file is missing."""
    if config["dataset"] == "synthetic":
        ensure_synthetic_dataset(config)
    inter = os.path.join(config["data_path"], f'{config["dataset"]}.inter')
    if not os.path.isfile(inter) and not config["benchmark_filename"]:
        hint = config["dataset_hint"] if "dataset_hint" in config else None
        raise PopPriorError(hint or f"dataset {config['dataset']!r} not found: expected the atomic file {inter} "
                            "(set --data_path=DIR, where DIR/<dataset>/<dataset>.inter exists)")


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
    return dataset_class(config)(config)


def data_preparation(config: Any, dataset):
    """Split and wrap in RecBole dataloaders, as ``recbole.data.data_preparation`` without pickles."""
    built_datasets = dataset.build()
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
