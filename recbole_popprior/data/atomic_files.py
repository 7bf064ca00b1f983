"""Atomic files as RecBole 1.2.1 reads them, with one line for the files it cannot read (DESIGN.md §5).

RecBole's reader (``Dataset._load_feat``: ``pd.read_csv(engine="python", usecols=...)``) fails on
a bad file with messages about its internals ("too many values to unpack", "Unable to convert
column ...") or, for a row without the header's fields, not at all: pandas keeps the first
fields of a longer row, pads a shorter one (:mod:`~recbole_popprior.data.row_shapes`). Here:

- :func:`check_header` reads the ``name:type`` header (one line, before any reader runs);
- :func:`check_id_columns` refuses an ``.inter`` header without the user or item id column (or
  with one that is not a token), which RecBole would report as an ``AttributeError`` later;
- :class:`AtomicFileGuard`, the outermost ``_load_feat``, runs both and refuses an ``.inter``
  file without data rows;
- :class:`RecBoleReaderGuard` sits right above RecBole's reader (below the fast loader, which
  falls back to it): it logs one WARNING for the rows pandas silently truncates, pads or skips,
  and turns the reader's ``ValueError`` into one line (with the first cell that is not a number,
  :func:`first_bad_number`).
"""

from __future__ import annotations

import locale
import logging
import os

from pandas._libs.parsers import STR_NA_VALUES
from recbole.utils import FeatureSource, FeatureType

from recbole_popprior.data.row_shapes import header_line, scan_rows
from recbole_popprior.errors import PopPriorError

_TYPES = ", ".join(t.value for t in FeatureType)
BOM = "\ufeff"


def _show(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_header(filepath: str, separator: str, encoding: str | None) -> list[tuple[str, FeatureType]]:
    """The ``(name, type)`` columns of an atomic file's header, or one :class:`PopPriorError` line
    for what RecBole's reader would trip on: an empty file, a header that is not text in
    ``encoding``, a column that is not ``name:type``, a type RecBole does not know."""
    name = os.path.basename(filepath)
    raw, end = header_line(filepath)  # RecBole's text-mode readline()[:-1]: \n, \r\n and \r end a line
    if not end:
        raise PopPriorError(f"{filepath} is empty: an atomic file starts with a header line of name:type columns")
    try:
        head = raw.decode(encoding or locale.getpreferredencoding(False))
    except (UnicodeDecodeError, LookupError) as exc:
        raise PopPriorError(f"{filepath}: the header is not {encoding or 'locale'}-encoded text "
                            f"({getattr(exc, 'reason', exc)}); set encoding to the file's encoding") from None
    if end == len(raw):  # no line end: RecBole's readline()[:-1] would cut the header's last character
        raise PopPriorError(no_rows_message(filepath))
    columns = head.split(separator)
    fields = []
    for column in columns:
        parts = column.split(":")
        if len(parts) != 2 or not parts[0]:
            hint = ""
            if len(columns) == 1 and any(c in head for c in ",; |"):
                hint = (f"; is the file separated by field_separator {separator!r}? RecBole atomic files "
                        "are tab-separated")
            raise PopPriorError(f"{name}: header column {_show(column)} is not name:type{hint}")
        try:
            fields.append((parts[0], FeatureType(parts[1])))
        except ValueError:
            raise PopPriorError(f"{name}: column {parts[0]!r} has unknown type {parts[1]!r} "
                                f"(RecBole's types: {_TYPES})") from None
    return fields


def first_bad_number(filepath: str, separator: str, encoding: str | None, columns: list[str],
                     wanted: set[str], shift: int = 0) -> tuple[int, str, str] | None:
    """``(line number, column, cell)`` of the first cell of a ``float`` column in ``wanted`` that
    Python cannot read as a number (pandas' NA strings and empty cells are missing values);
    ``shift``: the fields pandas reads as each row's index (:mod:`.row_shapes`)."""
    index = [k + shift for k, column in enumerate(columns) if column in wanted]
    with open(filepath, encoding=encoding or locale.getpreferredencoding(False), errors="replace") as handle:
        handle.readline()
        for number, line in enumerate(handle, start=2):
            cells = line.rstrip("\n").split(separator)
            for k in index:
                cell = cells[k] if k < len(cells) else ""
                if cell.strip() in STR_NA_VALUES or not cell.strip():
                    continue
                try:
                    float(cell)
                except ValueError:
                    return number, columns[k - shift], cell
    return None


def bad_number_message(filepath: str, separator: str, encoding: str | None,
                       fields: list[tuple[str, FeatureType]], shift: int = 0) -> str | None:
    """The one line for the file's first ``float`` cell that is not a number, or ``None``."""
    columns = [field for field, _ in fields]
    floats = {field for field, ftype in fields if ftype == FeatureType.FLOAT}
    bad = first_bad_number(filepath, separator, encoding, columns, floats, shift) if floats else None
    if bad is None:
        return None
    line, column, cell = bad
    return f"{os.path.basename(filepath)} line {line}: column {column} holds floats, got {_show(cell)}"


def check_id_columns(filepath: str, fields: list[tuple[str, FeatureType]], id_fields: dict[str, str | None],
                     load_col: set | None) -> None:
    """The ``.inter`` header names the id columns RecBole needs, as tokens, and they are loaded.

    ``id_fields``: setting -> field (``USER_ID_FIELD`` -> ``user_id``). RecBole fails much later on
    each of these, with ``AttributeError: 'NoneType' object has no attribute ...``.
    """
    name = os.path.basename(filepath)
    types = dict(fields)
    shown = ", ".join(f"{f}:{t.value}" for f, t in fields)
    for setting, field in id_fields.items():
        if not field:
            continue
        if field not in types:
            if fields and fields[0][0] == BOM + field:
                raise PopPriorError(f"{name} starts with a byte-order mark (BOM), which RecBole's reader keeps in its "
                                    f"first column's name ({fields[0][0]!r}, not {field!r}): save the file without "
                                    "it, or set encoding: utf-8-sig")
            raise PopPriorError(f"{name} has no column {field!r} ({setting}); its columns are {shown}: name them in "
                                f"{setting} (and load_col), or rename the header's columns")
        if types[field] != FeatureType.TOKEN:
            raise PopPriorError(f"{name}: the id column {field!r} ({setting}) must be of type token, got "
                                f"{types[field].value}")
        if load_col is not None and field not in load_col:
            raise PopPriorError(f"load_col does not load {field!r} ({setting}) from {name}: add it to load_col's "
                                "inter list")


def warn_irregular_rows(filepath: str, separator: str, n_columns: int) -> None:
    """One WARNING for the rows RecBole's reader silently truncates, pads or skips (:mod:`.row_shapes`)."""
    shapes = scan_rows(filepath, separator, n_columns)
    if shapes is not None and shapes.irregular:
        logging.getLogger().warning(shapes.message(os.path.basename(filepath)))


def inter_id_fields(config) -> dict[str, str | None]:
    """The id columns an ``.inter`` file must have: ``USER_ID_FIELD`` and ``ITEM_ID_FIELD``."""
    return {key: config[key] for key in ("USER_ID_FIELD", "ITEM_ID_FIELD")}


class AtomicFileGuard:
    """Outermost ``_load_feat``: the header is checked before any reader runs, an ``.inter``
    header must hold the id columns, and an ``.inter`` file without data rows is refused (RecBole
    would only say, after filtering, that "some feat is empty")."""

    def _load_feat(self, filepath, source):
        fields = check_header(filepath, self.config["field_separator"], self.config["encoding"])
        if source == FeatureSource.INTERACTION:
            load_col, _ = self._get_load_and_unload_col(source)
            check_id_columns(filepath, fields, inter_id_fields(self.config), load_col)
        feat = super()._load_feat(filepath, source)
        if source == FeatureSource.INTERACTION and feat is not None and len(feat) == 0:
            raise PopPriorError(no_rows_message(filepath))
        return feat


class RecBoleReaderGuard:
    """Right above RecBole's ``_load_feat`` (below the fast loader, which falls back to it): one
    WARNING for the rows pandas reads without the header's width, and its ``ValueError`` as one
    line naming the file, the line and the cell."""

    def _load_feat(self, filepath, source):
        separator, encoding = self.config["field_separator"], self.config["encoding"]
        fields = check_header(filepath, separator, encoding)
        try:
            feat = super()._load_feat(filepath, source)
        except ValueError as exc:  # pandas' parse and conversion errors (UnicodeDecodeError too)
            shapes = None if isinstance(exc, UnicodeDecodeError) else scan_rows(filepath, separator, len(fields))
            message = None if isinstance(exc, UnicodeDecodeError) else bad_number_message(
                filepath, separator, encoding, fields, shapes.shift if shapes else 0)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if fields and fields[0][0].startswith(BOM) and "Usecols do not match" in reason:
                reason = (f"it starts with a byte-order mark (BOM), which RecBole's reader keeps in the first "
                          f"column's name ({fields[0][0]!r}): save it without, or set encoding: utf-8-sig")
            raise PopPriorError(message or f"cannot read {os.path.basename(filepath)}: {reason}") from None
        if feat is not None:
            warn_irregular_rows(filepath, separator, len(fields))
        return feat


def no_rows_message(filepath: str) -> str:
    return f"{os.path.basename(filepath)} has a header but no data rows"
