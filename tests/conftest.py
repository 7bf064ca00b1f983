"""Shared fixtures: tiny generated datasets and tiny model settings, so the suite stays fast."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import recbole_popprior.config  # noqa: E402,F401  (applies the compat shims, registers the metrics)


def free_port() -> int:
    """A free TCP port on localhost (for test process groups)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def synthetic_settings(tmp_path, **overrides) -> dict:
    """Tiny synthetic-data settings for comparisons and sweeps (several evaluation batches)."""
    settings = {
        "data_path": str(tmp_path / "data"),
        "synthetic_users": 120,
        "synthetic_items": 20,
        "synthetic_seq_len": 12,
        "synthetic_pmi_scale": 1.5,
        "epochs": 2,
        "hidden_size": 8,
        "inner_size": 16,
        "n_layers": 1,
        "n_heads": 1,
        "MAX_ITEM_LIST_LENGTH": 5,
        "train_batch_size": 256,
        "eval_batch_size": 64,  # several evaluation batches
        "show_progress": False,
        "state": "WARNING",
        "gpu_id": "",
        "seed": 7,
        "energy_permutations": 199,
    }
    settings.update(overrides)
    return settings


def theory_settings(tmp_path, **overrides) -> dict:
    """The known-truth setting of tests/test_theory.py: next item ~ softmax(PMI + log p), 30 items,
    800 users, PMI of rank 4; SASRec with d = 32 >= rank + 2 can represent the optimum exactly."""
    settings = {
        "data_path": str(tmp_path / "data"),
        "synthetic_users": 800, "synthetic_items": 30, "synthetic_seq_len": 30,
        "synthetic_rank": 4, "synthetic_pmi_scale": 2.0, "synthetic_seed": 2024,
        "hidden_size": 32, "inner_size": 64, "n_layers": 1, "n_heads": 1,
        "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0,
        "MAX_ITEM_LIST_LENGTH": 5, "train_batch_size": 512, "learning_rate": 0.005,
        "epochs": 12, "eval_step": 5, "stopping_step": 10,
        "show_progress": False, "state": "WARNING", "gpu_id": "", "seed": 2020,
        "metrics": ["Recall", "MRR", "NDCG"], "valid_metric": "MRR@10",
    }
    settings.update(overrides)
    return settings


def numpy_log_prior(targets: np.ndarray, n_items: int, alpha: float = 1.0) -> np.ndarray:
    """docs/DESIGN.md §2 written out in numpy: the reference for ``estimate_log_prior``."""
    counts = np.bincount(targets, minlength=n_items).astype(np.float64)
    counts[0] = 0.0
    out = np.log(counts + alpha) - np.log(counts.sum() + alpha * (n_items - 1))
    out[0] = -np.inf
    return out


def window_of(times: np.ndarray, train_times: np.ndarray, n_windows: int, by: str = "time") -> np.ndarray:
    """DESIGN §2 by hand: each time's window, equal time spans (or equal counts) over the training
    targets' times; the reference for the windowed prior's edges."""
    if by == "time":
        edges = np.linspace(train_times.min(), train_times.max(), n_windows + 1)[1:-1]
    else:
        ordered = np.sort(train_times)
        edges = ordered[[(len(ordered) * t) // n_windows for t in range(1, n_windows)]]
    return np.searchsorted(edges, times, side="right")


@dataclass
class LoaderContexts:
    """A test's own pass over an evaluation loader (independent of the collector)."""

    H: np.ndarray  # [m, d] contexts, float64
    E: np.ndarray  # [n_items, d] item table, float64
    ids: Any  # torch.Tensor [m, 3 + L]: user, item sequence, length, target of every context
    last_items: np.ndarray  # [m] the last history item of every context


def loader_contexts(model, loader) -> LoaderContexts:
    """``H`` and ``E`` of a factorised model over every batch of ``loader`` (docs/DESIGN.md §3)."""
    import torch

    from recbole_popprior.model.factors import factors

    model.eval()
    Hs, ids = [], []
    with torch.no_grad():
        for batch in loader:
            interaction = batch[0]
            H, E = factors(model, interaction)
            Hs.append(H.double())
            ids.append(torch.cat([interaction[model.USER_ID][:, None], interaction[model.ITEM_SEQ],
                                  interaction[model.ITEM_SEQ_LEN][:, None], interaction[model.ITEM_ID][:, None]], 1))
    ids = torch.cat(ids)
    seq, length = ids[:, 1:-2], ids[:, -2]
    last = seq[torch.arange(len(seq)), length - 1].numpy()
    return LoaderContexts(torch.cat(Hs).numpy(), E.detach().double().numpy(), ids, last)


def pmi_spearman(arm) -> tuple[float, float]:
    """The known-truth measure of a trained arm on the synthetic data: Spearman correlation of its
    centred dot products ``h.e`` with the true centred PMI, and with the popularity-laden
    ``PMI + log p`` (a separated model should track the first better than the second)."""
    from scipy import stats

    from recbole_popprior.data.synthetic import load_truth, truth_in_recbole_ids

    sep = loader_contexts(arm.pipe.model, arm.pipe.test_data)
    truth = truth_in_recbole_ids(load_truth(arm.pipe.config), arm.pipe.dataset)
    pmi = truth["pmi"][sep.last_items][:, 1:]
    scores = sep.H @ sep.E[1:].T

    def centred(A: np.ndarray) -> np.ndarray:
        return (A - A.mean(axis=1, keepdims=True)).ravel()

    rho = stats.spearmanr(centred(scores), centred(pmi))[0]
    rho_pop = stats.spearmanr(centred(scores), centred(pmi + truth["log_p"][1:]))[0]
    return float(rho), float(rho_pop)


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
