"""The user's yaml files (``--config_files``, ``--search-space``): safe, and bounded before use.

PyYAML's safe loader builds no Python objects from tags, but its aliases are references: 271
bytes (``a: &a [x, x, ...]`` and seven levels of ``b: &b [*a, *a, ...]``) load as a few nodes
that stand for some 10^8 values. Nothing fails until something walks the structure (the
checkpoint's JSON metadata, a log line, ``str()``), and then it takes gigabytes and minutes.
:func:`read_yaml_file` refuses, with one line, a file that uses more than :data:`MAX_ALIASES`
aliases, nests deeper than :data:`MAX_DEPTH`, or whose value, every alias expanded, holds more than
:data:`MAX_EXPANDED` entries and characters (and more than a few times the file's own size).
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from recbole_popprior.errors import PopPriorError

MAX_ALIASES = 1000
MAX_DEPTH = 64
MAX_EXPANDED = 1_000_000
#: a file without aliases expands to about its own size: a large literal file is not refused
EXPANSION_PER_BYTE = 4


class RecBoleYamlLoader(yaml.SafeLoader):
    """RecBole's yaml rules (``1e-4`` is a float) on PyYAML's safe loader: RecBole's FullLoader
    builds Python objects from tags (``!!python/name:os.system`` becomes the function)."""


RecBoleYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |\.[0-9_]+(?:[eE][-+][0-9]+)?
                 |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


class _Refused(yaml.YAMLError):
    """The document is over a bound (the message says which)."""


class _Bounds:
    """Counts aliases and nesting while composing, before any value is built (a loader mixin)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Refused(f"it uses more than {MAX_ALIASES} yaml aliases (*name)")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"it nests values more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class BoundedLoader(_Bounds, RecBoleYamlLoader):
    """RecBole's yaml rules, bounded: for config files."""


class BoundedSafeLoader(_Bounds, yaml.SafeLoader):
    """PyYAML's safe rules, bounded: for the search-space file."""


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a yaml error: its problem and where, without PyYAML's context lines."""
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1})" if mark is not None else str(problem)


def expanded_size(value: Any, limit: int) -> int:
    """Entries plus characters of ``value`` with every shared (aliased) part counted as often as it
    is referenced; stops counting once past ``limit``. Linear in the distinct nodes."""
    memo: dict[int, int] = {}

    def size(node: Any, depth: int) -> int:
        if depth > MAX_DEPTH:  # a self-referencing alias (a: &a [*a])
            return limit + 1
        key = id(node)
        if key in memo:
            return memo[key]
        if isinstance(node, dict):
            total = 1
            for k, v in node.items():
                total += size(k, depth + 1) + size(v, depth + 1)
                if total > limit:
                    break
        elif isinstance(node, (list, tuple, set)):
            total = 1
            for item in node:
                total += size(item, depth + 1)
                if total > limit:
                    break
        elif isinstance(node, (str, bytes)):
            total = 1 + len(node)
        else:
            total = 1
        memo[key] = total
        return total

    return size(value, 0)


def read_yaml_file(path: str | os.PathLike, what: str, loader: type = BoundedLoader) -> Any:
    """The value of the yaml file at ``path``, or one :class:`PopPriorError` line naming ``what`` it
    is: missing, a folder, not UTF-8, not yaml, or over the bounds of the module docstring."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise PopPriorError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise PopPriorError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise PopPriorError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PopPriorError(f"{what} {path} is not UTF-8 text (byte {exc.start}: "
                            f"{exc.object[exc.start:exc.start + 1]!r})") from None
    try:
        value = yaml.load(text, Loader=loader)
    except _Refused as exc:
        raise PopPriorError(f"{what} {path} is refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise PopPriorError(f"{what} {path} is not valid yaml: {yaml_problem(exc)}") from None
    except RecursionError:
        raise PopPriorError(f"{what} {path} is refused: it nests values too deeply") from None
    limit = max(MAX_EXPANDED, EXPANSION_PER_BYTE * len(raw))
    if expanded_size(value, limit) > limit:
        raise PopPriorError(f"{what} {path} is refused: its aliases expand it to more than {limit:,} values "
                            "and characters (a 'billion laughs' file?)")
    return value
