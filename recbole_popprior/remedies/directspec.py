"""DirectSpec / DirectSpec+: the spectrum-balancing filter (Peng et al., arXiv 2406.12032; DESIGN.md §7.1).

On a set of rows ``X [m, d]`` (the batch contexts ``H``, or item rows of ``E``), rows first
normalised to unit length (``X^``):

    DirectSpec   X' = X^ - (alpha / m) X^ X^T X^       (singular values s -> s (1 - alpha s^2 / m))
    DirectSpec+  X' = X^ - alpha softmax(kappa X^ X^T) X^  (row softmax; the released code's form,
                                                       where ``kappa`` is its ``--tau``)
    shrink       x'' = shrink_norm * ||x'|| * x'        (skipped when shrink_norm == 0)

The training objective of the released code uses positive pairs only: the filter itself
supplies the repulsion that negatives would (:func:`directspec_loss`). Serving scores the
unfiltered factors ``H E^T``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def directspec_filter(X: torch.Tensor, alpha: float, kappa: float = 3.0, shrink_norm: float = 0.0,
                      plus: bool = True, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the DirectSpec(+) filter to the rows of ``X [m, d]`` (DESIGN §7.1).

    ``plus=True`` is DirectSpec+ (``softmax(kappa * cos)``, as released); ``plus=False`` is the plain
    cubic filter ``X^ - (alpha/m) X^ X^T X^``, which maps every singular value ``s`` of ``X^`` to
    ``s (1 - alpha s^2 / m)`` and keeps the singular vectors. Differentiable in ``X``.
    ``weights`` [m] (0 or 1): the rows with weight 0 take no part (they are zeroed, and masked out
    of the softmax), exactly as if they were not in ``X``; their own output rows are 0.
    """
    Xn = F.normalize(X, dim=-1)
    if weights is not None:
        Xn = Xn * weights.to(Xn.dtype)[:, None]
    sim = Xn @ Xn.T
    if plus:
        scaled = kappa * sim
        if weights is not None:  # -1e9, not -inf: a row without any kept column stays finite
            scaled = scaled if scaled.dtype in (torch.float32, torch.float64) else scaled.float()
            scaled = scaled.masked_fill(weights[None, :] <= 0, -1e9)
        out = Xn - alpha * torch.softmax(scaled, dim=1).to(Xn.dtype) @ Xn
    else:
        m = X.shape[0] if weights is None else weights.sum().clamp_min(1)
        out = Xn - (alpha / m) * sim @ Xn
    if shrink_norm:
        out = out * (out.norm(dim=1, keepdim=True) * shrink_norm)
    return out


def directspec_loss(H: torch.Tensor, E: torch.Tensor, pos_items: torch.Tensor, alpha: float, kappa: float = 3.0,
                    shrink_norm: float = 0.0, plus: bool = True, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The released DirectSpec objective with contexts as users: ``mean_c -log sigmoid(h'_c . e'_c)``.

    ``h'`` filters the batch contexts among themselves, ``e'`` filters the rows ``E[pos_items]``
    among themselves (repeats included, as the released code samples positives with replacement).
    No negatives: the filter is what keeps the embeddings from collapsing (DESIGN §7.1).
    ``weights`` [B] (0 or 1): the pairs with weight 0 are left out of both filters and of the mean.
    """
    h = directspec_filter(H, alpha, kappa, shrink_norm, plus, weights)
    e = directspec_filter(E[pos_items], alpha, kappa, shrink_norm, plus, weights)
    rows = -F.logsigmoid((h * e).sum(dim=1))
    if weights is None:
        return rows.mean()
    weights = weights.to(rows.dtype)
    return (rows * weights).sum() / weights.sum()


def directspec_logits(H: torch.Tensor, E: torch.Tensor, alpha: float, kappa: float = 3.0, shrink_norm: float = 0.0,
                      plus: bool = True, chunk_size: int = 4096) -> torch.Tensor:
    """Our CE extension: logits ``H' E'^T`` with ``H'`` filtered over the batch and ``E'`` over all real
    items (padding excluded; its column is ``-inf``). ``O(n^2 d)`` per call: small item tables only.

    The item filter is computed in row chunks so memory stays ``O(chunk_size * n)``; each output row
    depends on the whole table, exactly as :func:`directspec_filter` on ``E[1:]``.
    """
    h = directspec_filter(H, alpha, kappa, shrink_norm, plus)
    items = F.normalize(E[1:], dim=-1)
    n = items.shape[0]
    parts = []
    for start in range(0, n, chunk_size):
        block = items[start:start + chunk_size]
        sim = block @ items.T
        weight = torch.softmax(kappa * sim, dim=1) if plus else sim / n
        parts.append(block - alpha * weight @ items)
    e = torch.cat(parts)
    if shrink_norm:
        e = e * (e.norm(dim=1, keepdim=True) * shrink_norm)
    logits = h @ e.T
    return torch.cat([logits.new_full((logits.shape[0], 1), -torch.inf), logits], dim=1)
