"""Reading a checkpoint's tensors by ranged reads: whole, by rows, or in chunks."""

from __future__ import annotations

import fnmatch
import json
import math
import os
from typing import Iterable

import torch

from elo_ray import storage
from elo_ray.hf_checkpoint.format import (
    CHUNK_BYTES,
    INDEX_NAME,
    PICKLE_WEIGHTS,
    WEIGHTS_NAME,
    CheckpointError,
    ShardHeader,
    TensorInfo,
    parse_header,
    read_config,
    tensor_bytes,
)


def _read_exact(f, buf: memoryview, where: str) -> None:
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            raise CheckpointError(f"{where} ends early (truncated file?); rewrite or re-download the checkpoint")
        got += n


def _open_read(uri: str):
    fs, path = storage.filesystem(uri)
    if storage.is_local(fs):
        return open(path, "rb")
    return fs.open(path, "rb", cache_type="none")


class CheckpointReader:
    """A checkpoint's config and tensor directory; reads tensors by ranged reads, lazily.

    With an index file, a shard's header is read only when a caller touches one of its tensors,
    so that reading two layers of a 32-layer model never opens a shard of middle layers. Use as
    a context manager (or call `close`) to close the shard files.
    """

    def __init__(self, uri: str):
        self.uri = os.fspath(uri).rstrip("/") or "/"
        self.config = read_config(self.uri)
        self.files = storage.listdir(self.uri, files_only=True)
        self._shards: dict[str, ShardHeader] = {}
        self._handles: dict[str, object] = {}
        self._chunk: torch.Tensor | None = None
        self._absent: set[str] = set()
        if INDEX_NAME in self.files:
            self.index: bytes | None = storage.read_bytes(storage.join(self.uri, INDEX_NAME))
            try:
                self.weight_map: dict[str, str] = dict(json.loads(self.index)["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{self.uri}/{INDEX_NAME} has no readable weight_map ({e})") from e
        else:
            self.index = None
            self.weight_map = self._map_unindexed()
        self.shard_names = sorted(set(self.weight_map.values()))
        self._absent = set(self.shard_names) - set(self.files)

    def _map_unindexed(self) -> dict[str, str]:
        names = self.files
        files = [WEIGHTS_NAME] if WEIGHTS_NAME in names else [n for n in names if n.endswith(".safetensors")]
        if not files:
            pickled = [n for n in names if any(fnmatch.fnmatch(n, p) for p in PICKLE_WEIGHTS)]
            if pickled:
                raise CheckpointError(
                    f"{self.uri} holds only pickle weights ({', '.join(pickled)}), which elo-ray never "
                    "loads (unpickling runs code). Convert them once in a trusted environment: "
                    "from_pretrained(path).save_pretrained(path) writes *.safetensors"
                )
            raise CheckpointError(
                f"{self.uri} holds no weights (*.safetensors) next to config.json; save the model with save_pretrained"
            )
        weight_map: dict[str, str] = {}
        for name in files:
            for key in self.shard(name).tensors:
                if key in weight_map:
                    raise CheckpointError(
                        f"{self.uri}: tensor {key} is in both {weight_map[key]} and {name}; "
                        f"remove the stray file or add {INDEX_NAME}"
                    )
                weight_map[key] = name
        return weight_map

    # -- the directory

    def names(self) -> list[str]:
        """Every tensor name, in the checkpoint's order."""
        return list(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def check_shards(self, keys: Iterable[str] | None = None) -> None:
        """The shards holding `keys` (default: all) exist and their headers are readable."""
        shards = sorted({self.weight_map[k] for k in keys} if keys is not None else self.shard_names)
        absent = [s for s in shards if s in self._absent]
        if absent:
            raise self._missing(absent)
        for name in shards:
            self.shard(name)

    def _missing(self, shards: list[str]) -> CheckpointError:
        return CheckpointError(
            f"{self.uri}/{INDEX_NAME} names shard(s) {shards} that are missing from the "
            "checkpoint; copy the complete checkpoint"
        )

    def shard(self, name: str) -> ShardHeader:
        """The header of shard file `name`, read on first use; checks the file is complete."""
        if name not in self._shards:
            if name in self._absent:
                raise self._missing([name])
            f = self._handle(name)
            shard = parse_header(f, self._shard_uri(name), name)
            size = f.size if hasattr(f, "size") else os.fstat(f.fileno()).st_size
            if size < shard.size:
                raise CheckpointError(
                    f"{self._shard_uri(name)} holds {size} bytes but its header describes "
                    f"{shard.size}: the file is truncated; copy the complete checkpoint"
                )
            self._shards[name] = shard
        return self._shards[name]

    def info(self, key: str) -> TensorInfo:
        if key not in self.weight_map:
            raise CheckpointError(f"{self.uri} holds no tensor {key!r}")
        shard = self.shard(self.weight_map[key])
        if key not in shard.tensors:
            raise CheckpointError(
                f"{self.uri}/{INDEX_NAME} places {key} in {shard.name}, which does not hold it; "
                "the index does not match the shards"
            )
        return shard.tensors[key]

    def dtype(self, key: str) -> torch.dtype:
        return self.info(key).dtype

    def shape(self, key: str) -> list[int]:
        return list(self.info(key).shape)

    # -- reading tensors

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor, in its stored dtype."""
        info = self.info(key)
        return self.read_flat(info, 0, info.numel).reshape(info.shape)

    def rows(self, key: str, start: int, end: int) -> torch.Tensor:
        """Rows `start..end` of dim 0 (what one FSDP rank holds); a 0-d tensor whole."""
        info = self.info(key)
        if not info.shape:
            return self.read(key)
        row = math.prod(info.shape[1:])
        return self.read_flat(info, start * row, end * row).reshape((end - start, *info.shape[1:]))

    def read_flat(self, info: TensorInfo, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements lo..hi of a tensor, flattened, in its stored dtype (into `out` if given)."""
        if out is None:
            out = torch.empty(hi - lo, dtype=info.dtype)
        if hi > lo:
            f = self._handle(info.shard)
            f.seek(info.start + lo * out.element_size())
            _read_exact(f, tensor_bytes(out), self._shard_uri(info.shard))
        return out

    def read_chunk(self, info: TensorInfo, lo: int, hi: int) -> torch.Tensor:
        """Like `read_flat`, into this reader's reused buffer: valid until the next call."""
        nbytes = (hi - lo) * info.dtype.itemsize
        return self.read_flat(info, lo, hi, self._buffer(nbytes)[:nbytes].view(info.dtype))

    def copy_bytes(self, info: TensorInfo, dst) -> None:
        """Copy a tensor's stored bytes to the file object `dst`, a chunk at a time."""
        f = self._handle(info.shard)
        f.seek(info.start)
        view = tensor_bytes(self._buffer(CHUNK_BYTES))
        start = info.start
        while start < info.end:
            n = min(len(view), info.end - start)
            _read_exact(f, view[:n], self._shard_uri(info.shard))
            dst.write(view[:n])
            start += n

    def _buffer(self, nbytes: int) -> torch.Tensor:
        if self._chunk is None or len(self._chunk) < nbytes:
            self._chunk = torch.empty(max(nbytes, CHUNK_BYTES), dtype=torch.uint8)
        return self._chunk

    def _shard_uri(self, name: str) -> str:
        return storage.join(self.uri, name)

    def _handle(self, name: str):
        if name not in self._handles:
            self._handles[name] = _open_read(self._shard_uri(name))
        return self._handles[name]

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
