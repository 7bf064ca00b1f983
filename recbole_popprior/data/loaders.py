"""RecBole's training dataloader without per-example Python lists (DESIGN.md §5.2).

``AbstractDataLoader`` hands torch ``list(range(n))`` as its dataset and shuffles with
``RandomSampler``, which yields ``randperm(n).tolist()``: two lists of ``n`` Python ints, about
72 bytes per training example. :class:`LeanTrainDataLoader` indexes a ``range`` and cuts one
``randperm`` tensor into batches, drawing from the loader's generator exactly when
``RandomSampler`` does, so the batches are RecBole's, epoch after epoch.
"""

from __future__ import annotations

from logging import getLogger
from typing import Iterator

import torch
from recbole.data.dataloader import TrainDataLoader
from recbole.data.transform import construct_transform
from recbole.utils import ModelType


class _Positions(torch.utils.data.Dataset):
    """Indices ``0..n-1``; a whole batch of them is passed on as one tensor."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, index):
        return index


class _Batches(torch.utils.data.Sampler):
    """``BatchSampler(RandomSampler(range(n), generator), step)`` (or sequential) as tensors.

    ``RandomSampler`` draws ``randperm(n)`` when the first index is asked for and, with
    ``num_samples == n``, a second (empty-sliced) ``randperm(n)`` when the next index after the
    last is asked for: while the last batch is filled, or just after it when ``step`` divides
    ``n``. Both draws happen here at the same moments, so later epochs match too.
    """

    def __init__(self, n: int, step: int, shuffle: bool, generator: torch.Generator):
        self.n, self.step, self.shuffle, self.generator = n, step, shuffle, generator

    def __len__(self) -> int:
        return (self.n + self.step - 1) // self.step

    def __iter__(self) -> Iterator[torch.Tensor]:
        n, step = self.n, self.step
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, step):
            if self.shuffle and start + step > n:
                torch.randperm(n, generator=self.generator)
            yield order[start:start + step]
        if self.shuffle and n % step == 0:
            torch.randperm(n, generator=self.generator)


class LeanTrainDataLoader(TrainDataLoader):
    """RecBole's ``TrainDataLoader`` over ``_Positions`` / ``_Batches`` (single process only;
    DDP keeps RecBole's ``DistributedSampler``).

    ``__init__`` is RecBole's ``TrainDataLoader.__init__`` and ``AbstractDataLoader.__init__``
    (``recbole/data/dataloader``) line for line, except for what is handed to torch.
    """

    def __init__(self, config, dataset, sampler, shuffle=False):
        self.logger = getLogger()
        self._set_neg_sample_args(config, dataset, config["MODEL_INPUT_TYPE"], config["train_neg_sample_args"])
        self.sample_size = len(dataset)
        self.shuffle = shuffle
        self.config = config
        self._dataset = dataset
        self._sampler = sampler
        self._batch_size = self.step = self.model = None
        self._init_batch_size_and_step()
        self.generator = torch.Generator()
        self.generator.manual_seed(config["seed"])
        self.transform = construct_transform(config)
        self.is_sequential = config["MODEL_TYPE"] == ModelType.SEQUENTIAL
        torch.utils.data.DataLoader.__init__(
            self, dataset=_Positions(self.sample_size),
            batch_sampler=_Batches(self.sample_size, self.step, shuffle, self.generator),
            collate_fn=self.collate_fn, num_workers=config["worker"], generator=self.generator)
