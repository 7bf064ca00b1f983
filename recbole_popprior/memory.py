"""An exact count of the tensor memory a block of code holds at its peak (docs/DESIGN.md §3, bounded memory).

:class:`TensorPeak` is a ``TorchFunctionMode``: every torch function and tensor method called
inside the block reports the tensors it returns, and each storage that is not one of the call's
inputs' (so not a view, an in-place or an ``out=`` result) is counted at its size from that call
until it is freed (a weak reference to the storage says when). Tensors that existed before the
block count only where the block allocates them. What it cannot see: memory a call allocates and
frees before it returns (BLAS packing buffers, ``torch.topk``'s per-thread work vector on the CPU),
tensors made by C++ code outside any Python call, and memory outside torch (numpy). A function
mode, not a dispatch mode: the latter imports ``torch._dynamo`` on first use (seconds). The
full-sort chunk planner (:mod:`recbole_popprior.evaluator.full_sort`) measures its first chunks with
it; the tests compare it with the allocator's own events (torch's profiler).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class TensorPeak(TorchFunctionMode):
    """``with TensorPeak() as peak: ...`` then ``peak.peak``: the most bytes of storages allocated
    inside the block that were alive at once (``peak.current``: those still alive at the end)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0
        self.current = 0
        #: storage address -> (weak reference, bytes) of the storages the block allocated
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        added = False
        for tensor in _tensors(out):
            storage = tensor.untyped_storage()
            address, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or address in inputs:
                continue
            known = self._live.get(address)
            if known is None or known[0].expired():  # a new storage (perhaps at a freed one's address)
                self._live[address] = (StorageWeakRef(storage), nbytes)
                added = True
        if added or self._live:
            self._update()
        return out

    def _update(self) -> None:
        for address in [a for a, (ref, _) in self._live.items() if ref.expired()]:
            del self._live[address]
        self.current = sum(nbytes for _, nbytes in self._live.values())
        self.peak = max(self.peak, self.current)

    def __exit__(self, *exc) -> Any:
        self._update()
        return super().__exit__(*exc)


__all__ = ["TensorPeak"]
