"""Settings nothing reads: warned about, and never carried whole into logs or checkpoints (issue 19, 2).

RecBole ignores a key it does not know, so a typo (``prior_tua``) or another model's key
(``num_layers`` for SASRec) silently does nothing. The plugin warns: one line per unknown key with
a plugin prefix (with a did-you-mean), one line for the others. And such a key's value, however a
yaml file built it, is kept only as a short summary: nothing reads it, while the config is
written into every checkpoint's metadata, the run log and tensorboard's hyper-parameters.
"""

from __future__ import annotations

import difflib
import functools
import reprlib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from recbole_popprior.yaml_files import RecBoleYamlLoader, expanded_size

#: prefixes of the plugin's settings; an unknown key with one of them is most likely a typo
PLUGIN_PREFIXES = ("prior_", "energy_", "tune_", "synthetic_", "softmax_", "eval_score_", "compare_",
                   "directspec_", "adap_tau_", "ace_", "resn_", "remedy", "sequence_", "tensorboard", "amp_")


@functools.lru_cache(maxsize=1)
def known_plugin_keys() -> frozenset[str]:
    """Every setting the plugin ships a default for: the keys of ``properties/**/*.yaml`` and
    ``dataset_configs/*.yaml`` (read once)."""
    roots = [Path(str(resources.files(package))) for package in ("recbole_popprior.properties",
                                                                 "recbole_popprior.dataset_configs")]
    keys: set[str] = set()
    for root in roots:
        for path in sorted(root.rglob("*.yaml")):
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.load(handle, Loader=RecBoleYamlLoader)
            if isinstance(loaded, dict):
                keys.update(str(key) for key in loaded)
    return frozenset(keys)


#: settings the plugin passes between its own parts (no yaml default)
INTERNAL_KEYS = frozenset({"model", "dataset", "config_files", "run_dir", "popprior_baseline", "local_rank",
                           "world_size", "nproc", "offset", "ip", "port", "checkpoint_dir"})
#: an unknown setting's value longer than this (as text) is kept as a summary
SUMMARY_CHARS = 200


def summarised(value: Any) -> Any:
    """``value`` itself when it is small (its entries and characters, :func:`expanded_size`), else
    a short description of it. Nothing here walks more than a bounded part of the value: an alias
    bomb's ``str`` would be gigabytes."""
    if expanded_size(value, SUMMARY_CHARS) <= SUMMARY_CHARS:
        return value
    entries = expanded_size(value, 10 ** 7)
    many = "more than 10,000,000" if entries > 10 ** 7 else f"{entries:,}"
    return f"<{type(value).__name__} of {many} entries and characters, not kept: {_BOUNDED_REPR.repr(value)[:80]}>"


_BOUNDED_REPR = reprlib.Repr()
_BOUNDED_REPR.maxlevel, _BOUNDED_REPR.maxstring, _BOUNDED_REPR.maxother = 4, 120, 80
_BOUNDED_REPR.maxdict = _BOUNDED_REPR.maxlist = _BOUNDED_REPR.maxtuple = _BOUNDED_REPR.maxset = 8


def other_unknown_keys(keys: list[str], known: set[str], model: str) -> list[str]:
    """One line naming the given settings without a plugin prefix that nothing reads (RecBole
    ignores them), each with a did-you-mean where one is close."""
    if not keys:
        return []
    names = []
    for key in keys:
        close = difflib.get_close_matches(key, sorted(known | known_plugin_keys()), n=1, cutoff=0.8)
        names.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return [f"unknown setting(s) {', '.join(names)} have no effect: neither RecBole, {model} nor the plugin "
            "reads them"]


def unknown_key_warnings(settings: dict[str, Any]) -> list[str]:
    """One line per given setting that starts like a plugin setting but is none of them
    (``prior_tua`` -> did you mean ``prior_tau``?). A warning, not an error: RecBole
    ignores keys it does not know, and models may read keys of their own."""
    known = known_plugin_keys()
    lines = []
    for key in settings:
        if not isinstance(key, str) or key in known or not key.startswith(PLUGIN_PREFIXES):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        lines.append(f"unknown setting {key!r} has no effect{hint}")
    return lines
