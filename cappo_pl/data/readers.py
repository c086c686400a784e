"""JSONL and Parquet readers that validate every row and name file:line on error.

Schema (one JSON object per line, or one Parquet row):

    {"prompt": "17=", "references": ["9+8", "10+7"], "answer": "17", "<any>": ...}

``prompt`` (non-empty string) is required; ``references`` (list of strings) and ``answer`` (string
or number) are optional; every other field is kept in ``Record.extra`` and passed to the reward.
"""

from __future__ import annotations

import json
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


def _read_jsonl(path: Path) -> Iterator[Record]:
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
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            yield _to_record(row, where)


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    if "prompt" not in table.column_names:
        raise DataError(f"{path}:1: missing field 'prompt' (columns: {', '.join(table.column_names)})")
    # Parquet has no lines; row numbers are 1-based like lines.
    for i, row in enumerate(table.to_pylist(), start=1):
        yield _to_record(row, f"{path}:{i}")


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
