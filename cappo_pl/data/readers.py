"""JSONL and Parquet readers that validate every row and name file:line on error.

Schema (one JSON object per line, or one Parquet row):

    {"prompt": "17=", "references": ["9+8", "10+7"], "answer": "17", "<any>": ...}

``prompt`` (non-empty string) is required; ``references`` (list of strings) and ``answer`` (string
or number) are optional; every other field is kept in ``Record.extra`` and passed to the reward.

A row is rejected, anywhere in it, for a non-finite number (``NaN``, ``Infinity``, ``1e999``), an integer
too long for ``int()`` (``sys.get_int_max_str_digits()``) or a duplicate key in a JSON object.
"""

from __future__ import annotations

import json
import math
import numbers
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cappo_pl.data.records import Record
from cappo_pl.errors import DataError

RESERVED = ("prompt", "references", "answer")


def _to_record(row: Any, where: str) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "prompt" not in row:
        raise DataError(f"{where}: missing field 'prompt'")
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise DataError(f"{where}: field 'prompt' is empty")
    refs = row.get("references", [])
    if refs is None:
        refs = []
    if not isinstance(refs, list | tuple) or not all(isinstance(r, str) for r in refs):
        raise DataError(f"{where}: field 'references' must be a list of strings")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, str | int | float):
        raise DataError(f"{where}: field 'answer' must be a string or a number, got {type(answer).__name__}")
    extra = {k: v for k, v in row.items() if k not in RESERVED}
    return Record(prompt, list(refs), None if answer is None else str(answer), extra, where)


class _Problem:
    """Stands in for a number that cannot be kept (non-finite or too long), so decoding can go on to name the field."""

    __slots__ = ()


def _number_text(text: str) -> str:
    # A 5000-digit number would make the message unreadable; the start is enough to find it.
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} chars)"


class _LineDecoder:
    """A strict ``json.loads`` for one line: records every non-finite number, oversized integer and duplicate key.

    The hooks cannot raise at once, because the field name is only known once the whole row is built: each
    problem is kept with the object that holds it, and ``_describe`` finds the top-level key above it.
    """

    def __init__(self) -> None:
        self.problems: list[tuple[object, str]] = []

    def _bad_number(self, message: str) -> _Problem:
        marker = _Problem()
        self.problems.append((marker, message))
        return marker

    def _float(self, text: str) -> float | _Problem:
        value = float(text)
        # 9.5e999 parses to inf: the data cannot mean that, and an inf answer or feature poisons the reward.
        return value if math.isfinite(value) else self._bad_number(f"non-finite number {_number_text(text)}")

    def _constant(self, text: str) -> _Problem:
        # Python's json accepts NaN/Infinity/-Infinity, which are not JSON.
        return self._bad_number(f"non-finite number {text}")

    def _int(self, text: str) -> int | _Problem:
        try:
            return int(text)
        except ValueError:  # over sys.get_int_max_str_digits(): int() refuses to convert it
            digits = len(text.lstrip("-"))
            return self._bad_number(f"integer too large ({digits} digits, the limit is {sys.get_int_max_str_digits()})")

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                self.problems.append((obj, f"duplicate key {key!r}"))
            obj[key] = value
        return obj

    def loads(self, line: str) -> Any:
        self.problems.clear()
        return json.loads(
            line,
            parse_float=self._float,
            parse_int=self._int,
            parse_constant=self._constant,
            object_pairs_hook=self._object,
        )


def _contains(value: Any, target: object) -> bool:
    # Iterative: a row may be nested almost to the recursion limit that json.loads allowed.
    stack = [value]
    while stack:
        item = stack.pop()
        if item is target:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


def _describe(row: Any, holder: object, message: str) -> str:
    """Prefix ``message`` with the top-level field whose value holds ``holder``, when there is one."""
    if isinstance(row, dict) and holder is not row:
        for key, value in row.items():
            if _contains(value, holder):
                return f"field {key!r}: {message}"
    return message


def _first_line(err: BaseException) -> str:
    lines = str(err).splitlines()
    return lines[0] if lines else type(err).__name__


def _read_jsonl(path: Path) -> Iterator[Record]:
    decoder = _LineDecoder()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: line is not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                row = decoder.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: malformed JSON (nested too deeply)") from None
            except Exception as err:  # anything else json raises must still name the line, not print a traceback
                raise DataError(f"{where}: malformed JSON ({type(err).__name__}: {_first_line(err)})") from None
            if decoder.problems:
                holder, message = decoder.problems[0]
                raise DataError(f"{where}: {_describe(row, holder, message)}")
            yield _to_record(row, where)


def _non_finite(value: Any) -> Any:
    """Return the first non-finite float inside ``value`` (lists, structs, maps), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, numbers.Real) and not isinstance(item, numbers.Integral) and not math.isfinite(item):
            return item
    return None


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(err)})") from None
    if "prompt" not in table.column_names:
        raise DataError(f"{path}:1: missing field 'prompt' (columns: {', '.join(table.column_names)})")
    # Parquet has no lines; row numbers are 1-based like lines.
    try:
        rows = table.to_pylist()
    except Exception as err:  # e.g. a struct column with two fields of one name
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(err)})") from None
    for i, row in enumerate(rows, start=1):
        where = f"{path}:{i}"
        for key, value in row.items():
            bad = _non_finite(value)
            if bad is not None:
                raise DataError(f"{where}: field {key!r}: non-finite number {bad}")
        yield _to_record(row, where)


READERS: dict[str, Callable[[Path], Iterator[Record]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_jsonl,
    ".parquet": _read_parquet,
}


def read_records(path: str | Path) -> list[Record]:
    """Read and validate every record of a .jsonl or .parquet file.

    Raises:
        DataError: one line naming file:line and the field at fault.

    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such data file")
    reader = READERS.get(p.suffix.lower())
    if reader is None:
        raise DataError(f"{p}: unsupported data file type {p.suffix!r} (expected .jsonl or .parquet)")
    records = list(reader(p))
    if not records:
        raise DataError(f"{p}: file has no records")
    return records


def check_prompt_lengths(records: list[Record], count_tokens: Callable[[str], int], limit: int) -> None:
    """Raise DataError naming the first record whose prompt has more than ``limit`` tokens."""
    for rec in records:
        n = count_tokens(rec.prompt)
        if n > limit:
            raise DataError(
                f"{rec.source}: field 'prompt' has {n} tokens, more than the limit {limit} (data.max_prompt_tokens)"
            )
