"""The optimiser the trainer builds for ``fast_adam`` and ``fast_sparse_items`` (docs/DESIGN.md §11.2).

RecBole builds ``optim.Adam(params, lr, weight_decay)`` in ``Trainer._build_optimizer``; on a CPU
that is torch's for-loop Adam, about ten element-wise passes over each parameter. The trainer
mixin asks :func:`build_optimizer` first:

- ``fast_adam``: the same Adam (or AdamW) with ``fused=True``, one pass per parameter. The
  update is Adam's; the float rounding differs (within a few 1e-7 of the for-loop update).
- ``fast_sparse_items``: the item table (marked by
  :func:`~recbole_popprior.model.fast_kernels.mark_sparse_items`) gets a sparse gradient and is
  updated by torch's ``SparseAdam``; every other parameter by Adam as above.
  **Lazy Adam is not Adam**: a row absent from the batch keeps its moments and its value (Adam
  would decay the moments and still move the row with its old momentum), and the bias correction
  counts steps, not the row's own updates. On a long-tailed catalogue most rows are absent from
  most batches, so the two optimisers follow different paths; the known-truth check
  (tests/test_fast_kernels.py) shows the separated model still recovers the prior with it.

Both optimisers are stepped as one :class:`SplitOptimizer`, whose state dict holds each part's.
"""

from __future__ import annotations

from logging import getLogger
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from recbole_popprior.errors import PopPriorError
from recbole_popprior.model.fast_kernels import sparse_item_parameters

#: RecBole learners that ``fast_adam`` fuses, and the torch class of each
FUSED_LEARNERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class SplitOptimizer:
    """Several torch optimisers over disjoint parameters, stepped, zeroed and saved as one.

    It offers what RecBole's trainer and torch's ``GradScaler`` use of an optimiser:
    ``step``, ``zero_grad``, ``param_groups``, ``state_dict`` and ``load_state_dict``.
    """

    def __init__(self, parts: dict[str, torch.optim.Optimizer]):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts.values() for group in part.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for part in self.parts.values() for p, s in part.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for name, part in self.parts.items():
            if name == "sparse":
                _check_sparse(part)
            part.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.parts):
            raise PopPriorError(f"the checkpoint's optimiser has parts {sorted(state)}, this run's "
                                f"{sorted(self.parts)} (fast_sparse_items differs?)")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])

    def __repr__(self) -> str:
        return "SplitOptimizer(" + ", ".join(f"{n}={type(p).__name__}" for n, p in self.parts.items()) + ")"


def _check_sparse(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and not p.grad.is_sparse:
                raise PopPriorError("fast_sparse_items: the item table received a dense gradient (the model or "
                                    "its loss uses the whole table, not rows of it); set fast_sparse_items: False")


def _params(params: Iterable) -> Iterator[nn.Parameter]:
    for entry in params:
        if isinstance(entry, dict):
            yield from entry["params"]
        else:
            yield entry


def check_optimizer_settings(config: Any) -> None:
    """One :class:`PopPriorError` line for settings lazy Adam cannot follow (``config._validate`` calls it)."""
    if not config.get("fast_sparse_items"):
        return
    learner = str(config.get("learner", "adam")).lower()
    if learner not in FUSED_LEARNERS:
        raise PopPriorError(f"fast_sparse_items updates the item table with lazy Adam: it needs learner adam, "
                            f"got {config.get('learner')!r}")
    if config.get("weight_decay"):
        raise PopPriorError("fast_sparse_items: SparseAdam has no weight decay; set weight_decay: 0")
    if config.get("clip_grad_norm"):
        raise PopPriorError("fast_sparse_items: clip_grad_norm does not take the item table's sparse gradient; "
                            "remove clip_grad_norm or set fast_sparse_items: False")


def build_optimizer(config, model: nn.Module, params: Iterable | None = None, learner: str | None = None,
                    learning_rate: float | None = None, weight_decay: float | None = None):
    """The optimiser for ``fast_adam`` / ``fast_sparse_items``, or ``None`` for RecBole's own.

    The arguments are those of RecBole's ``Trainer._build_optimizer`` (``None``: the config's).
    """
    fused = bool(config["fast_adam"]) if "fast_adam" in config else False
    learner = (learner or config["learner"]).lower()
    params = list(_params(model.parameters() if params is None else params))
    marked = {id(p) for p in sparse_item_parameters(model)}
    sparse = [p for p in params if id(p) in marked]
    if not sparse and not (fused and learner in FUSED_LEARNERS):
        if fused:
            getLogger().info(f"fast_adam applies to learner adam or adamw; {learner} is RecBole's")
        return None
    lr = float(config["learning_rate"] if learning_rate is None else learning_rate)
    decay = float((config["weight_decay"] if weight_decay is None else weight_decay) or 0.0)
    if learner not in FUSED_LEARNERS:
        raise PopPriorError(f"fast_sparse_items needs learner adam (lazy Adam for the item table), got {learner}")
    dense = [p for p in params if id(p) not in marked]
    options = {"fused": True} if fused else {}
    parts: dict[str, torch.optim.Optimizer] = {}
    if dense:
        parts["dense"] = FUSED_LEARNERS[learner](dense, lr=lr, weight_decay=decay, **options)
    if not sparse:
        return parts["dense"]
    if decay:
        raise PopPriorError("fast_sparse_items: SparseAdam has no weight decay; set weight_decay: 0")
    parts["sparse"] = torch.optim.SparseAdam(sparse, lr=lr)
    return SplitOptimizer(parts)


__all__ = ["build_optimizer", "check_optimizer_settings", "SplitOptimizer", "FUSED_LEARNERS"]
