"""Distributed training through RecBole's DDP path, on one node or several (issue 6).

Three launchers end in the same per-process worker, :func:`run_worker`:

    python run_recbole_popprior.py ... --nproc=K [--world_size=W --ip=A --port=P --group_offset=O]
        spawns K workers on this node (RecBole's own DDP arguments: ``world_size`` counts
        processes over all nodes, ``group_offset`` is the global rank of this node's first
        process, ``ip``/``port`` is the rendezvous on the node running rank 0);
    torchrun --nproc_per_node=K ... run_recbole_popprior.py ...
        each process is a worker; ``LOCAL_RANK``, ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
        ``MASTER_PORT`` map onto RecBole's ``local_rank``, ``offset`` (= RANK - LOCAL_RANK),
        ``world_size``, ``ip``, ``port`` and ``nproc``.

Each worker builds its ``Config`` exactly once (that joins the process group, see
``compat.init_distributed``) and then runs the plugin's quick start with these additions,
which keep DESIGN.md §2-3 exact across ranks:

- one run folder for all ranks: global rank 0 picks it and broadcasts it;
- evaluation shards without ``DistributedSampler``'s padding, which repeats contexts and
  would count them twice in the energy statistics;
- a check that every rank holds the whole training split and computed the same prior
  (RecBole shards batches with a sampler, never the dataset);
- a barrier after ``fit`` (the best checkpoint is on disk before any rank loads it) and a
  record of every rank's trained-weight digest (equal when DDP kept the replicas in step);
- ``results.json`` written by global rank 0 only, with a ``distributed`` section.

Energy metrics are computed once from statistics summed over ranks (DESIGN §3), never by
averaging per-rank ratios: :func:`all_reduce_array` is the ``fn`` the collector's
``reduce_energy_stats`` takes, :func:`all_reduce_stats` sums a ``ContextStats`` /
``ScoreStats`` directly, and :func:`map_reduce` keeps those already-global results out of
RecBole's sample-weighted ``_map_reduce``.
"""

from __future__ import annotations

import hashlib
import os
import socket
from logging import getLogger
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from recbole_popprior.errors import PopPriorError

#: a metric class attribute: the prefixes of its result keys that are computed from statistics
#: summed over ranks, hence already global and not to be averaged by RecBole's ``_map_reduce``
REDUCED_ATTR = "ddp_key_prefixes"
#: the statistics fields :func:`all_reduce_stats` sums by default (``ContextStats``)
STATS_FIELDS = ("G", "hsum", "m")
#: the same for ``ScoreStats``, the streaming fallback for scores that are not ``H E^T``
SCORE_STATS_FIELDS = ("m", "total", "s_sum", "s_sq", "null_sq", "sub_sq")


# --- launch settings ----------------------------------------------------------------------
def _as_int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PopPriorError(f"{name} must be an integer, got {value!r}") from None


def _check_port(port: Any) -> str:
    number = _as_int(port, "port")
    if not 0 < number < 65536:
        raise PopPriorError(f"port must be in 1..65535, got {port!r}")
    return str(number)


def world_from_torchrun(environ: Mapping[str, str]) -> dict[str, Any]:
    """RecBole's DDP config keys from torchrun's environment (``LOCAL_RANK`` must be set)."""
    local_rank = _as_int(environ["LOCAL_RANK"], "LOCAL_RANK")
    rank = _as_int(environ.get("RANK", local_rank), "RANK")
    world_size = _as_int(environ.get("WORLD_SIZE", 1), "WORLD_SIZE")
    nproc = _as_int(environ.get("LOCAL_WORLD_SIZE", world_size), "LOCAL_WORLD_SIZE")
    if not 0 <= local_rank < nproc or not 0 <= rank < world_size or rank < local_rank:
        raise PopPriorError(f"inconsistent torchrun environment: LOCAL_RANK={local_rank}, RANK={rank}, "
                            f"LOCAL_WORLD_SIZE={nproc}, WORLD_SIZE={world_size}")
    settings = {
        "local_rank": local_rank, "offset": rank - local_rank, "world_size": world_size, "nproc": nproc,
        "ip": environ.get("MASTER_ADDR", "127.0.0.1"), "port": _check_port(environ.get("MASTER_PORT", 29500)),
    }
    # torchrun's agent already serves a store on MASTER_PORT: join it through env://
    # (binding tcp://MASTER_ADDR:MASTER_PORT again would fail with "address in use").
    if "MASTER_ADDR" in environ and "MASTER_PORT" in environ:
        settings["ddp_init_method"] = "env://"
    return settings


def world_from_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """RecBole's DDP config keys from the CLI's ``--nproc/--world_size/--ip/--port/--group_offset``.

    As ``recbole.quick_start.run``: ``world_size=-1`` means this node only (``nproc``).
    """
    nproc = _as_int(options.get("nproc", 1), "nproc")
    world_size = _as_int(options.get("world_size", -1), "world_size")
    offset = _as_int(options.get("group_offset", 0), "group_offset")
    if nproc < 1:
        raise PopPriorError(f"--nproc must be >= 1, got {nproc}")
    if world_size == -1:
        world_size = nproc
    if world_size < nproc:
        raise PopPriorError(f"--world_size ({world_size}) counts processes on all nodes and must be "
                            f">= --nproc ({nproc})")
    if not 0 <= offset <= world_size - nproc:
        raise PopPriorError(f"--group_offset must be in 0..{world_size - nproc} (world_size - nproc), got {offset}")
    ip = str(options.get("ip") or "127.0.0.1")
    return {"world_size": world_size, "nproc": nproc, "offset": offset, "ip": ip,
            "port": _check_port(options.get("port", 5678))}


# --- entry points -------------------------------------------------------------------------
def run_distributed(model: str | None, dataset: str | None, config_file_list: list[str] | None = None,
                    config_dict: dict[str, Any] | None = None, options: Mapping[str, Any] | None = None,
                    environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Train and test with DDP; return global rank 0's result record (None on other nodes).

    Under torchrun (``LOCAL_RANK`` in the environment) this process is one worker.
    Otherwise ``options["nproc"]`` workers are spawned on this node.
    """
    environ = os.environ if environ is None else environ
    config_dict = dict(config_dict or {})
    if "LOCAL_RANK" in environ:
        config_dict.update(world_from_torchrun(environ))
        return run_worker(config_dict.pop("local_rank"), model, dataset, config_file_list, config_dict)
    config_dict.update(world_from_options(options or {}))
    if config_dict["nproc"] == 1:
        return run_worker(0, model, dataset, config_file_list, config_dict)
    return _spawn(model, dataset, config_file_list, config_dict)


def _spawn(model, dataset, config_file_list, config_dict) -> dict[str, Any] | None:
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    try:
        mp.spawn(_spawned_worker, args=(model, dataset, config_file_list, config_dict, queue),
                 nprocs=config_dict["nproc"], join=True)
    except ProcessException as exc:
        messages = _drain(queue)
        errors = [payload for kind, payload in messages if kind == "error"]
        if errors:
            raise PopPriorError(errors[0]) from None
        failures = [payload for kind, payload in messages if kind == "failure"]
        if failures:
            raise RuntimeError(f"a worker failed: {failures[0]}") from exc
        raise
    results = [payload for kind, payload in _drain(queue) if kind == "result"]
    return results[0] if results else None


def _drain(queue) -> list[tuple[str, Any]]:
    items = []
    while not queue.empty():
        items.append(queue.get())
    return items


def _spawned_worker(local_rank: int, model, dataset, config_file_list, config_dict, queue) -> None:
    """``torch.multiprocessing.spawn`` target. Defined in the plugin, so unpickling it in the
    fresh interpreter imports ``recbole_popprior``: shims applied, metrics registered."""
    try:
        result = run_worker(local_rank, model, dataset, config_file_list, config_dict)
    except PopPriorError as exc:
        queue.put(("error", str(exc)))
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        queue.put(("failure", f"local rank {local_rank}: {type(exc).__name__}: {first}"))
        raise
    if result is not None and result.get("distributed", {}).get("rank") == 0:
        queue.put(("result", result))


def run_worker(local_rank: int, model, dataset, config_file_list: list[str] | None,
               config_dict: dict[str, Any]) -> dict[str, Any]:
    """One DDP process: the quick start's pipeline with the additions in the module docstring."""
    from recbole_popprior.quick_start import build_config, build_pipeline, train_and_test
    from recbole_popprior.utils import write_json

    config_dict = dict(config_dict, local_rank=int(local_rank))
    config = build_config(model, dataset, config_file_list, config_dict)
    try:
        _share_run_dir(config)
        pipe = build_pipeline(config)
        for loader in (pipe.valid_data, pipe.test_data):
            unpad_eval_sampler(loader)
        ranks = check_prior_across_ranks(pipe)
        trained: list[Any] = []
        _synchronise_after_fit(pipe.trainer, trained)
        result = train_and_test(pipe)
        rank = dist.get_rank()
        result["distributed"] = {"rank": rank, "world_size": dist.get_world_size(),
                                 "backend": dist.get_backend(), "ranks": ranks,
                                 "trained_weights_sha256": trained}
        if rank == 0:
            path = write_json(pipe.run_dir / "results.json", result)
            getLogger().info(f"results saved to: {path}")
        dist.barrier()
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _synchronise_after_fit(trainer, trained: list[Any]) -> None:
    """Hold every rank after ``fit`` until rank 0 has written the best checkpoint, and gather
    each rank's digest of the trained weights into ``trained`` (equal when DDP kept the
    replicas in step).

    Only (local) rank 0 saves (trainer.py ~L296), right after the last validation's
    collective; without a barrier the other ranks could load the best model for testing
    before it is on disk, or an older one. RecBole 1.2.1 has the same race.
    """
    fit = trainer.fit

    def fit_then_wait(*args, **kwargs):
        outcome = fit(*args, **kwargs)
        digests: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, _state_digest(trainer.model))
        trained[:] = digests
        dist.barrier()
        return outcome

    trainer.fit = fit_then_wait


def _state_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(_digest(tensor).encode())
    return digest.hexdigest()


def _share_run_dir(config) -> None:
    """Global rank 0 picks ``<output>/<model>-<dataset>-<time>``; every rank uses it."""
    from recbole_popprior.quick_start import make_run_dir

    if "run_dir" in config and config["run_dir"]:
        return
    chosen = [str(make_run_dir(config)) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(chosen, src=0)
    config["run_dir"] = chosen[0]


# --- evaluation shards --------------------------------------------------------------------
def unpad_eval_sampler(loader) -> None:
    """Make an evaluation loader's ``DistributedSampler`` shard without padding.

    RecBole builds it with ``drop_last=False`` (abstract_dataloader.py ~L60), so torch pads
    every rank to ``ceil(n / world_size)`` samples by repeating the first indices: those
    contexts would be evaluated twice. Setting ``total_size = n`` leaves rank ``r`` exactly
    the indices ``r, r + W, ...`` below ``n``; the shards partition the evaluation set.
    """
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, torch.utils.data.distributed.DistributedSampler):
        return
    if sampler.shuffle:
        raise PopPriorError("evaluation loaders must not shuffle under DDP")
    n = len(sampler.dataset)
    if n < sampler.num_replicas:
        raise PopPriorError(f"an evaluation split has {n} contexts, fewer than the {sampler.num_replicas} "
                            "processes; use fewer processes")
    sampler.drop_last = False
    sampler.total_size = n
    sampler.num_samples = len(range(sampler.rank, n, sampler.num_replicas))


# --- the prior is the same everywhere -------------------------------------------------------
def _digest(values: torch.Tensor | np.ndarray) -> str:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def rank_info(pipe) -> dict[str, Any]:
    """What this rank's prior was computed from (DESIGN §2): its training split and ``log p_hat``.

    The prior is recomputed here from ``train_data._dataset`` (the dataset the model was
    built on) and compared with the model's buffer.
    """
    from recbole.evaluator.register import metrics_dict

    from recbole_popprior.prior import estimate_log_prior

    train = pipe.train_data._dataset
    item_field = pipe.config["ITEM_ID_FIELD"]
    targets = train.inter_feat[item_field]
    info: dict[str, Any] = {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "host": socket.gethostname(),
        "train_targets": int(len(targets)),
        "train_targets_sha256": _digest(targets),
        "log_prior_sha256": None,
        "model_log_prior_sha256": None,
        "plugin_metrics": sorted(name for name, cls in metrics_dict.items()
                                 if getattr(cls, "__module__", "").startswith("recbole_popprior")),
    }
    model = pipe.model
    if getattr(model, "log_prior", None) is not None:
        log_prior = estimate_log_prior(targets, train.num(item_field), float(model.prior_alpha))
        info["log_prior_sha256"] = _digest(log_prior)
        info["model_log_prior_sha256"] = _digest(model.log_prior)
    return info


def check_prior_across_ranks(pipe) -> list[dict[str, Any]]:
    """Gather :func:`rank_info` from every rank; raise unless all ranks agree (DESIGN §2)."""
    info = rank_info(pipe)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, info)
    keys = ("train_targets", "train_targets_sha256", "log_prior_sha256")
    first = gathered[0]
    for other in gathered[1:]:
        if any(other[key] != first[key] for key in keys):
            raise PopPriorError(
                f"rank {other['rank']} ({other['host']}) holds a different training split or prior than "
                f"rank 0 ({first['host']}): {other['train_targets']} vs {first['train_targets']} targets; "
                "every node must read the same dataset files with the same settings")
    for entry in gathered:
        if entry["log_prior_sha256"] != entry["model_log_prior_sha256"]:
            raise RuntimeError(f"rank {entry['rank']}: the model's log_prior differs from the prior of "
                               "the full training split")
    return gathered


# --- energy statistics ------------------------------------------------------------------
def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _stats_fields(stats: Any) -> tuple[str, ...]:
    if isinstance(stats, dict):
        return tuple(name for name in STATS_FIELDS if name in stats)
    if all(hasattr(stats, name) for name in ("total", "s_sum", "s_sq")):
        return SCORE_STATS_FIELDS
    return STATS_FIELDS


def all_reduce_stats(stats: Any, fields: tuple[str, ...] | None = None) -> Any:
    """Sum streaming energy statistics over ranks, in place (DESIGN §3); returns ``stats``.

    Each rank's statistics are sums over its own evaluation contexts, so the global ones
    are their sums over ranks -- never an average of per-rank ratios such as ``dir_frac``.
    ``stats`` is a ``ContextStats`` (``G = H^T H``, ``hsum = H^T 1``, ``m``), a ``ScoreStats``
    (streaming fallback: ``m``, ``total``, ``s_sum``, ``s_sq``, ``null_sq``, ``sub_sq``; its
    buffer is flushed first) or a dict; ``fields`` overrides which attributes are summed.

    The sum runs in float64 in one flat ``all_reduce``; tensors and arrays keep their type,
    dtype and device. A field that is ``None`` on some ranks (no contexts there) counts as
    zeros. Every rank must call this (it is collective). A no-op outside a process group
    of more than one process.
    """
    if stats is None or not is_distributed():
        return stats
    if hasattr(stats, "flush"):
        stats.flush()
    fields = _stats_fields(stats) if fields is None else tuple(fields)
    is_map = isinstance(stats, dict)
    values = [stats.get(name) if is_map else getattr(stats, name) for name in fields]
    shapes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, [None if v is None else tuple(np.shape(v)) for v in values])
    agreed = []
    for k, name in enumerate(fields):
        known = {rank_shapes[k] for rank_shapes in shapes if rank_shapes[k] is not None}
        if len(known) > 1:
            raise PopPriorError(f"ranks hold energy statistics {name!r} of different shapes {sorted(known)}")
        agreed.append(known.pop() if known else None)
    parts = []
    for value, shape in zip(values, agreed):
        if shape is None:
            continue
        if value is None:
            value = np.zeros(shape)
        elif isinstance(value, torch.Tensor):
            value = value.detach().cpu()
        parts.append(torch.as_tensor(np.asarray(value, dtype=np.float64)).reshape(-1))
    if not parts:
        return stats
    buffer = torch.cat(parts).to(_reduce_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    buffer = buffer.cpu()
    start = 0
    for name, value, shape in zip(fields, values, agreed):
        if shape is None:
            continue
        size = int(np.prod(shape, dtype=np.int64))
        summed = buffer[start:start + size]
        start += size
        if isinstance(value, torch.Tensor):
            new: Any = summed.reshape(shape).to(value.device, value.dtype)
        elif isinstance(value, np.ndarray) or value is None:
            dtype = value.dtype if value is not None else np.float64
            new = summed.numpy().reshape(shape).astype(dtype, copy=True)
        elif isinstance(value, (bool, np.bool_)):
            raise PopPriorError(f"cannot sum the boolean statistic {name!r}")
        elif isinstance(value, (int, np.integer)):
            new = int(round(float(summed[0])))
        else:
            new = float(summed[0])
        if is_map:
            stats[name] = new
        else:
            setattr(stats, name, new)
    return stats


def all_reduce_array(values: Any) -> np.ndarray:
    """The float64 sum over ranks of ``values`` (any array-like; same shape on every rank).

    The ``fn`` that ``PopPriorCollector.reduce_energy_stats(fn)`` takes. Collective: every
    rank must call it in the same order. Identity outside a multi-process group.
    """
    array = np.asarray(values, dtype=np.float64)
    if not is_distributed():
        return array.copy()
    buffer = torch.from_numpy(array.reshape(-1).copy()).to(_reduce_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.cpu().numpy().reshape(array.shape)


def reduced_key_prefixes() -> tuple[str, ...]:
    """Result-key prefixes of registered metrics whose values are already global.

    A metric class opts in with ``ddp_key_prefixes = ("pop_",)``: its results are computed
    from statistics summed over ranks (:func:`all_reduce_stats`), so they hold on every rank
    and RecBole's ``_map_reduce`` (a sample-weighted mean, in float32, rounded to
    ``metric_decimal_place``) must leave them alone.
    """
    from recbole.evaluator.register import metrics_dict

    prefixes = set()
    for cls in metrics_dict.values():
        prefixes.update(str(p).lower() for p in getattr(cls, REDUCED_ATTR, ()) or ())
    return tuple(sorted(prefixes))


def split_reduced(result: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split an evaluation result into (keys for RecBole's ``_map_reduce`` to average, keys that
    are already global), keeping the order of ``result`` within each part."""
    prefixes = reduced_key_prefixes()
    averaged: dict[str, Any] = {}
    already_global: dict[str, Any] = {}
    for key, value in result.items():
        (already_global if prefixes and str(key).lower().startswith(prefixes) else averaged)[key] = value
    return averaged, already_global


def map_reduce(trainer_map_reduce, result: Mapping[str, Any], num_sample: int) -> dict[str, Any]:
    """RecBole's ``_map_reduce`` for the per-rank metrics only; already-global ones kept as they are.

    ``trainer_map_reduce`` is RecBole's bound ``Trainer._map_reduce`` (collective, so every rank
    calls it, with the same keys). Returns the result in its original key order.
    """
    averaged, already_global = split_reduced(result)
    merged = trainer_map_reduce(averaged, num_sample) if averaged else {}
    return {key: merged[key] if key in merged else already_global[key] for key in result}
