"""Every shim RecBole 1.2.1 needs on today's stack, in one place.

Each shim names the upstream bug it works around.
Nothing else in the plugin patches RecBole.

1. numpy >= 2 removed ``np.float_``/``np.complex_``/``np.unicode_``; RecBole's
   ``Config.compatibility_settings`` uses them and crashes, while RecBole code
   elsewhere (metrics.py, layers.py, dataset.py) relies on the old aliases
   ``np.float``/``np.bool``/``np.long``... that function sets.  -> :func:`numpy_aliases`.
2. ``Collector.get_data_struct`` calls ``.cpu()`` on every entry, including the
   ``Counter`` stored under ``data.count_items``, so RecBole's own
   ``AveragePopularity`` and ``TailPercentage`` crash.  -> :class:`FixedCollector`.
3. torch >= 2.6 loads with ``weights_only=True`` by default and RecBole pickles its
   ``Config`` into checkpoints, so ``evaluate(load_best_model=True)`` and resume fail;
   turning ``weights_only`` off would run arbitrary pickled code.
   -> the plugin's own checkpoint format, :mod:`recbole_popprior.checkpoint`.
4. pandas 3 copy-on-write turns RecBole's ``fillna(..., inplace=True)`` into a no-op:
   handled by pinning ``pandas<3`` in setup.cfg and checked by :func:`check_pandas`.
5. ``Config._init_device`` hard-codes the NCCL backend and asserts one GPU per
   process, so distributed runs cannot use gloo on CPU; and the trainer's
   ``DistributedDataParallel`` broadcasts every buffer from rank 0 on every step.
   -> :func:`init_distributed`, :func:`_ddp_any_device`.
6. RecBole's ``sine.py`` turns on torch anomaly detection for the whole process at
   import, slowing every training 2-3x.  -> :func:`disable_anomaly_detection`.
7. KSR keeps its relation matrix in float64 and fails on a dtype error in ``forward``.
   -> :func:`ksr_relation_float32`.
8. ``Trainer.__init__`` calls ``get_tensorboard`` (utils.py ~L208), which creates
   ``log_tensorboard/<run>/`` under the *current directory* on every run, whatever the output
   folder (and fails in a read-only working directory). -> :func:`tensorboard_writer`: off
   unless ``tensorboard: True``, then under the run's own folder.
9. GRU4RecCPR, SASRecCPR and RepeatNet ``scatter_`` autocast-cast values into float32
   tensors (or the reverse) and fail under ``enable_amp``. -> :func:`breaks_under_autocast`:
   the trainer mixin runs their training step without autocast (in float32) and says so.

Three more fixes of RecBole behaviour live next to the code they belong to, listed here so
that this list stays complete:

10. SASRecF, GRU4RecF and FDSA put a layer object (holding the dataset) in
   ``other_parameter()``, which RecBole pickles into checkpoints.
   -> ``checkpoint._other_parameters`` keeps plain values only.
11. Only rank 0 saves the best checkpoint under DDP, and other ranks may load it before it
   is written (trainer.py ~L296). -> the barrier in ``PopPriorTrainerMixin.fit``.
12. A ``.inter`` file whose rows all fail RecBole's filters ends in RecBole's
    "Some feat is empty" error. -> ``data.dataset.create_dataset`` turns it into one line.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import os
import warnings
from typing import Any, Iterator

import numpy as np
import pandas as pd
import recbole.trainer.trainer as recbole_trainer
import torch
import torch.distributed as dist
from recbole.evaluator.collector import Collector
from torch.utils.tensorboard import SummaryWriter

from recbole_popprior.errors import PopPriorError


# --- 1. numpy 2 aliases ---------------------------------------------------------------
def numpy_aliases() -> None:
    """Set the deprecated numpy aliases RecBole 1.2.1 uses, in a numpy-2-safe way.

    Replaces ``recbole.config.Config.compatibility_settings`` (configurator.py ~L625),
    which reads ``np.float_``/``np.complex_``/``np.unicode_`` and raises under numpy 2.
    """
    np.bool = np.bool_
    np.int = np.int_
    np.float = np.float64
    np.complex = np.complex128
    np.object = np.object_
    np.str = np.str_
    np.long = np.int_
    np.unicode = np.str_


# --- 2. collector .cpu() crash ----------------------------------------------------------
class FixedCollector(Collector):
    """RecBole's ``Collector`` with ``get_data_struct`` fixed (collector.py ~L226).

    Upstream calls ``.cpu()`` on every entry of the data struct, including the
    ``collections.Counter`` under ``data.count_items``; only tensors are moved here.
    """

    def get_data_struct(self):
        for key, value in self.data_struct._data_dict.items():
            if isinstance(value, torch.Tensor):
                self.data_struct._data_dict[key] = value.cpu()
        returned_struct = copy.deepcopy(self.data_struct)
        for key in ["rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label"]:
            if key in self.data_struct:
                del self.data_struct[key]
        return returned_struct


# --- 4. pandas 3 copy-on-write -----------------------------------------------------------
def check_pandas() -> None:
    """Refuse pandas >= 3, whose copy-on-write makes RecBole's in-place ``fillna`` a no-op.

    RecBole 1.2.1 dataset.py ~L501 and ~L648 fill NaNs with ``inplace=True`` on a column
    selection; under copy-on-write that silently does nothing (float NaNs stay NaN,
    empty token_seq cells crash). setup.cfg pins ``pandas<3``; this guards other installs.
    """
    major = int(pd.__version__.split(".")[0])
    if major >= 3:
        raise PopPriorError(
            f"pandas {pd.__version__} is not supported: RecBole 1.2.1 relies on in-place fillna, "
            "which pandas 3 copy-on-write silently ignores; install 'pandas<3'")


# --- 5. distributed backend --------------------------------------------------------------
def init_distributed(config_dict: dict[str, Any]) -> None:
    """Initialise ``torch.distributed`` for RecBole's DDP path with the nccl or gloo backend.

    Replaces the DDP branch of ``Config._init_device`` (configurator.py ~L495), which
    hard-codes ``backend="nccl"``, asserts one GPU per process and puts every process on
    ``cuda:<local_rank>``. Here:

    - ``config["ddp_backend"]`` picks the backend (default: nccl when CUDA is in use, i.e.
      ``gpu_id`` is set and a GPU is visible; gloo otherwise). nccl needs CUDA.
    - The device is ``cuda:<local_rank>`` when CUDA is in use (either backend), else CPU.
    - The rendezvous is ``config["ddp_init_method"]`` when given (``env://`` under torchrun,
      whose agent already serves a store on ``MASTER_PORT``), else ``tcp://<ip>:<port>``.
    - The global rank is ``local_rank + offset``; ``offset`` is this node's group offset.

    RecBole's trainer wraps the model as ``DistributedDataParallel(model,
    device_ids=[local_rank])`` (trainer.py ~L62), which torch rejects for a CPU module, so
    that name is also replaced by :func:`_ddp_any_device` (see :func:`_patch_trainer_ddp`).
    Everything else RecBole's DDP path calls (``set_reduce_hook``, ``sync_grad_loss``,
    ``_map_reduce``'s ``all_gather``, ``DistributedSampler``) works with gloo on CPU.
    """
    gpu_id = str(config_dict.get("gpu_id", "") or "")
    use_cuda = gpu_id != "" and torch.cuda.is_available()
    backend = str(config_dict.get("ddp_backend") or ("nccl" if use_cuda else "gloo")).lower()
    if backend not in {"nccl", "gloo"}:
        raise PopPriorError(f"ddp_backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and not use_cuda:
        raise PopPriorError("ddp_backend=nccl needs CUDA GPUs (gpu_id set and a GPU visible); "
                            "use --ddp_backend=gloo on CPU")
    local_rank = _int_setting(config_dict, "local_rank", 0)
    offset = _int_setting(config_dict, "offset", 0)
    nproc = _int_setting(config_dict, "nproc", 1)
    world_size = _int_setting(config_dict, "world_size", -1)
    world_size = world_size if world_size > 0 else nproc  # RecBole: -1 means one node
    if not 0 <= local_rank < max(nproc, 1) or not 0 <= local_rank + offset < world_size:
        raise PopPriorError(f"bad distributed settings: local_rank={local_rank}, offset={offset}, "
                            f"nproc={nproc}, world_size={world_size}")
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise PopPriorError(f"process local_rank={local_rank} has no GPU: {torch.cuda.device_count()} visible "
                            f"with gpu_id={gpu_id!r}; list one GPU per process, e.g. "
                            f"--gpu_id={','.join(map(str, range(nproc)))}")
    init_method = config_dict.get("ddp_init_method") or \
        f"tcp://{config_dict.get('ip') or '127.0.0.1'}:{config_dict.get('port') or 5678}"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=str(init_method),
                                rank=local_rank + offset, world_size=world_size)
    _patch_trainer_ddp()
    config_dict["device"] = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    config_dict["single_spec"] = False
    config_dict["ddp_backend"] = backend
    for key, value in (("local_rank", local_rank), ("offset", offset), ("world_size", world_size),
                       ("nproc", nproc)):
        config_dict[key] = value
    if local_rank != 0:
        config_dict["state"] = "error"
        config_dict["show_progress"] = False
        config_dict["verbose"] = False


def _int_setting(config_dict: dict[str, Any], key: str, default: int) -> int:
    value = config_dict.get(key)
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PopPriorError(f"{key} must be an integer, got {value!r}") from None


def _ddp_any_device(module: torch.nn.Module, device_ids: list[int] | None = None,
                    **kwargs: Any) -> torch.nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel`` that passes ``device_ids`` only for a CUDA module, and that
    does not broadcast the buffers (docs/DESIGN.md §9.3).

    torch raises for ``device_ids`` with a CPU module, which RecBole always passes. RecBole keeps
    torch's default ``broadcast_buffers=True``, and its ``set_reduce_hook`` runs the DDP forward
    once per step: every buffer was re-sent from rank 0 on every step (the log priors, the
    sampled-softmax tables, Adap-tau's per-user temperatures: about 83 MB per step at 4M items),
    and each rank's own Adap-tau state was overwritten with rank 0's. No buffer needs it: the
    priors are checked identical on every rank at start (``distributed.check_prior_across_ranks``),
    the sampler tables derive from them, and Adap-tau sums its statistics over the ranks itself,
    once an epoch. Parameters stay in step through DDP's gradient all-reduce, as before.
    """
    param = next(module.parameters(), None)
    if param is None or param.device.type != "cuda":
        device_ids = None
    if "broadcast_buffers" not in kwargs and "forward_sync_buffers" not in kwargs:
        # torch >= 2.13 names it forward_sync_buffers (the buffers are still synced once, at init:
        # harmless, every rank builds the same ones); older torch has broadcast_buffers only
        kwargs[_BUFFER_SYNC_KEY] = False
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)


_BUFFER_SYNC_KEY = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
    torch.nn.parallel.DistributedDataParallel.__init__).parameters else "broadcast_buffers")


def _patch_trainer_ddp() -> None:
    """Point ``recbole.trainer.trainer.DistributedDataParallel`` at :func:`_ddp_any_device`."""
    recbole_trainer.DistributedDataParallel = _ddp_any_device


# --- 6. global anomaly detection ---------------------------------------------------------
def disable_anomaly_detection() -> None:
    """Undo ``torch.autograd.set_detect_anomaly(True)``, which RecBole runs at import time.

    ``recbole/model/sequential_recommender/sine.py`` (line 25) switches anomaly detection on
    for the whole process as soon as RecBole's sequential models are imported, i.e. on every
    ``get_model`` call. It makes every model's training 2-3x slower. Called right after the
    plugin looks up a RecBole model class.
    """
    if torch.is_anomaly_enabled():
        torch.autograd.set_detect_anomaly(False)


# --- 7. KSR's float64 relation matrix -----------------------------------------------------
def ksr_relation_float32(model: torch.nn.Module) -> None:
    """Cast KSR's ``relation_Matrix`` to float32 (RecBole 1.2.1 bug).

    ``Dataset._preload_weight_matrix`` builds it with numpy's default float64, and KSR
    multiplies it with float32 hidden states, so its ``forward`` raises a dtype error.
    """
    model.relation_Matrix = model.relation_Matrix.float()


# --- 8. log_tensorboard/ in the working directory ------------------------------------------
class NoTensorboard:
    """What RecBole's trainer writes its tensorboard scalars to when tensorboard is off: nothing."""

    def __getattr__(self, name: str) -> Any:  # add_scalar, add_hparams, flush, close, ...
        return lambda *args, **kwargs: None


#: the folder the next trainer's SummaryWriter writes to (None: no tensorboard files at all)
_TENSORBOARD_DIR: contextvars.ContextVar[str | None] = contextvars.ContextVar("tensorboard_dir", default=None)


def tensorboard_writer(logger: Any) -> Any:
    """Replaces ``recbole.trainer.trainer.get_tensorboard`` (utils.py ~L208), which writes
    ``log_tensorboard/`` into the current directory: a ``SummaryWriter`` on the folder that
    :func:`tensorboard_under` set, or a :class:`NoTensorboard` (also for RecBole's own trainers)."""
    folder = _TENSORBOARD_DIR.get()
    return NoTensorboard() if folder is None else SummaryWriter(folder)


@contextlib.contextmanager
def tensorboard_under(folder: str | os.PathLike | None) -> Iterator[None]:
    """Trainers built in this block write tensorboard files under ``folder`` (None: none)."""
    token = _TENSORBOARD_DIR.set(None if folder is None else os.fspath(folder))
    try:
        yield
    finally:
        _TENSORBOARD_DIR.reset(token)


# --- 9. models that fail under autocast ----------------------------------------------------------
#: RecBole 1.2.1 models whose forward mixes dtypes in ``scatter_`` / ``scatter_add_`` under autocast
#: (gru4reccpr.py ~L335, sasreccpr.py likewise, repeatnet.py ~L256: "Expected self.dtype to be equal
#: to src.dtype"), by class name: the plugin's classes keep RecBole's names
AUTOCAST_BROKEN = ("GRU4RecCPR", "SASRecCPR", "RepeatNet")


def breaks_under_autocast(model: torch.nn.Module) -> bool:
    """Whether ``model`` is (a subclass of) one of :data:`AUTOCAST_BROKEN`."""
    return any(cls.__name__ in AUTOCAST_BROKEN and cls.__module__.startswith("recbole.")
               for cls in type(model).__mro__)


def without_autocast(loss_func: Any, device_type: str) -> Any:
    """``loss_func`` run with autocast switched off (float32), for :func:`breaks_under_autocast` models."""

    def run(interaction):
        with torch.autocast(device_type=device_type, enabled=False):
            return loss_func(interaction)

    return run


def quiet_upstream_warnings() -> None:
    """Silence RecBole 1.2.1's known-harmless warnings on today's stack.

    Under pandas 2 its ``fillna(inplace=True)`` still works but warns about pandas 3
    (handled by the pin, shim 4), and its trainer builds ``torch.cuda.amp.GradScaler``,
    which torch deprecates. Both repeat on every run and hide the real output.
    """
    warnings.filterwarnings("ignore", message=".*inplace method will never work.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*A value is trying to be set on a copy.*")
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler.*", category=FutureWarning)


def apply() -> None:
    """Apply the process-wide shims (numpy aliases, pandas guard, warning filters, no
    ``log_tensorboard/`` in the working directory). Idempotent."""
    numpy_aliases()
    check_pandas()
    quiet_upstream_warnings()
    recbole_trainer.get_tensorboard = tensorboard_writer


# Importing this module applies the process-wide shims: every plugin module that runs RecBole
# code imports it (the package itself stays light, so that --help loads no torch).
apply()
