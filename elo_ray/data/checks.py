"""Checking sources before any GPU starts (`elo-ray validate`, and the first step of a plan).

Cheap on object storage: every file is listed and its first bytes read (a ranged read), so a
parquet file in a jsonl source, or a .gz name on a file that is not gzip, is named; parquet
files have their footer read (schema: the text column is there and holds text); and the
first file of each jsonl or text source is *sampled*: its first megabyte (more only while
the first line is longer) is parsed with the very functions a run uses (`documents.py`), so
a malformed first line, records without `text_field` (the message names the keys found) or a
text source that holds JSON lines are problems now, not hours into a run.
"""

from __future__ import annotations

import concurrent.futures
import posixpath
from collections import Counter

from elo_ray import storage
from elo_ray.config import ChatDataConfig, DataConfig, SourceConfig
from elo_ray.data.budget import resolve_shares
from elo_ray.data.documents import Counts, StreamKind, bad_messages, decode_line, malformed_line, parse_record, to_document
from elo_ray.data.sources import COMPRESSED, DataError, SourceFile, list_files

SAMPLE_BYTES = 1 << 20  # of the first file of every jsonl/text source
_MAX_SAMPLE_BYTES = 16 << 20  # read on only while the first line is longer than that
_HEAD_BYTES = 16  # enough for every magic number below
_MAGIC = (  # how files begin, whatever their name says
    (b"PAR1", "parquet"),
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bz2"),  # and a block signature 4 bytes on (text may begin with "BZh")
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"PK\x03\x04", "zip"),
)
_CODEC = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz", ".lz4": "lz4"}  # the names of COMPRESSED
_CODEC_PACKAGE = {"zstd": "zstandard", "lz4": "lz4"}  # codecs fsspec reads only with these installed
_WANT = {StreamKind.PRETRAIN: "text", StreamKind.CHAT: "messages (a list of {role, content} strings)"}


def validate_sources(cfg: DataConfig | ChatDataConfig) -> list[str]:
    """One actionable line per problem (naming the URI); [] when every source reads. No Ray."""
    kind = StreamKind.of(cfg)
    problems = [p for src in cfg.sources for p in check_source(src, kind, cfg.on_bad_record)]
    if not cfg.sources:
        problems.append("sources: no sources given; add at least one {uri, language}")
        return problems
    try:
        resolve_shares(cfg, kind)
    except DataError as e:
        problems.append(str(e))
    return problems


def require_valid_sources(cfg: DataConfig | ChatDataConfig) -> dict[str, float]:
    """The asked share of each language; a DataError with the problems `validate_sources` finds."""
    problems = validate_sources(cfg)
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError("data sources have problems:\n" + "\n".join(f"  {p}" for p in problems))
    return resolve_shares(cfg, StreamKind.of(cfg))


def check_source(src: SourceConfig, kind: StreamKind, on_bad_record: str = "error") -> list[str]:
    """Problems of one source, each naming its URI; [] when every file opens and the sample parses."""
    if kind is StreamKind.CHAT and src.format == "text":
        return [f"{src.uri}: chat data must be jsonl or parquet rows with a {src.text_field!r} list, not text"]
    try:
        files = list_files(src)
    except DataError as e:
        return [str(e)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # object stores: one round trip per file
        found = [p for p in pool.map(lambda f: _check_file(src, kind, f), files) if p]
    first = next((f for f in files if f.size > 0), None)
    if found or first is None or src.format == "parquet":
        return found
    return _check_sample(src, kind, on_bad_record, first)


# --------------------------------------------------------------------------- every file


def _check_file(src: SourceConfig, kind: StreamKind, f: SourceFile) -> str | None:
    """The file is what the source's format and its name say; None when it is."""
    fs, path = storage.filesystem(f.uri)
    try:
        head = fs.cat_file(path, start=0, end=min(f.size, _HEAD_BYTES)) if f.size else b""
    except Exception as e:  # noqa: BLE001 - any failure to read is the user's to see
        return f"{f.uri}: cannot be read: {type(e).__name__}: {e}"
    if src.format == "parquet":
        return _check_parquet(src, kind, f, head)
    magic = _magic(head)
    codec = _CODEC.get(posixpath.splitext(f.uri)[1])
    if magic == "parquet":
        return f"{f.uri}: is a parquet file, but the source's format is {src.format}; set format: parquet"
    if codec is not None and magic != codec:
        what = f"{magic}-compressed" if magic else "not compressed"
        return f"{f.uri}: its name ends in {posixpath.splitext(f.uri)[1]} but it is {what}; rename the file to what it holds"
    if codec is None and magic is not None:
        ext = next((e for e, c in _CODEC.items() if c == magic), None)
        fix = f"add {ext} to its name so that it is decompressed" if ext else f"unpack the {magic} archive"
        return f"{f.uri}: is {magic}-compressed, but its name does not say so; {fix}"
    if codec in _CODEC_PACKAGE:
        try:
            __import__(_CODEC_PACKAGE[codec])
        except ImportError:
            return f"{f.uri}: {codec} files need the {_CODEC_PACKAGE[codec]} package; pip install {_CODEC_PACKAGE[codec]}"
    return None


def _check_parquet(src: SourceConfig, kind: StreamKind, f: SourceFile, head: bytes) -> str | None:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(f.uri)
    try:
        with fs.open(path, "rb") as fh:
            schema = pq.ParquetFile(fh).schema_arrow
    except Exception as e:  # noqa: BLE001 - any failure to open is the user's to see
        hint = "" if _magic(head) == "parquet" else _format_hint(head)
        return f"{f.uri}: not a readable parquet file: {type(e).__name__}: {e}{hint}"
    if src.text_field not in schema.names:
        return (f"{f.uri}: parquet file has no column {src.text_field!r} (columns: "
                f"{', '.join(schema.names)}); set text_field to the column holding the text")
    column = schema.field(src.text_field).type
    if not _holds(kind, column):
        fitting = [n for n in schema.names if _holds(kind, schema.field(n).type)]
        fix = f"set text_field: {fitting[0]}" if fitting else f"set text_field to the column holding the {_WANT[kind]}"
        return f"{f.uri}: parquet column {src.text_field!r} holds {column}, not {_WANT[kind]}; {fix}"
    return None


def _holds(kind: StreamKind, column) -> bool:
    """A parquet column of this type holds documents of `kind`."""
    import pyarrow as pa

    if pa.types.is_dictionary(column):
        column = column.value_type
    if kind is StreamKind.PRETRAIN:
        return pa.types.is_string(column) or pa.types.is_large_string(column) or pa.types.is_binary(column) \
            or pa.types.is_large_binary(column) or getattr(pa.types, "is_string_view", lambda _: False)(column)
    if not (pa.types.is_list(column) or pa.types.is_large_list(column)) or not pa.types.is_struct(column.value_type):
        return False
    names = {column.value_type.field(i).name for i in range(column.value_type.num_fields)}
    return {"role", "content"} <= names


def _magic(head: bytes) -> str | None:
    name = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if name == "bz2" and head[4:10] != b"1AY&SY":
        return None
    return name


def _format_hint(head: bytes) -> str:
    if head.lstrip()[:1] == b"{":
        return "; it begins like JSON lines: set format: jsonl"
    return ""


# --------------------------------------------------------------------------- the sample


def _sample_lines(f: SourceFile) -> list[tuple[int, bytes]]:
    """(line number, line) of the complete lines in the first SAMPLE_BYTES of the file, decompressed."""
    fs, path = storage.filesystem(f.uri)
    compressed = f.uri.endswith(COMPRESSED)
    data, ended = b"", False
    # Aligned blocks of the sample's size: ranged reads of the sample, not a download of the file.
    with fs.open(path, "rb", block_size=SAMPLE_BYTES, cache_type="blockcache",
                 compression="infer" if compressed else None) as fh:
        while len(data) < SAMPLE_BYTES or (b"\n" not in data and len(data) < _MAX_SAMPLE_BYTES):
            chunk = fh.read(SAMPLE_BYTES)
            if not chunk:
                ended = True
                break
            data += chunk
    lines = data.split(b"\n")
    if not ended:
        lines.pop()  # cut by the sample's end
    return list(enumerate(lines, start=1))


def _check_sample(src: SourceConfig, kind: StreamKind, on_bad_record: str, f: SourceFile) -> list[str]:
    try:
        lines = [(n, decode_line(raw, Counts())) for n, raw in _sample_lines(f)]
    except Exception as e:  # noqa: BLE001 - a file that does not decompress is the user's to see
        return [f"{f.uri}: cannot be read: {type(e).__name__}: {e}"]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        return []
    records, malformed = [], []
    for n, line in lines:
        try:
            records.append((n, parse_record(line)))
        except ValueError as e:
            malformed.append((n, e))
    if src.format == "text":
        if not malformed:
            keys = sorted({k for _, r in records for k in r})
            return [f"{f.uri}: every line of its first {len(lines)} is a JSON object (keys {keys}); for JSON lines "
                    f"set format: jsonl and text_field to the key holding the text"]
        return []
    if malformed and (on_bad_record == "error" or not records):
        n, e = malformed[0]
        hint = "" if records else "; no line of the sample is a JSON object: if the file holds one document per line, set format: text"
        return [malformed_line(f"{f.uri}:{n}", e) + hint]
    return _check_field(src, kind, on_bad_record, f, records)


def _check_field(src: SourceConfig, kind: StreamKind, on_bad_record: str, f: SourceFile,
                 records: list[tuple[int, dict]]) -> list[str]:
    """The records hold `text_field`, and it holds documents of `kind`."""
    name = src.text_field
    having = [(n, r[name]) for n, r in records if name in r]
    if not having:
        keys = sorted({k for _, r in records for k in r})
        guess = _guess_field(kind, [r for _, r in records])
        fix = f"set text_field: {guess}" if guess else f"set text_field to the key holding the {_WANT[kind]}"
        return [f"{f.uri}: records have keys {keys[:20]}, not {name!r} (first {len(records)} records); {fix}"]
    usable, wrong = 0, Counter()  # wrong: type names of values that are neither documents nor empty
    for n, value in having:
        try:
            if to_document(value, kind, Counts()) is not None:
                usable += 1
            elif value is not None and value != [] and not isinstance(value, (str, bytes)):
                wrong[type(value).__name__] += 1
        except ValueError:  # chat messages of the wrong shape: a run stops at this record
            if on_bad_record == "error":
                return [bad_messages(f"{f.uri}:{n}", name)]
            wrong[type(value).__name__] += 1
    if usable == 0 and wrong:
        guess = _guess_field(kind, [r for _, r in records])
        fix = f"set text_field: {guess}" if guess and guess != name else f"set text_field to the key holding the {_WANT[kind]}"
        return [f"{f.uri}: {name!r} holds {', '.join(sorted(wrong))} values, not {_WANT[kind]} (first {len(records)} "
                f"records); {fix}"]
    return []


def _guess_field(kind: StreamKind, rows: list[dict]) -> str | None:
    """The key that most looks like it holds the documents: the longest texts, or message lists."""
    score = Counter()
    for row in rows:
        for key, value in row.items():
            try:
                doc = to_document(value, kind, Counts())
            except ValueError:
                continue
            if doc is not None:
                score[key] += len(doc) if kind is StreamKind.PRETRAIN else 1
    return score.most_common(1)[0][0] if score else None
