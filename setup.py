"""Packaging lives in setup.cfg; this file only adds the two configuration folders.

The top-level ``properties/`` and ``dataset_configs/`` folders (a layout fixed by the users)
are shipped inside the package as ``recbole_popprior.properties`` and
``recbole_popprior.dataset_configs`` (``package_dir`` in setup.cfg), so an installed copy finds
them through ``importlib.resources`` exactly as an editable checkout does.
"""

from setuptools import find_packages, setup

RESOURCES = ["recbole_popprior.properties", "recbole_popprior.properties.model", "recbole_popprior.dataset_configs"]

setup(packages=find_packages(include=["recbole_popprior", "recbole_popprior.*"]) + RESOURCES)
