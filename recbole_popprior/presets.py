"""Presets shipped in ``properties/`` (``--config_files=fast``), found without importing torch or RecBole,
so that the command line checks its arguments before anything heavy loads (docs/DESIGN.md §11.2)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def config_file(path: str) -> str:
    """A ``--config_files`` entry: the file when it exists, else a preset of ``properties/`` named ``fast``,
    ``fast.yaml`` or ``properties/fast.yaml`` (so the README's command works from an installed copy too)."""
    candidate = Path(path)
    if os.path.exists(path) or candidate.parent not in (Path("."), Path("properties")) \
            or candidate.stem == "overall" or candidate.suffix not in ("", ".yaml"):
        return path
    shipped = Path(str(resources.files("recbole_popprior.properties").joinpath(candidate.stem + ".yaml")))
    return str(shipped) if shipped.is_file() else path


__all__ = ["config_file"]
