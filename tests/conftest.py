"""Shared fixtures: tiny generated datasets and tiny model settings, so the suite stays fast."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import recbole_popprior  # noqa: E402,F401  (applies the compat shims, registers metrics)


def write_inter(path: Path, rows: list[tuple], header: str = "user_id:token\titem_id:token\ttimestamp:float") -> Path:
    """Write a RecBole ``.inter`` atomic file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(header + "\n")
        for row in rows:
            handle.write("\t".join(str(v) for v in row) + "\n")
    return path


def tiny_rows(n_users: int = 60, n_items: int = 30, length: int = 10, seed: int = 0, zipf: float = 1.0) -> list[tuple]:
    """Sequences with Zipf-popular items (item tokens 1..n_items) and increasing timestamps."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1) ** zipf
    p /= p.sum()
    rows = []
    for u in range(1, n_users + 1):
        items = rng.choice(n_items, size=length, p=p) + 1
        rows += [(u, int(i), 1000 * u + t) for t, i in enumerate(items)]
    return rows


def tiny_config(data_path: Path | str, **overrides) -> dict:
    """Small, fast RecBole settings for tests (CPU, no progress bars, tiny models)."""
    config = {
        "data_path": str(data_path),
        "epochs": 1,
        "train_batch_size": 64,
        "eval_batch_size": 256,
        "hidden_size": 8,
        "embedding_size": 8,
        "inner_size": 16,
        "n_layers": 1,
        "n_heads": 1,
        "MAX_ITEM_LIST_LENGTH": 8,
        "show_progress": False,
        "state": "WARNING",
        "metrics": ["Recall", "MRR", "NDCG"],
        "topk": [10],
        "valid_metric": "MRR@10",
        "gpu_id": "",
        "seed": 2020,
        "reproducibility": True,
    }
    config.update(overrides)
    return config


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest single-threaded; on a busy 2-core machine extra threads thrash."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data_path holding dataset ``tiny`` (60 users x 10 steps over 30 items)."""
    root = tmp_path_factory.mktemp("data")
    write_inter(root / "tiny" / "tiny.inter", tiny_rows())
    return root


@pytest.fixture()
def out_dir(tmp_path) -> Path:
    return tmp_path / "saved"
