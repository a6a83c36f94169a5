"""One reader for the CSV tables a user gives: manifests (``register``, ``dataset build``, batch ``infer``,
``report study``), diagnosis labels and patch tables.

:func:`read_table` reads every cell as text, as written: a subject named ``NA``, ``nan`` or ``0001`` keeps its
name, and an empty cell is ``""``. A command converts the number columns it uses with :func:`numbers`, which
refuses a cell that is not a number, naming its line. The reader also

* refuses a row with more non-empty cells than the header (pandas took the header's first column for an index
  and shifted every column by one: the MR read as the subject, the CT as the MR);
* drops the spaces around names and cells (``subject, mr, ct`` as typed by hand), empty cells past the header's
  (a trailing comma) and rows with no cell filled in (blank lines, ``,,,`` lines of a spreadsheet);
* checks the columns a command requires, listing the ones the table has, and refuses a table with no rows;
* with ``subjects=True``, refuses empty, ``.`` and ``..`` subject names and a name given twice (each subject's
  outputs go to a folder of that name, or its rows join another table by it).

Each row's line in the file (a quoted cell may span lines) is kept for messages: :func:`line_numbers`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable

import pandas as pd

from ..errors import UserError
from .atomic import existing_file

NO_NUMBER = frozenset({"", "NA", "N/A", "n/a", "NaN", "nan", "-nan", "-NaN", "null", "NULL", "None", "#N/A", "<NA>"})
"""Cells of a number column that mean "no value" (NaN): empty, and the missing-value spellings pandas reads."""

_SHOWN = 10  # lines or names listed in a message


def _shown(items: list) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(map(str, items[:_SHOWN])) + more


def _lines(at: list[int]) -> str:
    """``2 and 4``; ``2, 3 and 4``; ``2, 3, 4, 5 and 60 more``."""
    if len(at) > 4:
        return f"{', '.join(map(str, at[:4]))} and {len(at) - 4} more"
    return f"{', '.join(map(str, at[:-1]))} and {at[-1]}"


def read_table(path, what: str = "manifest", *, required: Iterable[str] = (), subjects: bool = False,
               error: type[UserError] = UserError) -> pd.DataFrame:
    """The CSV file ``path`` as a DataFrame of text cells (see the module's notes), or ``error`` saying what is
    wrong with it. ``what`` names the file in messages (``manifest``, ``labels``, ...); ``required``: the columns
    it must have; ``subjects``: check the names of a ``subject`` column, when there is one (require it with
    ``required``)."""
    path = existing_file(path, what, error)
    header, rows, lines = _parse(path, what, error)
    df = pd.DataFrame(rows, columns=header, dtype=str)
    df.attrs["lines"] = lines
    missing = [c for c in required if c not in df.columns]
    if missing:
        hint = " (its cells are separated by semicolons: ctsma reads commas)" \
            if len(header) == 1 and ";" in header[0] else ""
        raise error(f"{what} {path.name} lacks column(s) {', '.join(missing)} (has: {', '.join(header)}){hint}")
    if df.empty:
        raise error(f"{what} {path.name} has no rows")
    if subjects and "subject" in df.columns:
        check_subject_names(df, f"{what} {path.name}", error)
    return df


def _parse(path: Path, what: str, error) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, rows (cells stripped, as many as the header's) and each row's first line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            # skipinitialspace: a quoted cell after ', ' (a table typed by hand) is read as quoted, not as text
            # holding its quotes (or split at its commas)
            reader = csv.reader(f, strict=True, skipinitialspace=True)
            header = [c.strip() for c in next(reader, [])]
            if not any(header):
                raise error(f"{what} {path.name} is not a readable CSV table: it is empty (the first line names the "
                            "columns)")
            header = [c or f"Unnamed: {i}" for i, c in enumerate(header)]  # pandas' name for a nameless column
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise error(f"{what} {path.name} names column(s) {', '.join(twice)} more than once")
            n = len(header)
            rows, lines, end = [], [], reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                cells = [c.strip() for c in row]
                if not any(cells):  # a blank line, or a spreadsheet's line of commas
                    continue
                if any(cells[n:]):
                    raise error(f"{what} {path.name}: line {start} has {len(row)} cells, the header {n} "
                                f"({', '.join(header)}); a cell with a comma in it must be quoted, and every row "
                                "needs the header's columns")
                rows.append(cells[:n] + [""] * (n - len(cells)))
                lines.append(start)
    except UserError:
        raise
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path.name} is not a readable CSV table: not UTF-8 text ({exc.reason} at byte "
                    f"{exc.start})") from None
    except csv.Error as exc:
        raise error(f"{what} {path.name} is not a readable CSV table: line {reader.line_num}: {exc} (an unclosed "
                    "quote?)") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return header, rows, lines


def line_numbers(df: pd.DataFrame) -> list[int]:
    """Each row's line in the file :func:`read_table` read it from (by position); for a table from elsewhere, or
    one whose rows were since dropped or reordered, the row's position + 2 (the line it would have under a
    header)."""
    lines = df.attrs.get("lines")
    return list(lines) if isinstance(lines, list) and len(lines) == len(df) else list(range(2, len(df) + 2))


def check_subject_names(df: pd.DataFrame, what: str, error: type[UserError] = UserError) -> None:
    """Refuse empty, ``.`` and ``..`` names in the ``subject`` column, and a name given twice."""
    names = [str(v).strip() for v in df["subject"]]
    lines = line_numbers(df)
    unnamed = [line for line, v in zip(lines, names) if v in ("", ".", "..")]
    if unnamed:
        raise error(f"{what}: line(s) {_shown(unnamed)} have no subject name")
    seen: dict[str, list[int]] = {}
    for line, v in zip(lines, names):
        seen.setdefault(v, []).append(line)
    # one entry per name with its lines: a patch table given as labels listed 'P0001 (lines 2 and 3), P0001 (lines 2
    # and 4), ...' ten times over and named no other subject
    twice = [f"{v} (lines {_lines(at)})" for v, at in seen.items() if len(at) > 1]
    if twice:
        many = max(len(at) for at in seen.values()) > 4
        raise error(f"{what} repeats subject name(s): {_shown(twice)}"
                    + ("; it must have one row per subject (is it a table of patches rather than of knees?)"
                       if many else ""))


def numbers(df: pd.DataFrame, column: str, what: str, error: type[UserError] = UserError) -> pd.Series:
    """The column as numbers, as pandas would have read them (int64 when every cell is a whole number, else
    float64): a cell of :data:`NO_NUMBER` is NaN; any other cell that is not a number is refused, naming its
    line(s) and value. ``what`` names the table in the message (``manifest m.csv``)."""
    col = df[column]
    values = pd.to_numeric(col, errors="coerce")
    if values.isna().any():
        text = col.astype(str).str.strip()
        bad = values.isna() & col.notna() & ~text.isin(NO_NUMBER)
        if bad.any():
            where = [f"line {line}: {v!r}" for line, v, b in zip(line_numbers(df), text, bad) if b]
            raise error(f"{what}: the {column} column must hold numbers (or be empty); {_shown(where)}")
    return values


_YES_NO = {"true": "1", "false": "0", "yes": "1", "no": "0"}


def yes_no_numbers(column: pd.Series) -> pd.Series:
    """A 0/1 column (``oa``) as numbers, with a spreadsheet's TRUE/FALSE and yes/no (any letter case) read as 1/0;
    NaN where a cell is neither (the caller says what it needs)."""
    said = column.astype(str).str.strip().str.casefold()
    return pd.to_numeric(said.map(lambda v: _YES_NO.get(v, v)), errors="coerce")


_SIDES = {"L": "L", "LEFT": "L", "LT": "L", "R": "R", "RIGHT": "R", "RT": "R"}


def side_letter(value) -> str | None:
    """A knee side as ``"L"`` or ``"R"``: ``L``/``R``, ``left``/``right`` or ``Lt``/``Rt``, in any letter case; None
    for no side (None, NaN or an empty cell: then it is read from the anatomy). Anything else is a
    :class:`UserError`: a side that was given but cannot be read is not quietly ignored, nor read by its first letter
    (``Rubbish`` was a right knee, ``LR`` a left one)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip().upper()
    if not text:
        return None
    if text in _SIDES:
        return _SIDES[text]
    raise UserError(f"knee side must be L or R (or left/right), not {value!r}")
