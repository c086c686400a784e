"""Fuzz and edge cases for the data readers: every input loads exactly or fails as a one-line DataError."""

import copy
import json
import math
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cappo_pl.data import read_records
from cappo_pl.data.records import Record
from cappo_pl.errors import DataError

# --- an independent reference parse of the schema in cappo_pl/data/readers.py's docstring -------------------------


class _Rejected(Exception):
    pass


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise _Rejected("duplicate key")
    return dict(pairs)


def _no_constants(text):
    raise _Rejected(f"constant {text}")


def _all_finite(value) -> bool:
    stack = [value]  # not recursive: json.loads may have returned something nested close to the recursion limit
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            return False
    return True


def _reference_record(text: str, where: str) -> Record:
    row = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    if not _all_finite(row) or not isinstance(row, dict):
        raise _Rejected("not a finite object")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _Rejected("prompt")
    refs = row.get("references")
    if refs is None:
        refs = []
    elif not isinstance(refs, list) or any(not isinstance(r, str) for r in refs):
        raise _Rejected("references")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, str | int | float):
        raise _Rejected("answer")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "references", "answer")}
    return Record(prompt, refs, None if answer is None else str(answer), extra, where)


def reference_parse(path) -> tuple[list[Record], list[int]]:
    """Return the records of the good lines and the numbers of the bad lines, judging each line on its own."""
    records, bad = [], []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(lineno)
            continue
        if not text.strip():
            continue
        try:
            records.append(_reference_record(text, f"{path}:{lineno}"))
        except Exception:  # any failure of the strict parse is a bad line
            bad.append(lineno)
    return records, bad


# --- a valid file and its mutations ---------------------------------------------------------------------------------

BASE_ROWS = [
    {"prompt": "2+2=", "references": ["4"], "answer": "4", "id": 0},
    {"prompt": "17=", "references": ["9+8", "10+7"], "answer": 17, "meta": {"level": 2, "tags": ["a", "b"]}},
    {"prompt": "x=", "answer": 1.5, "w": -0.25},
    {"prompt": "café ☕", "references": [], "answer": None, "note": "ünï"},
    {"prompt": "y", "references": None, "score": 1e300, "flag": True},
]
WRONG_VALUES = [0, -3, 1.5, "s", "", "  ", ["a"], [1], [], ["a", None], {"k": 1}, None, True, False]
RAW_NUMBERS = [
    "1e999",
    "-1e999",
    "9.5e999",
    "NaN",
    "Infinity",
    "-Infinity",
    "1" * 5000,
    "-" + "9" * 4301,
    "9" * 4300,  # at the limit: loads
    "1e308",
    "-1e-400",  # underflows to -0.0: finite, loads
    "4.9e-324",
    "-0",
    "12345678901234567890",
]
RAW_OBJECTS = [
    '{"k": 1, "k": 2}',
    '{"k": 1, "k": 1}',
    '[{"a": {"b": null, "b": null}}]',
    '{"a": 1, "b": [1, 2, {"c": "d"}]}',  # valid
]


class Raw:
    """A value written verbatim into the JSON text (NaN, 10**5000, duplicate keys...)."""

    def __init__(self, text: str):
        self.text = text


def dump_row(row: dict) -> bytes:
    raws = {}

    def placeholder(value):
        if isinstance(value, Raw):
            raws[f"@@RAW{len(raws)}@@"] = value.text
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(value, dict):
            return {k: placeholder(v) for k, v in value.items()}
        if isinstance(value, list):
            return [placeholder(v) for v in value]
        return value

    text = json.dumps(placeholder(row), ensure_ascii=False)
    for key, raw in raws.items():
        text = text.replace(json.dumps(key), raw)
    return text.encode()


def _deep(rng: random.Random) -> str:
    # Depths stay far from the recursion limit (or far beyond it) so that the reader and the reference, called at
    # different stack depths, agree.
    depth = rng.choice([3, 50, 200, 5000, 100_000])
    if rng.random() < 0.5:
        return "[" * depth + "]" * depth
    return '{"a": ' * depth + "1" + "}" * depth


def mutate_row(rng: random.Random, row: dict) -> tuple[dict, str | None]:
    """Change one row; return it and, for a top-level duplicate key, the text to prepend inside its braces."""
    kind = rng.choice(["wrong_type", "delete", "raw_number", "raw_object", "dup_top", "deep"])
    field = rng.choice(["prompt", "references", "answer", "extra", "nested"])
    if kind == "wrong_type":
        value = copy.deepcopy(rng.choice(WRONG_VALUES))
    elif kind == "raw_number":
        value = Raw(rng.choice(RAW_NUMBERS))
    elif kind == "raw_object":
        value = Raw(rng.choice(RAW_OBJECTS))
    elif kind == "deep":
        value = Raw(_deep(rng))
    elif kind == "delete":
        if row:
            del row[rng.choice(sorted(row))]
        return row, None
    else:  # dup_top: repeat an existing key, with the same or another value
        key = rng.choice(sorted(row)) if row else "prompt"
        value = row.get(key) if rng.random() < 0.5 else rng.choice(WRONG_VALUES)
        return row, f"{json.dumps(key)}: {json.dumps(value)}, "
    if field == "extra":
        row["x"] = value
    elif field == "nested":
        row["meta"] = {"inner": [1, value]}
    elif field == "references" and rng.random() < 0.5:
        row["references"] = ["ok", value]
    else:
        row[field] = value
    return row, None


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    kind = rng.choice(["truncate", "flip", "insert", "delete_syntax", "blank_line", "bom", "crlf", "drop_or_copy"])
    if kind == "truncate":
        return data[: rng.randrange(len(data) + 1)]
    if kind == "flip" and data:
        i = rng.randrange(len(data))
        return data[:i] + bytes([data[i] ^ rng.randrange(1, 256)]) + data[i + 1 :]
    if kind == "insert":
        i = rng.randrange(len(data) + 1)
        return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 3))) + data[i:]
    if kind == "delete_syntax":
        spots = [i for i, b in enumerate(data) if b in b'"{}[],:']
        if spots:
            i = rng.choice(spots)
            return data[:i] + data[i + 1 :]
        return data
    lines = data.split(b"\n")
    i = rng.randrange(len(lines))
    if kind == "blank_line":
        lines.insert(i, rng.choice([b"", b"   ", b" \t ", b"\r"]))
    elif kind == "bom":
        lines[i] = b"\xef\xbb\xbf" + lines[i]
    elif kind == "crlf":
        return data.replace(b"\n", b"\r\n")
    elif rng.random() < 0.5:
        del lines[i]
    else:
        lines.insert(i, lines[i])
    return b"\n".join(lines)


def make_mutant(rng: random.Random) -> bytes:
    rows = copy.deepcopy(BASE_ROWS)
    prefixes: dict[int, str] = {}
    row_mutation = rng.random() < 0.6
    if row_mutation:
        i = rng.randrange(len(rows))
        rows[i], prefix = mutate_row(rng, rows[i])
        if prefix is not None:
            prefixes[i] = prefix
    lines = []
    for i, row in enumerate(rows):
        line = dump_row(row)
        if i in prefixes:
            line = b"{" + prefixes[i].encode() + line[1:]
        lines.append(line)
    data = b"\n".join(lines) + b"\n"
    for _ in range(rng.choice([0, 1, 1, 2]) if row_mutation else rng.choice([1, 1, 2])):
        data = mutate_bytes(rng, data)
    return data


def check_against_reference(path) -> bool:
    """Read ``path`` and compare with the reference parse; return whether it loaded."""
    expected, bad = reference_parse(path)
    try:
        got = read_records(path)
    except DataError as err:
        msg = str(err)
        assert "\n" not in msg and "\r" not in msg, msg
        if bad:
            m = re.match(re.escape(f"{path}:") + r"(\d+): \S", msg)
            assert m, msg
            assert int(m.group(1)) == bad[0], (msg, bad)
        else:
            assert not expected and msg == f"{path}: file has no records", (msg, expected)
        return False
    assert not bad, (bad, got)
    assert got == expected
    return True


def test_fuzzed_jsonl_loads_exactly_or_fails_with_one_line(tmp_path):
    rng = random.Random(1234)
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(dump_row(r) for r in BASE_ROWS) + b"\n")
    assert check_against_reference(path)
    outcomes = []
    for _ in range(200):
        path.write_bytes(make_mutant(rng))
        outcomes.append(check_against_reference(path))
    # Both outcomes must be exercised, or a reader that always fails (or never does) would pass.
    assert sum(outcomes) >= 20 and len(outcomes) - sum(outcomes) >= 20, sum(outcomes)


# --- focused cases ---------------------------------------------------------------------------------------------------

GOOD = b'{"prompt": "2+2=", "references": ["4"], "answer": "4"}'
BAD_LINES = {
    "overflow_float": (b'{"prompt": "a", "answer": 9.5e999}', "field 'answer': non-finite number 9.5e999"),
    "negative_overflow": (b'{"prompt": "a", "x": [1, -1e999]}', "field 'x': non-finite number -1e999"),
    "nan": (b'{"prompt": "a", "answer": NaN}', "field 'answer': non-finite number NaN"),
    "infinity": (b'{"prompt": "a", "answer": Infinity}', "field 'answer': non-finite number Infinity"),
    "minus_infinity_nested": (b'{"prompt": "a", "m": {"k": [-Infinity]}}', "field 'm': non-finite number -Infinity"),
    "non_object_nan": (b"[NaN]", "non-finite number NaN"),
    "dup_top": (b'{"prompt": "a", "answer": "1", "answer": "2"}', "duplicate key 'answer'"),
    "dup_nested": (b'{"prompt": "a", "meta": {"k": 1, "k": 1}}', "field 'meta': duplicate key 'k'"),
    "dup_deep": (b'{"prompt": "a", "meta": [{"x": {"k": 1, "k": 2}}]}', "field 'meta': duplicate key 'k'"),
    "big_int": (b'{"prompt": "a", "answer": ' + b"1" * 5000 + b"}", "field 'answer': integer too large (5000 digits"),
    "deep_nesting": (b'{"prompt": "a", "x": ' + b"[" * 100_000 + b"}", "malformed JSON (nested too deeply)"),
    "bom": (b'\xef\xbb\xbf{"prompt": "a"}', "malformed JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_numbers_and_keys_name_file_line_and_field(case, tmp_path):
    line, what = BAD_LINES[case]
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD + b"\n" + line + b"\n" + GOOD + b"\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: {what}") and "\n" not in msg, msg
    assert len(msg) < 300, msg  # a 5000-digit number is not copied into the message


def test_edge_numbers_that_are_valid_load_as_before(tmp_path):
    lines = [
        b'{"prompt": "a", "answer": 1e308, "x": -0, "y": -1e-400}',
        b'{"prompt": "b", "answer": ' + b"9" * 4300 + b', "z": 4.9e-324}',
        b'{"prompt": "c", "answer": 0.1e1, "m": {"k": [1, {"k": 2}]}, "k": 3}',
    ]
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    recs = read_records(path)
    for i, (rec, line) in enumerate(zip(recs, lines, strict=True), start=1):
        row = json.loads(line)  # what the reader returned before it became strict
        extra = {k: v for k, v in row.items() if k not in ("prompt", "answer")}
        assert rec == Record(row["prompt"], [], str(row["answer"]), extra, f"{path}:{i}")
    assert recs[0].answer == "1e+308" and recs[2].answer == "1.0" and math.copysign(1, recs[0].extra["y"]) == -1


@pytest.mark.parametrize(
    ("column", "values", "what"),
    [
        ("answer", [1.0, float("nan")], "field 'answer': non-finite number nan"),
        ("score", [float("inf"), 0.5], "field 'score': non-finite number inf"),
        ("scores", [[0.5], [1.0, float("-inf")]], "field 'scores': non-finite number -inf"),
    ],
)
def test_parquet_rejects_non_finite_floats(column, values, what, tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a=", "b="], column: values}), path)
    with pytest.raises(DataError) as err:
        read_records(path)
    msg = str(err.value)
    row = 1 if what.endswith(" inf") else 2
    assert msg == f"{path}:{row}: {what}", msg


def test_parquet_finite_floats_load(tmp_path):
    path = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"prompt": ["a=", "b="], "answer": [1.5, -0.0], "s": [[1e300], []]}), path)
    recs = read_records(path)
    assert [r.answer for r in recs] == ["1.5", "-0.0"] and recs[0].extra == {"s": [1e300]}
