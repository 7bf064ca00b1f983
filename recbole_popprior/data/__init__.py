"""Datasets: RecBole's dataset classes with the plugin's fast loader, and the synthetic generator.

- :mod:`~recbole_popprior.data.dataset`: :func:`create_dataset` and :func:`data_preparation`;
- :mod:`~recbole_popprior.data.fast_loader`: a pyarrow reader for atomic files;
- :mod:`~recbole_popprior.data.synthetic`: sequences with known truth.
"""

from recbole_popprior.data.dataset import create_dataset, data_preparation, dataset_class

__all__ = ["create_dataset", "data_preparation", "dataset_class"]
