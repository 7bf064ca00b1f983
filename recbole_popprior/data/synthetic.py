"""Synthetic sequences with known truth: next item ~ softmax(PMI(c, i) + log p(i)) (DESIGN §1).

The generated process
---------------------
Items are the raw tokens ``1..n`` (RecBole later remaps them; 0 is its padding id).
The context ``c`` of a step is the **previous item** (a first-order Markov chain), so a
sequential model that sees the whole history can represent the optimum exactly.

* ``p(i)`` is Zipf: ``p(i) ∝ i^(-zipf)``; item ``1`` is the most popular.
* ``S = scale * U V^T`` is a random rank-``r`` score matrix (``U, V ~ N(0, 1/r)``), shared by all windows.
  With ``pop_pmi = g > 0``, ``S`` gains ``g z_c (log p(i) - mean) / sd`` (``z_c ~ N(0, 1)``): PMI that
  prefers popular items in some contexts and avoids them in others (rank ``r + 1``).
* The joint of two consecutive items, ``J(c, i) = x_c exp(S[c, i]) y_i``, is Sinkhorn-scaled
  so that **both** of its marginals equal ``p``.  The transition is ``p(i | c) = J(c, i) / p(c)``.

Hence ``p`` is the stationary distribution of the chain, every sequence starts from ``p``,
and at every step the item marginal is exactly ``p``.  The returned

    PMI(c, i) = log p(i | c) - log p(i) = S[c, i] + a_c + b_i

is the true pointwise mutual information of consecutive items under the generated process.
It is normalised both ways: ``sum_i p(i) exp(PMI(c, i)) = 1`` for every ``c`` (exact, rows of the
transition sum to one) and ``sum_c p(c) exp(PMI(c, i)) = 1`` for every ``i`` (to Sinkhorn
tolerance, 1e-12).  Its rank is at most ``r + 2``; after centring over contexts and items it is
at most ``r``.  The next-item logit ``PMI(c, i) + log p(i)`` is therefore a dot product
``h_c . e_i`` with ``d >= r + 1`` (plus a per-context constant that the softmax ignores).

Time-varying marginals (``windows = T > 1``)
--------------------------------------------
Window ``t`` has its own marginal ``log p_t = log p + drift * (t / (T - 1) - 1/2) * g`` (``g`` a fixed
standard-normal item vector, renormalised) and its own Sinkhorn-scaled chain built on the same ``S``.
Each user lives in one window (users are split into ``T`` contiguous, near-equal blocks), draws its
first item from ``p_t`` and all its timestamps lie in ``[t * WINDOW_SPAN, (t + 1) * WINDOW_SPAN)``,
so its items have marginal exactly ``p_t`` and its transitions are exactly ``p_t(i) exp(PMI_t(c, i))``.
The pooled ``log_p`` / ``pmi`` of :class:`SyntheticTruth` are then the true mixture quantities.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from recbole_popprior.config import _validate_synthetic, dataset_config_file
from recbole_popprior.errors import PopPriorError
from recbole_popprior.prior_source import raw_item_ids, truth_file
from recbole_popprior.utils import atomic_write

WINDOW_SPAN = 1_000_000
"""Width of one time window in timestamp units; window ``t`` covers ``[t * span, (t + 1) * span)``."""

INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
_GENERATOR_VERSION = 1  # bump when the sampling procedure changes, so cached files regenerate


@dataclass(frozen=True)
class SyntheticSettings:
    """Generator settings; the yaml keys are ``synthetic_<field>``, with their defaults in
    ``dataset_configs/synthetic.yaml`` and their checks in ``config._validate``."""

    users: int
    items: int
    seq_len: int
    zipf: float
    rank: int
    pmi_scale: float
    windows: int
    drift: float
    seed: int
    pop_pmi: float = 0.0  # last, with a default: truth files written before it load as 0

    def __post_init__(self) -> None:
        _validate_synthetic({f"synthetic_{k}": v for k, v in dataclasses.asdict(self).items()})

    @classmethod
    def from_config(cls, config: Any) -> "SyntheticSettings":
        """Read the ``synthetic_*`` keys from a RecBole ``Config`` (or any mapping)."""
        missing = [f"synthetic_{f.name}" for f in dataclasses.fields(cls) if _config_get(config, f"synthetic_{f.name}") is None]
        if missing:
            raise PopPriorError(f"synthetic: settings missing: {', '.join(missing)} (see dataset_configs/synthetic.yaml)")
        return cls(**{f.name: _config_get(config, f"synthetic_{f.name}") for f in dataclasses.fields(cls)})

    @classmethod
    def defaults(cls, **overrides: Any) -> "SyntheticSettings":
        """The defaults of ``dataset_configs/synthetic.yaml``, with ``overrides`` (``users=...``)."""
        with open(dataset_config_file("synthetic"), encoding="utf-8") as handle:
            values = {k[len("synthetic_"):]: v for k, v in yaml.safe_load(handle).items() if k.startswith("synthetic_")}
        return cls(**{**values, **overrides})

    def digest(self) -> str:
        """Stable hash of the settings (and generator version), stored next to the files."""
        payload = json.dumps({"version": _GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class SyntheticTruth:
    """Ground truth of one generated data set, indexed by **raw** item id ``i`` at position ``i - 1``.

    Attributes:
        log_p: ``(n,)`` true item marginal (pooled over windows).
        pmi: ``(n, n)`` true ``PMI(c, i)``, row = previous item ``c``, column = next item ``i`` (pooled).
        log_p_windows: ``(T, n)`` per-window true log-marginals.
        pmi_windows: ``(T, n, n)`` per-window true PMI.
        window_of_user: ``(users,)`` window of each user (raw user id ``u + 1`` at position ``u``).
        items: ``(users, seq_len)`` the generated raw item ids.
        context_of_step: ``(users, seq_len)`` raw previous item of each step, ``0`` for the first step.
        timestamps: ``(users, seq_len)`` timestamps as written to the atomic file.
        settings: the :class:`SyntheticSettings` used.
    """

    log_p: np.ndarray
    pmi: np.ndarray
    log_p_windows: np.ndarray
    pmi_windows: np.ndarray
    window_of_user: np.ndarray
    items: np.ndarray
    context_of_step: np.ndarray
    timestamps: np.ndarray
    settings: SyntheticSettings

    @property
    def log_transition(self) -> np.ndarray:
        """``(n, n)`` pooled ``log p(i | c) = PMI(c, i) + log p(i)``."""
        return self.pmi + self.log_p[None, :]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the truth as ``.npz`` (atomically)."""
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        with atomic_write(path, "wb") as handle:
            np.savez_compressed(handle, settings=json.dumps(dataclasses.asdict(self.settings)), **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SyntheticTruth":
        """Read a truth ``.npz`` written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != "settings"}
            settings = SyntheticSettings(**json.loads(str(data["settings"])))
        return cls(settings=settings, **arrays)


def zipf_log_p(n: int, exponent: float) -> np.ndarray:
    """``log p(i)`` for ``p(i) ∝ i^(-exponent)``, ``i = 1..n``."""
    log_w = -exponent * np.log(np.arange(1, n + 1, dtype=np.float64))
    return log_w - np.logaddexp.reduce(log_w)


def sinkhorn_pmi(S: np.ndarray, log_p: np.ndarray, tol: float = 1e-12, max_iter: int = 100_000) -> np.ndarray:
    """True PMI of the joint ``x_c exp(S) y_i`` scaled to have both marginals ``p`` (log-domain Sinkhorn).

    Returns ``PMI`` with rows normalised exactly: ``logsumexp_i(log_p + PMI[c]) = 0``.
    """
    log_x = np.zeros_like(log_p)
    log_y = np.zeros_like(log_p)
    for _ in range(max_iter):
        log_x = log_p - np.logaddexp.reduce(S + log_y[None, :], axis=1)
        log_y = log_p - np.logaddexp.reduce(S + log_x[:, None], axis=0)
        log_rows = np.logaddexp.reduce(S + log_x[:, None] + log_y[None, :], axis=1)
        if np.max(np.abs(np.exp(log_rows) - np.exp(log_p))) < tol:
            break
    else:  # pragma: no cover - Sinkhorn on a positive kernel always converges
        raise PopPriorError("synthetic: Sinkhorn scaling did not converge; lower synthetic_pmi_scale")
    log_transition = S + log_y[None, :]
    log_transition -= np.logaddexp.reduce(log_transition, axis=1, keepdims=True)
    return log_transition - log_p[None, :]


def _popularity_preference(settings: SyntheticSettings) -> np.ndarray:
    """``z_c * (log p(i) - mean) / sd``: a context-specific preference for popular items (``z_c ~ N(0, 1)``).

    PMI that is correlated with popularity, context by context; the Sinkhorn scaling keeps the
    marginals at ``p``. Drawn from its own generator, so ``pop_pmi = 0`` leaves the data unchanged.
    """
    base = zipf_log_p(settings.items, settings.zipf)
    centred = base - base.mean()
    scale = centred.std() or 1.0
    z = np.random.default_rng([settings.seed, 1]).standard_normal(settings.items)
    return np.outer(z, centred / scale)


def _window_log_p(settings: SyntheticSettings, rng: np.random.Generator) -> np.ndarray:
    base = zipf_log_p(settings.items, settings.zipf)
    if settings.windows == 1:
        return base[None, :]
    g = rng.standard_normal(settings.items)
    rows = []
    for t in range(settings.windows):
        shifted = base + settings.drift * (t / (settings.windows - 1) - 0.5) * g
        rows.append(shifted - np.logaddexp.reduce(shifted))
    return np.stack(rows)


def _sample_rows(log_cond: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one column per requested row of a row-stochastic matrix (0-based indices), vectorised.

    Row ``k``'s CDF is shifted by ``k`` so that all rows form one increasing array for ``searchsorted``.
    """
    cdf = np.cumsum(np.exp(log_cond), axis=1)
    cdf /= cdf[:, -1:]
    n_rows, n = cdf.shape
    flat = (cdf + np.arange(n_rows)[:, None]).ravel()
    pos = np.searchsorted(flat, rows + rng.random(rows.shape[0]), side="right")
    return np.minimum(pos - rows * n, n - 1)


def generate(settings: SyntheticSettings) -> SyntheticTruth:
    """Generate sequences and their truth (deterministic for ``settings.seed``)."""
    rng = np.random.default_rng(settings.seed)
    n, r, T = settings.items, settings.rank, settings.windows
    U = rng.standard_normal((n, r)) / np.sqrt(r)
    V = rng.standard_normal((n, r)) / np.sqrt(r)
    S = settings.pmi_scale * (U @ V.T)
    if settings.pop_pmi:
        S = S + settings.pop_pmi * _popularity_preference(settings)
    log_p_windows = _window_log_p(settings, rng)
    pmi_windows = np.stack([sinkhorn_pmi(S, log_p_windows[t]) for t in range(T)])

    window_of_user = (np.arange(settings.users) * T) // settings.users
    items0 = np.empty((settings.users, settings.seq_len), dtype=np.int64)  # 0-based while sampling
    for t in range(T):
        users = np.flatnonzero(window_of_user == t)
        log_trans = pmi_windows[t] + log_p_windows[t][None, :]
        items0[users, 0] = _sample_rows(log_p_windows[t][None, :], np.zeros(users.size, dtype=np.int64), rng)
        for k in range(1, settings.seq_len):
            items0[users, k] = _sample_rows(log_trans, items0[users, k - 1], rng)

    timestamps = np.empty_like(items0)
    for t in range(T):
        users = np.flatnonzero(window_of_user == t)
        room = WINDOW_SPAN - settings.seq_len
        offsets = (np.arange(users.size) * room) // max(users.size - 1, 1)
        timestamps[users] = t * WINDOW_SPAN + offsets[:, None] + np.arange(settings.seq_len)[None, :]

    weights = np.bincount(window_of_user, minlength=T) / settings.users
    log_w = np.log(weights)[:, None]
    log_p = np.logaddexp.reduce(log_w + log_p_windows, axis=0)
    # pooled p(c, i) = sum_t w_t p_t(c) p_t(i | c)
    log_joint = np.logaddexp.reduce(
        log_w[:, :, None] + log_p_windows[:, :, None] + pmi_windows + log_p_windows[:, None, :], axis=0
    )
    pmi = log_joint - log_p[:, None] - log_p[None, :]

    items = items0 + 1
    context = np.zeros_like(items)
    context[:, 1:] = items[:, :-1]
    return SyntheticTruth(
        log_p=log_p,
        pmi=pmi,
        log_p_windows=log_p_windows,
        pmi_windows=pmi_windows,
        window_of_user=window_of_user,
        items=items,
        context_of_step=context,
        timestamps=timestamps,
        settings=settings,
    )


def write_atomic_files(truth: SyntheticTruth, directory: str | os.PathLike, name: str = "synthetic") -> Path:
    """Write ``<directory>/<name>.inter`` (RecBole atomic format) and ``<name>.truth.npz``; return the .inter path."""
    directory = Path(directory)
    users, seq_len = truth.items.shape
    user_ids = np.repeat(np.arange(1, users + 1), seq_len)
    lines = [INTER_HEADER]
    lines.extend(
        f"{u}\t{i}\t{t}"
        for u, i, t in zip(user_ids.tolist(), truth.items.ravel().tolist(), truth.timestamps.ravel().tolist())
    )
    inter_path = directory / f"{name}.inter"
    with atomic_write(inter_path, "w") as handle:
        handle.write("\n".join(lines))
        handle.write("\n")
    truth.save(truth_file(directory, name))
    return inter_path


def ensure_synthetic_dataset(config: Any) -> Path:
    """(Re)generate ``<config["data_path"]>/<dataset>.inter`` when missing or when the settings changed.

    The settings hash is kept in ``<dataset>.settings.json`` next to the file; returns the .inter path.
    """
    data_path = _config_get(config, "data_path")
    if not data_path:
        raise PopPriorError("synthetic: config has no data_path")
    name = _config_get(config, "dataset") or "synthetic"
    settings = SyntheticSettings.from_config(config)
    directory = Path(data_path)
    inter_path = directory / f"{name}.inter"
    stamp_path = directory / f"{name}.settings.json"
    digest = settings.digest()
    if inter_path.exists() and truth_file(directory, name).exists() and _read_digest(stamp_path) == digest:
        return inter_path
    logging.getLogger().info(f"generating synthetic dataset in {directory} ({settings})")
    write_atomic_files(generate(settings), directory, name)
    with atomic_write(stamp_path, "w") as handle:
        json.dump({"digest": digest, "settings": dataclasses.asdict(settings)}, handle, indent=2)
        handle.write("\n")
    return inter_path


def load_truth(config_or_dir: Any, name: str = "synthetic") -> SyntheticTruth:
    """Load the truth saved next to the atomic file (``config["data_path"]`` or a directory)."""
    if isinstance(config_or_dir, (str, os.PathLike)):
        directory = Path(config_or_dir)
    else:
        directory = Path(_config_get(config_or_dir, "data_path"))
        name = _config_get(config_or_dir, "dataset") or name
    path = truth_file(directory, name)
    if not path.exists():
        raise PopPriorError(f"synthetic: no truth file at {path}")
    return SyntheticTruth.load(path)


def truth_in_recbole_ids(truth: SyntheticTruth, dataset: Any, item_field: str | None = None) -> dict[str, np.ndarray]:
    """Re-index the truth by RecBole's internal item ids (via ``dataset.field2token_id``).

    Returns ``log_p`` ``(n_items,)``, ``pmi`` ``(n_items, n_items)`` and ``log_p_windows`` ``(T, n_items)``,
    where ``n_items = dataset.item_num`` counts padding id 0; padding rows/columns, and items that do
    not occur in the data set, are ``nan``.  ``raw_of_internal`` maps internal id -> raw id (0 = none).
    """
    raw_of_internal = raw_item_ids(dataset, item_field)
    n_items = raw_of_internal.shape[0]
    known = raw_of_internal > 0
    idx = raw_of_internal[known] - 1

    log_p = np.full(n_items, np.nan)
    log_p[known] = truth.log_p[idx]
    pmi = np.full((n_items, n_items), np.nan)
    pmi[np.ix_(known, known)] = truth.pmi[np.ix_(idx, idx)]
    log_p_windows = np.full((truth.log_p_windows.shape[0], n_items), np.nan)
    log_p_windows[:, known] = truth.log_p_windows[:, idx]
    return {"log_p": log_p, "pmi": pmi, "log_p_windows": log_p_windows, "raw_of_internal": raw_of_internal}


def _config_get(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    try:
        return config[key]
    except (KeyError, TypeError):
        return None


def _read_digest(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def feature_and_kg_files(n_items: int, rng: np.random.Generator) -> dict[str, list[str]]:
    """The lines of a generated log's side files, by suffix: ``.item`` (a ``token_seq`` feature for
    the feature-aware models) and the knowledge graph KSR and GRU4RecKG read (``.kg``, ``.link``,
    ``.ent`` and ``.rel`` with 8-d pretrained embeddings), over items ``1..n_items``."""
    items = range(1, n_items + 1)
    vec = lambda: " ".join(f"{v:.4f}" for v in rng.normal(size=8))  # noqa: E731
    return {
        "item": ["item_id:token\tclass:token_seq"] + [f"{i}\tc{i % 4} c{(i * 7) % 5}" for i in items],
        "link": ["item_id:token\tentity_id:token"] + [f"{i}\te{i}" for i in items],
        "kg": ["head_id:token\trelation_id:token\ttail_id:token"] + [f"e{i}\tr{i % 2}\tx{i % 3}" for i in items]
        + [f"e{i}\tr2\te{i % n_items + 1}" for i in items],
        "ent": ["ent_id:token\tent_emb:float_seq"]
        + [f"{e}\t{vec()}" for e in [f"e{i}" for i in items] + ["x0", "x1", "x2"]],
        "rel": ["rel_id:token\trel_emb:float_seq"] + [f"r{r}\t{vec()}" for r in range(3)],
    }
