"""Collective operations over a running ``torch.distributed`` process group (docs/DESIGN.md §3).

A leaf module: it imports nothing from the plugin, so the trainer, the evaluator and the
launcher (:mod:`recbole_popprior.distributed`) can all use it without import circles. Outside a
process group of more than one process every function is the identity (or a no-op).

- :func:`all_reduce_array`: the float64 sum over ranks of an array (energy statistics are sums
  over contexts, so their global value is the sum of the ranks' values); :func:`all_reduce_tensor`
  the same for a tensor, on its device (Adap-tau's epoch sums, DESIGN §9.3);
- :func:`map_reduce`: RecBole's ``_map_reduce`` for per-rank metrics, leaving alone the metrics
  that are computed from summed statistics and are therefore already global;
- :func:`all_gather`: one picklable object from every rank;
- :func:`state_digest` / :func:`tensor_digest`: SHA-256 digests of weights and arrays, to check
  that ranks agree.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist

#: a metric class attribute: the prefixes of its result keys that are computed from statistics
#: summed over ranks, hence already global and not to be averaged by RecBole's ``_map_reduce``
REDUCED_ATTR = "ddp_key_prefixes"


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _reduce_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_array(values: Any) -> np.ndarray:
    """The float64 sum over ranks of ``values`` (any array-like; the same shape on every rank).

    Collective: every rank must call it, in the same order. A copy of ``values`` outside a
    process group of several processes.
    """
    array = np.asarray(values, dtype=np.float64)
    if not is_distributed():
        return array.copy()
    buffer = torch.from_numpy(array.reshape(-1).copy()).to(_reduce_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.cpu().numpy().reshape(array.shape)


def world_size() -> int:
    """The number of processes (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_tensor(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``values`` (same shape and dtype on every rank), on ``values``'s device.

    Collective: every rank must call it, in the same order. ``values`` itself outside a process
    group of several processes. The sum is formed on the backend's device (CUDA for nccl).
    """
    if not is_distributed():
        return values
    buffer = values.detach().to(_reduce_device(), copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(values.device)


def all_gather(value: Any) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` (``[value]`` outside a process group)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait for every rank (a no-op outside a process group)."""
    if is_distributed():
        dist.barrier()


def tensor_digest(values: torch.Tensor | np.ndarray) -> str:
    """SHA-256 of an array's bytes."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def state_digest(model: torch.nn.Module) -> str:
    """SHA-256 over a model's state dict (names and values): equal on ranks kept in step."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor_digest(tensor).encode())
    return digest.hexdigest()


def reduced_key_prefixes(metric_classes: Any) -> tuple[str, ...]:
    """Result-key prefixes of the metrics whose values are already global.

    A metric class opts in with ``ddp_key_prefixes = ("pop_",)``: its results are computed from
    statistics summed over ranks, so they hold on every rank, and RecBole's ``_map_reduce`` (a
    sample-weighted mean in float32, rounded to ``metric_decimal_place``) must leave them alone.
    """
    prefixes = set()
    for cls in metric_classes:
        prefixes.update(str(p).lower() for p in getattr(cls, REDUCED_ATTR, ()) or ())
    return tuple(sorted(prefixes))


def split_reduced(result: Mapping[str, Any], prefixes: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split an evaluation result into (keys for RecBole's ``_map_reduce`` to average, keys that
    are already global), keeping the order of ``result`` within each part."""
    averaged: dict[str, Any] = {}
    already_global: dict[str, Any] = {}
    for key, value in result.items():
        (already_global if prefixes and str(key).lower().startswith(prefixes) else averaged)[key] = value
    return averaged, already_global


def map_reduce(trainer_map_reduce: Callable[[dict, int], dict], result: Mapping[str, Any], num_sample: int,
               prefixes: tuple[str, ...]) -> dict[str, Any]:
    """RecBole's ``_map_reduce`` for the per-rank metrics only; already-global ones kept as they are.

    ``trainer_map_reduce`` is RecBole's bound ``Trainer._map_reduce`` (collective, so every rank
    calls it, with the same keys). Returns the result in its original key order.
    """
    averaged, already_global = split_reduced(result, prefixes)
    merged = trainer_map_reduce(averaged, num_sample) if averaged else {}
    return {key: merged[key] if key in merged else already_global[key] for key in result}
