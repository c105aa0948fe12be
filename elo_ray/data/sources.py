"""Corpus sources: URIs -> files -> read units, with errors that name the file.

A source (`SourceConfig`) is a local path, directory, glob or s3:// / gs:// URI, read through
fsspec (`elo_ray.storage`). Its files are listed in sorted order and cut into *read units*:
byte ranges of uncompressed jsonl/text files (a unit owns the lines that begin inside it),
row ranges of parquet row groups, or whole compressed files (.gz, .zst, ...: not seekable).
Units are sized from the corpus and `seq_len` only, never from the cluster, so the same spec
cuts the same units everywhere (determinism) while a big file still tokenizes in parallel.
What a unit holds is read by `documents.py`.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from elo_ray import storage
from elo_ray.config import SourceConfig

COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")  # fsspec infers the codec from the suffix
MAX_UNIT_BYTES = 64 << 20
UNITS_PER_LANGUAGE = 256  # enough read tasks to keep a large cluster busy
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


# --------------------------------------------------------------------------- read units


def unit_bytes(language_bytes: int, seq_len: int) -> int:
    """Bytes per read unit: large enough that one tail (< seq_len tokens) per unit stays a small
    fraction (about 1000 sequences' worth of text at >= 1 byte per token), small enough for
    parallelism. Depends on the corpus and seq_len only, so units are the same on any cluster."""
    low = 1000 * seq_len
    return int(min(MAX_UNIT_BYTES, max(low, language_bytes // UNITS_PER_LANGUAGE)))


def units_by_language(sources: list[SourceConfig], seq_len: int) -> dict[str, list[Unit]]:
    """Every source's files cut into units, per language (sorted), in source and file order."""
    files = [(src, list_files(src)) for src in sources]
    out: dict[str, list[Unit]] = {}
    for lang in sorted({s.language for s in sources}):
        mine = [(src, fs) for src, fs in files if src.language == lang]
        size = unit_bytes(sum(f.size for _, fs in mine for f in fs), seq_len)
        out[lang] = [u for src, fs in mine for u in make_units(lang, src, fs, size)]
    return out


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
