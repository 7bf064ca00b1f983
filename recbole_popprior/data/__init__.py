"""Datasets: RecBole's dataset classes with the plugin's fast loader, the lean sequential data,
and the synthetic generator.

- :mod:`~recbole_popprior.data.dataset`: :func:`create_dataset` and :func:`data_preparation`;
- :mod:`~recbole_popprior.data.fast_loader`: a pyarrow reader for atomic files;
- :mod:`~recbole_popprior.data.lean_dataset`: ``sequence_data: lean``, RecBole's sequential data in
  O(N) memory, built from :mod:`~recbole_popprior.data.inter_codes` (the ``.inter`` file as codes),
  :mod:`~recbole_popprior.data.filtering`, :mod:`~recbole_popprior.data.remap`,
  :mod:`~recbole_popprior.data.sequences` (the store and its views) and
  :mod:`~recbole_popprior.data.loaders` (the training loader);
- :mod:`~recbole_popprior.data.synthetic`: sequences with known truth.
"""

from recbole_popprior.data.dataset import create_dataset, data_preparation, dataset_class

__all__ = ["create_dataset", "data_preparation", "dataset_class"]
