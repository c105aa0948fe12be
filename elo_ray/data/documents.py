"""Read units -> documents: what a document is (text, or a chat's messages), how a record is
parsed, and the count of everything reading skipped.

Reading a unit yields documents and counts what it skipped: rows without the text field or
with empty text (`no_text`), malformed JSON lines (`bad_records`, an error naming file and
line unless `on_bad_record='skip'`), lines that were not valid UTF-8 (`non_utf8`, decoded with
U+FFFD replacement and kept). The source check (`checks.py`) parses its sample with the same
functions, so `validate` and a run agree on what a good record is.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, fields
from typing import Iterator

from elo_ray import storage
from elo_ray.config import ChatDataConfig, DataConfig
from elo_ray.data.sources import COMPRESSED, DataError, Unit

_CHUNK = 1 << 20  # bytes per read call


class StreamKind(str, enum.Enum):
    """What a stream trains on: packed documents (pretrain, align) or one conversation per
    sequence (instruct). The data config's class decides it, once (`StreamKind.of`)."""

    PRETRAIN = "pretrain"
    CHAT = "chat"

    @classmethod
    def of(cls, cfg: DataConfig | ChatDataConfig) -> StreamKind:
        return cls.CHAT if isinstance(cfg, ChatDataConfig) else cls.PRETRAIN


@dataclass
class Counts:
    """What one unit held: documents kept, records skipped (and why), and what tokenizing made."""

    docs: int = 0  # documents (conversations) kept
    no_text: int = 0  # records without the text field, or with empty text
    bad_records: int = 0  # malformed JSON lines or messages
    non_utf8: int = 0  # lines decoded with replacement characters (kept)
    heldout: int = 0  # documents equal to a held-out one (not trained)
    tokens: int = 0  # tokens of the kept documents (chat: of the kept examples)
    sequences: int = 0  # packed sequences (chat: examples)
    dropped: int = 0  # tokens of the unit's tail, shorter than one sequence
    truncated: int = 0  # chat: examples longer than seq_len, cut
    no_assistant: int = 0  # chat: examples without assistant tokens (not trained)

    def __add__(self, other: Counts) -> Counts:
        return Counts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


# --------------------------------------------------------------------------- records


def parse_record(line: str) -> dict:
    """One JSON line as an object; ValueError saying what it was otherwise."""
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError(f"a JSON {type(row).__name__}, not an object")
    return row


def malformed_line(where: str, error: ValueError) -> str:
    """The message for a line that is not a JSON object, at `where` (uri:line)."""
    what = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
    return (f"{where}: malformed JSON line ({what}); fix or remove the line, or set on_bad_record: skip "
            f"to skip and count such lines")


def bad_messages(where: str, field: str) -> str:
    """The message for a chat record whose messages are not {role, content} string pairs."""
    return (f"{where}: {field!r} must be a list of {{role, content}} string pairs; fix the record, or set "
            f"on_bad_record: skip to skip and count such records")


def to_document(value, kind: StreamKind, counts: Counts):
    """The document in a record's field: text (bytes decoded), or a chat's messages list; None
    when there is none (counted as no_text). Raises ValueError for messages of the wrong shape."""
    if kind is StreamKind.CHAT:
        if value is None or value == []:
            counts.no_text += 1
            return None
        if not (isinstance(value, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )):
            raise ValueError("not a list of {role, content} string pairs")
        counts.docs += 1
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            value = value.decode("utf-8", errors="replace")
            counts.non_utf8 += 1
    if not isinstance(value, str) or not value.strip():
        counts.no_text += 1
        return None
    counts.docs += 1
    return value


def decode_line(raw: bytes, counts: Counts) -> str:
    """A line as text: UTF-8, or with replacement characters (counted as non_utf8)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        line = raw.decode("utf-8", errors="replace")
        counts.non_utf8 += 1
    return line.rstrip("\r")


# --------------------------------------------------------------------------- documents of a unit


def read_documents(unit: Unit, counts: Counts, on_bad_record: str,
                   kind: StreamKind = StreamKind.PRETRAIN) -> Iterator[str | list[dict]]:
    """The documents of `unit` (text, or a messages list for chat), counting what it skips."""
    if unit.source.format == "parquet":
        yield from _parquet_documents(unit, counts, on_bad_record, kind)
        return
    for offset, raw in _lines(unit):
        line = decode_line(raw, counts)
        if unit.source.format == "text":
            if line.strip():
                counts.docs += 1
                yield line
            else:
                counts.no_text += 1
            continue
        if not line.strip():
            continue  # blank lines are not records (a trailing newline, a spacer)
        try:
            row = parse_record(line)
        except ValueError as e:
            counts.bad_records += 1
            if on_bad_record == "skip":
                continue
            raise DataError(malformed_line(f"{unit.uri}:{_line_number(unit.uri, offset)}", e)) from None
        doc = _document(row.get(unit.source.text_field), kind, counts, unit, offset, on_bad_record)
        if doc is not None:
            yield doc


def _document(value, kind: StreamKind, counts: Counts, unit: Unit, where: int | str, on_bad_record: str):
    try:
        return to_document(value, kind, counts)
    except ValueError:
        counts.bad_records += 1
        if on_bad_record == "skip":
            return None
        at = f"{unit.uri}:{_line_number(unit.uri, where)}" if isinstance(where, int) else f"{unit.uri} ({where})"
        raise DataError(bad_messages(at, unit.source.text_field)) from None


def _parquet_documents(unit: Unit, counts: Counts, on_bad_record: str, kind: StreamKind) -> Iterator[object]:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(unit.uri)
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        if unit.source.text_field not in pf.schema_arrow.names:
            raise DataError(f"{unit.uri}: parquet file has no column {unit.source.text_field!r}; set text_field")
        table = pf.read_row_group(unit.row_group, columns=[unit.source.text_field])
    values = table.column(0).slice(unit.start, unit.end - unit.start).to_pylist()
    for i, value in enumerate(values):
        where = f"row group {unit.row_group}, row {unit.start + i}"
        doc = _document(value, kind, counts, unit, where, on_bad_record)
        if doc is not None:
            yield doc


def _lines(unit: Unit) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line without its newline) for the lines that begin in [start, end)."""
    fs, path = storage.filesystem(unit.uri)
    compressed = unit.uri.endswith(COMPRESSED)
    with fs.open(path, "rb", compression="infer" if compressed else None) as f:
        pos, skip_partial = unit.start, unit.start > 0
        if skip_partial:  # the line holding byte start-1 belongs to the previous unit
            f.seek(unit.start - 1)
            pos = unit.start - 1
        buf = b""
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            lines = (buf + chunk).split(b"\n")
            buf = lines.pop()
            for line in lines:
                if skip_partial:
                    skip_partial = False
                elif unit.end is not None and pos >= unit.end:
                    return
                else:
                    yield pos, line
                pos += len(line) + 1
        if buf and not skip_partial and (unit.end is None or pos < unit.end):
            yield pos, buf


def _line_number(uri: str, offset: int) -> int:
    """1-based line number of the line starting at byte `offset` (only computed on errors)."""
    fs, path = storage.filesystem(uri)
    n, seen = 1, 0
    with fs.open(path, "rb", compression="infer" if uri.endswith(COMPRESSED) else None) as f:
        while seen < offset:
            chunk = f.read(min(_CHUNK, offset - seen))
            if not chunk:
                break
            n += chunk.count(b"\n")
            seen += len(chunk)
    return n
