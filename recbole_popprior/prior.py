"""The popularity prior ``log p_hat(i)`` (docs/DESIGN.md §2).

``p_hat(i) = (N_i + alpha) / (N + alpha * n)`` over the training split's targets, with
padding item 0 masked (``-inf``, never counted in ``n``). Windowed priors split the
training targets into ``T`` windows by time or by equal counts; each window gets its
own smoothed prior.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _as_long(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.long).reshape(-1)
    return torch.as_tensor(np.asarray(values), dtype=torch.long).reshape(-1)


def estimate_log_prior(item_ids, n_items: int, alpha: float = 1.0) -> torch.Tensor:
    """Smoothed log prior of shape ``[n_items]`` from training target ids (DESIGN §2).

    ``log p_hat(i) = log(N_i + alpha) - log(N + alpha * (n_items - 1))`` for ``i >= 1``;
    index 0 (padding) is ``-inf`` and padding targets are not counted.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if n_items < 2:
        raise ValueError(f"n_items must be >= 2 (padding plus one item), got {n_items}")
    ids = _as_long(item_ids)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_items):
        raise ValueError(f"item ids must lie in [0, {n_items}), got range "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    counts = torch.bincount(ids, minlength=n_items).to(torch.float64)
    counts[0] = 0.0
    total = counts.sum() + alpha * (n_items - 1)
    log_prior = torch.log(counts + alpha) - torch.log(total)
    log_prior[0] = -torch.inf
    return log_prior.to(torch.float32)


@dataclass
class WindowedPrior:
    """Per-window priors: ``log_prior[t]`` for targets with ``edges[t-1] <= time < edges[t]``."""

    log_prior: torch.Tensor  # [T, n_items], column 0 = -inf
    edges: torch.Tensor  # [T - 1] float64 time boundaries (window t starts at edges[t-1])

    def window_of(self, times) -> torch.Tensor:
        """Window index of each timestamp (the same rule that counted the targets)."""
        times = torch.as_tensor(times, dtype=torch.float64, device=self.edges.device)
        return torch.searchsorted(self.edges, times, right=True)


def window_edges(times, n_windows: int, by: str = "time") -> torch.Tensor:
    """``T - 1`` boundaries splitting ``times`` into equal time spans or equal counts."""
    times = torch.as_tensor(np.asarray(times), dtype=torch.float64).reshape(-1)
    if n_windows < 1:
        raise ValueError(f"n_windows must be >= 1, got {n_windows}")
    if times.numel() == 0 or n_windows == 1:
        return torch.empty(0, dtype=torch.float64)
    if by == "time":
        low, high = float(times.min()), float(times.max())
        return torch.linspace(low, high, n_windows + 1, dtype=torch.float64)[1:-1]
    if by == "count":
        ordered = torch.sort(times).values
        cuts = [(len(ordered) * t) // n_windows for t in range(1, n_windows)]
        return ordered[torch.as_tensor(cuts)]
    raise ValueError(f"window split must be 'time' or 'count', got {by!r}")


def estimate_windowed_log_prior(item_ids, times, n_items: int, n_windows: int,
                                by: str = "time", alpha: float = 1.0) -> WindowedPrior:
    """One smoothed prior per window of the training targets (DESIGN §2, windowed)."""
    ids = _as_long(item_ids)
    edges = window_edges(times, n_windows, by)
    prior = WindowedPrior(torch.empty(0), edges)
    window = prior.window_of(torch.as_tensor(np.asarray(times), dtype=torch.float64).reshape(-1))
    prior.log_prior = torch.stack(
        [estimate_log_prior(ids[window == t], n_items, alpha) for t in range(n_windows)])
    return prior
