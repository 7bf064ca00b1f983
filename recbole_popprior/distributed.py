"""Distributed training through RecBole's DDP path, on one node or several: the launcher.

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
which keep docs/DESIGN.md §2-3 exact across ranks:

- one run folder for all ranks: global rank 0 picks it and broadcasts it;
- evaluation shards without ``DistributedSampler``'s padding, which repeats contexts and
  would count them twice in the energy statistics;
- a check that every rank holds the whole training split and computed the same prior
  (RecBole shards batches with a sampler, never the dataset);
- ``results.json`` written by global rank 0 only, with a ``distributed`` section.

The trainer mixin holds every rank after ``fit`` and records each rank's trained-weight digest
(:mod:`recbole_popprior.trainer`); the collective operations themselves, including the sums of
the energy statistics, are in :mod:`recbole_popprior.collective`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from recbole.evaluator.register import metrics_dict
from torch.multiprocessing.spawn import ProcessException

from recbole_popprior import collective
from recbole_popprior.errors import PopPriorError
from recbole_popprior.prior import estimate_log_prior
from recbole_popprior.quick_start import build_config, build_pipeline, log_report_folder, run_dir_name, train_and_test
from recbole_popprior.utils import write_json


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


#: seconds the other workers get to stop by themselves after one failed (the same bad input stops
#: each of them, and each removes the run folder it made), before torch terminates them
_GRACE_S = 10


def _spawn(model, dataset, config_file_list, config_dict) -> dict[str, Any] | None:
    """``nproc`` workers on this node. Ctrl-C (or any error here) stops them: SIGTERM, then SIGKILL,
    since a worker waiting in torch's rendezvous for a rank that never comes does not return to
    Python to see its own SIGINT, and the parent would wait on it at exit for ever."""
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    workers = mp.start_processes(_spawned_worker, args=(model, dataset, config_file_list, config_dict, queue),
                                 nprocs=config_dict["nproc"], join=False, start_method="spawn")
    try:
        with _quiet_termination_log():
            while not workers.join(timeout=1, grace_period=_GRACE_S):
                pass
    except ProcessException as exc:
        messages = _drain(queue)
        _remove_unused_run_dirs(messages)
        errors = [payload for kind, payload in messages if kind == "error"]
        if errors:
            raise PopPriorError(errors[0]) from None
        failures = [payload for kind, payload in messages if kind == "failure"]
        if failures:
            raise RuntimeError(f"a worker failed: {failures[0]}") from exc
        raise
    except BaseException:
        _stop(workers.processes)
        _remove_unused_run_dirs(_drain(queue))
        raise
    results = [payload for kind, payload in _drain(queue) if kind == "result"]
    return results[0] if results else None


def _stop(processes, wait_s: float = 5.0) -> None:
    """SIGTERM every live worker, SIGKILL the ones still there after ``wait_s``; reap them all."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + wait_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()


@contextlib.contextmanager
def _quiet_termination_log():
    """torch logs "Terminating process N via signal SIGTERM" when it stops the other workers after
    a failure: the command's own one line says what failed."""
    log = logging.getLogger("torch.multiprocessing.spawn")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _remove_unused_run_dirs(messages: list[tuple[str, Any]]) -> None:
    """Rank 0's run folder, when a failed start left nothing in it but its log (rank 0 removes it
    itself unless it was stopped first)."""
    for kind, payload in messages:
        path = Path(payload) if kind == "run_dir" else None
        if path is not None and path.is_dir() and set(os.listdir(path)) <= {"run.log"}:
            shutil.rmtree(path, ignore_errors=True)


def _drain(queue) -> list[tuple[str, Any]]:
    items = []
    while not queue.empty():
        items.append(queue.get())
    return items


def _spawned_worker(local_rank: int, model, dataset, config_file_list, config_dict, queue) -> None:
    """``torch.multiprocessing.spawn`` target. Defined in the plugin, so unpickling it in the
    fresh interpreter imports ``recbole_popprior``: shims applied, metrics registered."""
    try:
        result = run_worker(local_rank, model, dataset, config_file_list, config_dict,
                            on_run_dir=lambda path: queue.put(("run_dir", str(path))))
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
               config_dict: dict[str, Any], on_run_dir: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One DDP process: the quick start's pipeline with the additions in the module docstring
    (``on_run_dir``: told the run folder, on global rank 0)."""
    config_dict = dict(config_dict, local_rank=int(local_rank))
    config = build_config(model, dataset, config_file_list, config_dict)
    try:
        _share_run_dir(config)
        if on_run_dir is not None and dist.get_rank() == 0:
            on_run_dir(config["run_dir"])
        pipe = build_pipeline(config)
        for loader in (pipe.valid_data, pipe.test_data):
            unpad_eval_sampler(loader)
        ranks = check_prior_across_ranks(pipe)
        result = train_and_test(pipe)
        rank = dist.get_rank()
        result["distributed"] = {"rank": rank, "world_size": dist.get_world_size(),
                                 "backend": dist.get_backend(), "ranks": ranks,
                                 "trained_weights_sha256": pipe.trainer.trained_weight_digests}
        if rank == 0:
            write_json(pipe.run_dir / "results.json", result)
            log_report_folder(pipe.run_dir, "results.json, model.pth, run.log")
        dist.barrier()
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _share_run_dir(config) -> None:
    """Global rank 0 picks ``<output>/<model>-<dataset>-<time>``; every rank uses it. It is created
    by the pipeline (and removed again by a start that fails), as in a single process."""
    if "run_dir" in config and config["run_dir"]:
        return
    chosen = [str(run_dir_name(config)) if dist.get_rank() == 0 else None]
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
def rank_info(pipe) -> dict[str, Any]:
    """What this rank's prior was computed from (DESIGN §2): its training split and ``log p_hat``.

    The prior is recomputed here from ``train_data._dataset`` (the dataset the model was
    built on) and compared with the model's buffer.
    """
    train = pipe.train_data._dataset
    item_field = pipe.config["ITEM_ID_FIELD"]
    targets = train.inter_feat[item_field]
    info: dict[str, Any] = {
        "rank": collective.rank(),
        "host": socket.gethostname(),
        "train_targets": int(len(targets)),
        "train_targets_sha256": collective.tensor_digest(targets),
        "log_prior_sha256": None,
        "model_log_prior_sha256": None,
        "plugin_metrics": sorted(name for name, cls in metrics_dict.items()
                                 if getattr(cls, "__module__", "").startswith("recbole_popprior")),
    }
    model = pipe.model
    if getattr(model, "log_prior", None) is not None:
        log_prior = estimate_log_prior(targets, train.num(item_field), float(model.prior_alpha))
        info["log_prior_sha256"] = collective.tensor_digest(log_prior)
        info["model_log_prior_sha256"] = collective.tensor_digest(model.log_prior)
    return info


def check_prior_across_ranks(pipe) -> list[dict[str, Any]]:
    """Gather :func:`rank_info` from every rank; raise unless all ranks agree (DESIGN §2)."""
    gathered = collective.all_gather(rank_info(pipe))
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
