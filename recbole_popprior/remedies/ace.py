"""ACE: reshaping a given item table with a ridge-regularised linear autoencoder before training
(Lee, Kim & Lee, "ACE: Anisotropy-Controllable Embedding for LLM-enhanced Sequential
Recommendation", SIGIR 2026, arXiv 2605.29322; no public code; DESIGN.md §7.3).

Our reconstruction of the closed form (the paper's text was not available to us): with the
table ``X [n, D]`` (real items) and its SVD ``X = U diag(s) V^T``, the linear autoencoder over
items ``min_B ||X^T - X^T B||^2 + lam ||B||^2`` has ``B = X (X^T X + lam I)^{-1} X^T = Phi Phi^T``
with

    Phi = X (X^T X + lam I)^{-1/2} = U diag(s / sqrt(s^2 + lam)) V^T

(ridge ZCA whitening). ``lam = 0`` flattens the spectrum (every singular value 1); as ``lam``
grows the shape of the spectrum tends back to ``s`` (scaled by ``1/sqrt(lam)``). The
initial item table is ``Phi`` in its top-``dim`` principal coordinates:
``U_k diag(s_k / sqrt(s_k^2 + lam))``, ``k <= dim``. Training then proceeds normally.
"""

from __future__ import annotations

import math
import os
import zipfile
from typing import IO, Sequence

import numpy as np
import torch

from recbole_popprior.errors import PopPriorError

#: directions with ``s_k^2 <= RANK_TOL * s_1^2`` count as absent (the table's rank is too small)
RANK_TOL = 1e-10


def ace_reshape(table: torch.Tensor | np.ndarray, lam: float, dim: int) -> torch.Tensor:
    """``U_k diag(s_k / sqrt(s_k^2 + lam))`` for the top ``dim`` singular directions of ``table [n, D]``.

    ``table`` holds real items only (no padding row). Computed from the smaller Gram matrix in
    float64; each column's sign is fixed (largest entry positive) so the output is deterministic.
    """
    if lam < 0:
        raise PopPriorError(f"ace_lambda must be >= 0, got {lam}")
    X = torch.as_tensor(np.asarray(table) if not isinstance(table, torch.Tensor) else table).double()
    n, D = X.shape
    if dim > min(n, D):
        raise PopPriorError(f"ace_init: a table of {n} items x {D} columns cannot give {dim} dimensions")
    gram = X.T @ X if D <= n else X @ X.T
    s2, vecs = torch.linalg.eigh(gram)
    s2, vecs = s2.flip(0)[:dim].clamp_min(0.0), vecs.flip(1)[:, :dim]
    if s2[-1] <= RANK_TOL * s2[0]:
        raise PopPriorError(f"ace_init: the table has rank below the model's {dim} dimensions")
    s = s2.sqrt()
    U = X @ vecs / s if D <= n else vecs  # left singular vectors, [n, dim]
    init = U * (s / torch.sqrt(s2 + lam))
    flip = torch.sign(init.gather(0, init.abs().argmax(dim=0, keepdim=True)))
    return init * flip


def ace_load_table(path: str | os.PathLike, item_tokens: Sequence[str]) -> np.ndarray:
    """The table of ``path`` aligned to the dataset's internal item ids: ``[n_items, D]``, row 0 = 0.

    Accepted files (never unpickled):
      - ``.npy`` 2-D float, in internal id order: ``n_items`` rows (row 0 = padding, ignored) or
        ``n_items - 1`` rows (real items 1..n-1);
      - keyed by item token: ``.npz`` with arrays ``tokens`` [m] and ``embeddings`` [m, D], or a
        structured ``.npy`` with fields ``token`` and ``embedding``. Extra tokens are ignored.
    ``item_tokens`` is RecBole's ``dataset.field2id_token[item_field]`` (``[PAD]`` first).
    """
    path = os.fspath(path)
    tokens, emb = _read_table_file(path)
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.number):
        raise PopPriorError(f"ace_init: {path} must hold a 2-D numeric table, got shape {emb.shape}")
    emb = emb.astype(np.float64, copy=False)
    if not np.isfinite(emb).all():
        raise PopPriorError(f"ace_init: {path} contains NaN or infinite values")
    n_items = len(item_tokens)
    out = np.zeros((n_items, emb.shape[1]))
    if tokens is None:
        if emb.shape[0] == n_items:
            out[1:] = emb[1:]
        elif emb.shape[0] == n_items - 1:
            out[1:] = emb
        else:
            raise PopPriorError(f"ace_init: {path} has {emb.shape[0]} rows; the dataset has {n_items - 1} items "
                                f"(give {n_items - 1} rows, {n_items} with padding first, or key rows by token)")
        return out
    tokens = np.asarray(tokens).astype(str)
    if tokens.shape != (emb.shape[0],):
        raise PopPriorError(f"ace_init: {path} has {tokens.size} tokens for {emb.shape[0]} rows")
    row_of = {tok: r for r, tok in enumerate(tokens.tolist())}
    if len(row_of) != len(tokens):
        raise PopPriorError(f"ace_init: {path} repeats item tokens")
    wanted = [str(t) for t in item_tokens[1:]]
    missing = [t for t in wanted if t not in row_of]
    if missing:
        raise PopPriorError(f"ace_init: {path} lacks {len(missing)} of the dataset's items (e.g. {missing[:3]})")
    out[1:] = emb[[row_of[t] for t in wanted]]
    return out


def check_ace_file(path: str | os.PathLike) -> None:
    """The checks of :func:`ace_load_table` that need no dataset, from the arrays' headers only (no
    data is read): one line for a missing, corrupt or pickled file, or one whose header claims
    more data than it holds. Run before the data loads."""
    _read_table_file(os.fspath(path), headers_only=True)


def _read_table_file(path: str, headers_only: bool = False) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(tokens or None, table)`` of an ``ace_init`` file, never unpickled: each array's ``.npy``
    header is read and checked against the bytes that follow before any data is (``np.load``
    would allocate what a header claims, and reads object arrays lazily, failing later)."""
    if not os.path.isfile(path):
        raise PopPriorError(f"ace_init: no such file: {path}")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = {name[:-4]: name for name in archive.namelist() if name.endswith(".npy")}
                if not {"tokens", "embeddings"} <= set(members):
                    raise PopPriorError(f"ace_init: {path} needs arrays 'tokens' and 'embeddings', "
                                        f"has {sorted(members)}")
                arrays = []
                for key in ("tokens", "embeddings"):
                    info = archive.getinfo(members[key])
                    with archive.open(info) as member:
                        arrays.append(_read_npy(member, info.file_size, f"{path} ({key})", headers_only))
                return arrays[0], arrays[1]
        with open(path, "rb") as handle:
            loaded = _read_npy(handle, os.path.getsize(path), path, headers_only)
    except PopPriorError:
        raise
    except (ValueError, OSError, EOFError, MemoryError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PopPriorError(f"ace_init: cannot read {path} as .npy/.npz without pickle ({reason[:200]})") from None
    if loaded is None or loaded.dtype.names is None:
        return None, loaded
    if not {"token", "embedding"} <= set(loaded.dtype.names):
        raise PopPriorError(f"ace_init: {path} needs fields 'token' and 'embedding'")
    return loaded["token"], loaded["embedding"]


def _read_npy(stream: IO[bytes], size: int, where: str, headers_only: bool) -> np.ndarray | None:
    """One ``.npy`` array from ``stream`` (``size`` bytes in all), after checking its header."""
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject:
        raise PopPriorError(f"ace_init: {where} holds Python objects, which cannot be read without pickle: refused")
    needed = math.prod(shape) * dtype.itemsize
    header = 6 + 2 + (2 if version == (1, 0) else 4)  # magic, version, header length (its text is counted below)
    if needed > size - header:
        raise PopPriorError(f"ace_init: {where} claims a {'x'.join(map(str, shape))} array of {dtype} "
                            f"({needed:,} bytes), more than the file holds ({size:,} bytes)")
    if headers_only:
        return None
    data = stream.read(needed)
    if len(data) != needed:
        raise PopPriorError(f"ace_init: {where} is truncated ({len(data):,} of {needed:,} bytes)")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


def ace_init_table(path: str | os.PathLike, item_tokens: Sequence[str], lam: float, dim: int) -> torch.Tensor:
    """The reshaped initial item table ``[n_items, dim]`` (float64, row 0 = padding = 0) for ``ace_init``."""
    table = ace_load_table(path, item_tokens)
    init = ace_reshape(table[1:], lam, dim)
    return torch.cat([init.new_zeros(1, dim), init])
