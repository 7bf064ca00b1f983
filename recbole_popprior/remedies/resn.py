"""ReSN: a penalty on the spectral norm of the score matrix (Lin et al., WSDM 2025, "How Do
Recommendation Models Amplify Popularity Bias? An Analysis from the Spectral Perspective",
code github.com/LIN452/ReSN; DESIGN.md §7.4).

With ``Y = link(H E[1:]^T)`` the batch score matrix (the released code uses ``link = sigmoid``)
the top right singular vector of ``Y`` is close to the predicted item popularity ``Y^T 1``. The
released penalty is one power-iteration step from the all-ones vector, without gradient
through the direction:

    q = stopgrad(Y^T 1 / ||Y^T 1||),    penalty = ||Y q||^2 / B   (<= ||Y||_2^2 / B)

``n_power_iter > 1`` refines ``q`` towards the top right singular vector; at convergence the
penalty is ``sigma_1(Y)^2 / B`` and its gradient ``2 sigma_1 u_1 v_1^T / B`` is that of
``sigma_1^2 / B``. Serving is untouched.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from recbole_popprior.errors import PopPriorError

LINKS = ("sigmoid", "identity", "softmax")


def _autocast_off(device_type: str):
    """No autocast within the block (a no-op context where the device has no autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_iters(n_power_iter: int) -> None:
    if int(n_power_iter) != n_power_iter or n_power_iter < 1:
        raise PopPriorError(f"resn power iterations must be an integer >= 1, got {n_power_iter!r}")


def _power_direction(Y: torch.Tensor, n_power_iter: int) -> torch.Tensor:
    with torch.no_grad():
        q = F.normalize(Y.sum(dim=0), dim=0)
        for _ in range(n_power_iter - 1):
            q = F.normalize(Y.T @ (Y @ q), dim=0)
    return q


def resn_penalty_from_scores(Y: torch.Tensor, n_power_iter: int = 1) -> torch.Tensor:
    """``||Y q||^2 / B`` for an already linked score matrix ``Y [B, n]`` (real items only)."""
    _check_iters(n_power_iter)
    q = _power_direction(Y, n_power_iter)
    return (Y @ q).pow(2).sum() / Y.shape[0]


def resn_penalty(H: torch.Tensor, E: torch.Tensor, link: str = "sigmoid", n_power_iter: int = 1,
                 logits: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The ReSN penalty of the batch (DESIGN §7.4). ``E`` has padding in row 0, which is left out.

    ``link``: ``sigmoid`` (released), ``softmax`` (the CE model's own probabilities) or
    ``identity`` (raw logits ``H E^T``, computed from the factors in ``O(n d)`` without an
    ``[B, n]`` matrix). ``logits`` [B, n_items] reuses the logits the loss already built.
    ``weights`` [B] (0 or 1): rows with weight 0 are zero rows of ``Y`` and ``B`` counts the others.
    """
    if link not in LINKS:
        raise PopPriorError(f"resn link must be one of {', '.join(LINKS)}, got {link!r}")
    _check_iters(n_power_iter)
    if link == "identity" and logits is None:
        # Y = H E^T is never built: Y^T 1 = E (H^T 1), Y q = H (E^T q), Y^T Y q = E (H^T (H (E^T q))).
        # In float32 with autocast off: H^T 1 sums B rows, and E (H^T 1) easily passes fp16's 65504
        with _autocast_off(H.device.type):
            H32, items = _at_least_float32(H), _at_least_float32(E[1:])
            rows = H.shape[0]
            if weights is not None:
                H32, rows = H32 * weights.to(H32.dtype)[:, None], weights.sum()
            with torch.no_grad():
                q = F.normalize(items @ H32.sum(dim=0), dim=0)
                for _ in range(n_power_iter - 1):
                    q = F.normalize(items @ (H32.T @ (H32 @ (items.T @ q))), dim=0)
            return (H32 @ (items.T @ q)).pow(2).sum() / rows
    Z = (H @ E[1:].T) if logits is None else logits[:, 1:]
    Z = _at_least_float32(Z)  # ||Y q||^2 reaches B * n: past fp16's range
    if link == "sigmoid":
        Y = torch.sigmoid(Z)
    elif link == "softmax":
        Y = torch.softmax(Z, dim=1)
    else:
        Y = Z
    if weights is None:
        return resn_penalty_from_scores(Y, n_power_iter)
    return resn_penalty_from_scores(Y * weights.to(Y.dtype)[:, None], n_power_iter) * Y.shape[0] / weights.sum()
