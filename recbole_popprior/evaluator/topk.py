"""Full-sort top-k and RecBole's hit rows without a ``[rows, n_items]`` temporary (docs/DESIGN.md §3.3).

RecBole's collector runs ``torch.topk`` over every score row (twice when both ``rec.items`` and
``rec.topk`` are needed) and builds an int ``pos_matrix`` of ``[rows, n_items]`` to read the
hits and count the positives. Here:

- :func:`exact_topk` returns exactly ``torch.topk(scores, k, dim=-1).indices``, ties included,
  in two stages on the CPU: the maximum of every block of :data:`BLOCK` columns, the ``k + 1``
  best blocks, and ``torch.topk`` over their columns. When the ``k + 1`` best values of a row are
  strictly decreasing the top-k of the row is unique, so any exact method returns it; a row with
  a tie (or a NaN) among them is handed to ``torch.topk`` itself, which then decides the ties as
  RecBole's call does. The proof is in DESIGN §3.3.
- :func:`topk_hits` builds RecBole's ``rec.topk`` rows (hit flags at the top-k positions, then the
  number of distinct positives of the row) from the top-k indices and the positive pairs.
"""

from __future__ import annotations

import torch

#: columns per block of the first stage (chosen by benchmarks/bench_eval_step.py on a 2-core CPU)
BLOCK = 512


def exact_topk(scores: torch.Tensor, k: int, block: int | None = None) -> torch.Tensor:
    """``torch.topk(scores, k, dim=-1).indices`` of a ``[rows, n]`` score matrix, ties included.

    The two-stage path runs on the CPU for a row-contiguous matrix of at least ``4 (k + 1)``
    blocks of ``block`` (default :data:`BLOCK`) columns; otherwise (and for every row with a tie among its ``k + 1`` best values) it is
    ``torch.topk`` itself.
    """
    block = block or BLOCK
    rows, n = scores.shape
    full = n // block
    if (scores.device.type != "cpu" or scores.stride(1) != 1 or full < 4 * (k + 1) or rows == 0
            or scores.dtype.is_complex):
        return torch.topk(scores, k, dim=-1).indices
    body = scores[:, : full * block].view(rows, full, block)
    best_blocks = torch.topk(body.amax(dim=-1), k + 1, dim=-1).indices  # [rows, k + 1]
    row_ids = torch.arange(rows, device=scores.device).unsqueeze(1)
    candidates = body[row_ids, best_blocks].reshape(rows, (k + 1) * block)
    tail = scores[:, full * block:]  # the last, partial block is always a candidate
    if tail.shape[1]:
        candidates = torch.cat([candidates, tail], dim=1)
    values, where = torch.topk(candidates, k + 1, dim=-1)
    in_body = where < (k + 1) * block
    block_of = best_blocks.gather(1, torch.where(in_body, where // block, 0))
    columns = torch.where(in_body, block_of * block + where % block, full * block + where - (k + 1) * block)
    top = columns[:, :k].contiguous()
    unique = (values[:, :-1] > values[:, 1:]).all(dim=1)  # False for a tie or a NaN
    if not bool(unique.all()):
        for row in (~unique).nonzero().flatten().tolist():
            top[row] = torch.topk(scores[row], k).indices
    return top


def candidate_topk(scores: torch.Tensor, m: int, block: int | None = None) -> torch.Tensor:
    """``[rows, m]`` column indices of the ``m`` best scores of each row, ties broken anyway: the
    first stage of the low-precision scoring, whose candidates are re-scored in float32."""
    block = block or BLOCK
    rows, n = scores.shape
    full = n // block
    if scores.device.type != "cpu" or scores.stride(1) != 1 or full < 4 * m or rows == 0:
        return torch.topk(scores, min(m, n), dim=-1).indices
    body = scores[:, : full * block].view(rows, full, block)
    best_blocks = torch.topk(body.amax(dim=-1), m, dim=-1).indices
    row_ids = torch.arange(rows, device=scores.device).unsqueeze(1)
    candidates = body[row_ids, best_blocks].reshape(rows, m * block)
    tail = scores[:, full * block:]
    if tail.shape[1]:
        candidates = torch.cat([candidates, tail], dim=1)
    where = torch.topk(candidates, m, dim=-1).indices
    in_body = where < m * block
    block_of = best_blocks.gather(1, torch.where(in_body, where // block, 0))
    return torch.where(in_body, block_of * block + where % block, full * block + where - m * block)


def topk_hits(top: torch.Tensor, positive_u: torch.Tensor, positive_i: torch.Tensor,
              n_items: int) -> torch.Tensor:
    """RecBole's ``rec.topk`` rows for one score matrix: ``[rows, k + 1]`` int64.

    Column ``j < k`` is 1 when item ``top[r, j]`` is a positive of row ``r``; the last column is
    the number of distinct positives of row ``r`` (RecBole sets ``pos_matrix[u, i] = 1``, so a
    repeated pair counts once). The dtype is RecBole's: its int32 hits concatenated with the
    int64 row sums.
    """
    rows = top.shape[0]
    device = top.device
    keys = torch.unique(positive_u.to(device=device, dtype=torch.int64) * n_items
                        + positive_i.to(device=device, dtype=torch.int64))
    pos_len = torch.bincount(keys // n_items, minlength=rows)[:rows]
    row_keys = torch.arange(rows, device=device, dtype=torch.int64).unsqueeze(1) * n_items + top
    hits = torch.isin(row_keys, keys)
    return torch.cat((hits.to(torch.int64), pos_len.unsqueeze(1)), dim=1)


__all__ = ["BLOCK", "candidate_topk", "exact_topk", "topk_hits"]
