"""Corpus sources: URIs -> files -> read units -> documents, with errors that name the file.

A source (`SourceConfig`) is a local path, directory, glob or s3:// / gs:// URI, read through
fsspec (`elo_ray.storage`). Its files are listed in sorted order and cut into *read units*:
byte ranges of uncompressed jsonl/text files (a unit owns the lines that begin inside it),
row ranges of parquet row groups, or whole compressed files (.gz, .zst, ...: not seekable).
Units are sized from the corpus and `seq_len` only, never from the cluster, so the same spec
cuts the same units everywhere (determinism) while a big file still tokenizes in parallel.

Reading a unit yields documents and counts what it skipped: rows without the text field or
with empty text (`no_text`), malformed JSON lines (`bad_records`, an error naming file and
line unless `on_bad_record='skip'`), lines that were not valid UTF-8 (`non_utf8`, decoded with
U+FFFD replacement and kept).
"""

from __future__ import annotations

import concurrent.futures
import json
import posixpath
from dataclasses import dataclass
from typing import Iterator

from elo_ray import storage
from elo_ray.config import SourceConfig

COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")  # fsspec infers the codec from the suffix
_CHUNK = 1 << 20  # bytes per read call
_GLOB_CHARS = "*?["


class DataError(ValueError):
    """Bad sources or records; the message names the URI (and line) and what to change."""


@dataclass(frozen=True)
class SourceFile:
    uri: str  # as the user would write it: local path, or scheme://bucket/key
    size: int


@dataclass(frozen=True)
class Unit:
    """A piece of one file that one Ray Data read task tokenizes."""

    language: str
    source: SourceConfig
    uri: str
    start: int  # byte offset (jsonl/text) or first row (parquet)
    end: int | None  # exclusive; None: to the end of the file
    row_group: int | None = None  # parquet only
    est_bytes: int = 0  # size estimate, for Ray's metadata

    @property
    def where(self) -> str:
        if self.row_group is not None:
            return f"{self.uri} (row group {self.row_group}, rows {self.start}-{self.end})"
        return self.uri if self.start == 0 and self.end is None else f"{self.uri} (bytes {self.start}-{self.end})"


def _display(src_uri: str, fs, path: str) -> str:
    if storage.has_scheme(src_uri):
        return f"{src_uri.split('://', 1)[0]}://{path}"
    return path


def _hidden(path: str) -> bool:
    name = posixpath.basename(path.rstrip("/"))
    return name.startswith((".", "_"))  # .crc, _SUCCESS, _metadata: written next to data by Spark & co


def list_files(src: SourceConfig) -> list[SourceFile]:
    """The files of a source in sorted order; raises `DataError` naming the URI when there are none."""
    try:
        fs, path = storage.filesystem(src.uri)
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    try:
        if any(c in path for c in _GLOB_CHARS):
            found = fs.glob(path, detail=True)
            files = {p: i for p, i in found.items() if i.get("type") == "file" and not _hidden(p)}
            if not files:
                raise DataError(f"{src.uri}: the glob matches no files; check the pattern and the bucket/prefix")
        elif fs.isdir(path):
            found = fs.find(path, detail=True)
            files = {p: i for p, i in found.items() if i.get("type") == "file" and not _hidden(p)}
            if not files:
                raise DataError(f"{src.uri}: the directory holds no data files")
        elif fs.exists(path):
            files = {path: fs.info(path)}
        else:
            raise DataError(f"{src.uri}: no such file or directory; check the path (and, for s3://, the bucket)")
    except DataError:
        raise
    except (OSError, PermissionError, ValueError) as e:
        raise DataError(f"{src.uri}: cannot list: {e}") from None
    return [SourceFile(_display(src.uri, fs, p), int(files[p].get("size") or 0)) for p in sorted(files)]


def _check_file(src: SourceConfig, f: SourceFile) -> str | None:
    """Open the file the way reading will; None when fine, else a problem line."""
    fs, path = storage.filesystem(f.uri)
    try:
        if src.format == "parquet":
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as fh:
                schema = pq.ParquetFile(fh).schema_arrow
            if src.text_field not in schema.names:
                return (f"{f.uri}: parquet file has no column {src.text_field!r} (columns: "
                        f"{', '.join(schema.names)}); set text_field to the column holding the text")
        else:
            with fs.open(path, "rb", compression="infer") as fh:
                fh.read(1)
    except Exception as e:  # noqa: BLE001 - any failure to open is the user's to see
        kind = "not a readable parquet file" if src.format == "parquet" else "cannot be read"
        return f"{f.uri}: {kind}: {type(e).__name__}: {e}"
    return None


def validate_source(src: SourceConfig, *, chat: bool = False) -> list[str]:
    """Problems of one source, each naming its URI; [] when every file opens."""
    if chat and src.format == "text":
        return [f"{src.uri}: chat data must be jsonl or parquet rows with a {src.text_field!r} list, not text"]
    try:
        files = list_files(src)
    except DataError as e:
        return [str(e)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # object stores: one round trip per file
        found = list(pool.map(lambda f: _check_file(src, f), files))
    return [p for p in found if p]


# --------------------------------------------------------------------------- read units


def make_units(language: str, src: SourceConfig, files: list[SourceFile], unit_bytes: int) -> list[Unit]:
    """Cut a source's files into read units of about `unit_bytes`."""
    units = []
    for f in files:
        if f.size == 0:
            continue
        if src.format == "parquet":
            units += _parquet_units(language, src, f, unit_bytes)
        elif f.uri.endswith(COMPRESSED):
            units.append(Unit(language, src, f.uri, 0, None, est_bytes=f.size * 4))
        else:
            n = max(1, round(f.size / unit_bytes))
            cuts = [f.size * i // n for i in range(n + 1)]
            units += [Unit(language, src, f.uri, a, b, est_bytes=b - a) for a, b in zip(cuts, cuts[1:])]
    return units


def _parquet_units(language: str, src: SourceConfig, f: SourceFile, unit_bytes: int) -> list[Unit]:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(f.uri)
    with fs.open(path, "rb") as fh:
        meta = pq.ParquetFile(fh).metadata
    units = []
    for rg in range(meta.num_row_groups):
        g = meta.row_group(rg)
        if g.num_rows == 0:
            continue
        n = max(1, min(g.num_rows, round(g.total_byte_size / unit_bytes)))
        cuts = [g.num_rows * i // n for i in range(n + 1)]
        units += [Unit(language, src, f.uri, a, b, rg, est_bytes=g.total_byte_size // n) for a, b in zip(cuts, cuts[1:])]
    return units


# --------------------------------------------------------------------------- documents


class Counts(dict):
    """Per-unit counters: docs, no_text, bad_records, non_utf8 (and what the tokenizer adds)."""

    def __missing__(self, key):
        return 0


def read_documents(unit: Unit, counts: Counts, on_bad_record: str, chat: bool = False) -> Iterator[object]:
    """The documents of `unit` (str, or a messages list when `chat`), counting what it skips."""
    if unit.source.format == "parquet":
        yield from _parquet_documents(unit, counts, on_bad_record, chat)
        return
    for offset, raw in _lines(unit):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("utf-8", errors="replace")
            counts["non_utf8"] += 1
        line = line.rstrip("\r")
        if unit.source.format == "text":
            if line.strip():
                counts["docs"] += 1
                yield line
            else:
                counts["no_text"] += 1
            continue
        if not line.strip():
            continue  # blank lines are not records (a trailing newline, a spacer)
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as e:
            counts["bad_records"] += 1
            if on_bad_record == "skip":
                continue
            what = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise DataError(
                f"{unit.uri}:{_line_number(unit.uri, offset)}: malformed JSON line ({what}); fix or remove "
                f"the line, or set on_bad_record: skip to skip and count such lines"
            ) from None
        doc = _document(row.get(unit.source.text_field), counts, chat, unit, offset, on_bad_record)
        if doc is not None:
            yield doc


def _document(value, counts: Counts, chat: bool, unit: Unit, where, on_bad_record: str):
    if chat:
        if value is None or value == []:
            counts["no_text"] += 1
            return None
        if not (isinstance(value, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )):
            counts["bad_records"] += 1
            if on_bad_record == "skip":
                return None
            at = f"{unit.uri}:{_line_number(unit.uri, where)}" if isinstance(where, int) else f"{unit.uri} ({where})"
            raise DataError(
                f"{at}: {unit.source.text_field!r} must be a list of {{role, content}} string pairs; fix the "
                f"record, or set on_bad_record: skip to skip and count such records"
            )
        counts["docs"] += 1
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            value = value.decode("utf-8", errors="replace")
            counts["non_utf8"] += 1
    if not isinstance(value, str) or not value.strip():
        counts["no_text"] += 1
        return None
    counts["docs"] += 1
    return value


def _parquet_documents(unit: Unit, counts: Counts, on_bad_record: str, chat: bool) -> Iterator[object]:
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
        doc = _document(value, counts, chat, unit, where, on_bad_record)
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
