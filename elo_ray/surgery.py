"""Model surgery on Hugging Face causal-LM checkpoints: detach, merge, chat vector.

A checkpoint is a directory or fsspec URI (`/ckpt/llama`, `s3://bucket/llama`) holding
`config.json` and safetensors weights, one file or shards with `model.safetensors.index.json`.

- `detach` builds the ELO model (paper step 1): an ordinary model of the same class holding the
  original embedding, the chosen decoder layers in order, the final norm and the head. It reads
  only those tensors; the middle layers are never read.
- `merge` writes the ELO model's layers back over the base's (step 2).
- `chat_vector` adds `instruct - base` to a target model (step 4).

Merge and chat vector never hold a model, nor even a whole tensor: they copy the base's (or
target's) shard files one by one, keeping each file's safetensors header byte for byte, and
stream every tensor's data in chunks of `_CHUNK_BYTES` through one reused buffer per input.
Tensors are read with ranged reads through fsspec file objects, so a remote checkpoint is
never downloaded.

Outputs are written into a staging directory (prefix) beside `out` and moved into place only
when complete, so a failed run leaves nothing at `out`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import re
import shutil
import struct
import tempfile
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import transformers

from elo_ray import storage

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"
# Files that travel with a checkpoint besides config and weights: tokenizer and generation.
SIDE_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
SUPPORTED = "llama, mistral, qwen2, qwen3, gemma2, gemma3_text"
# Top-level config lists that are never per-layer even when their length happens to match.
_NOT_PER_LAYER = {"architectures", "bos_token_id", "eos_token_id", "pad_token_id", "elo_layers"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Streaming granularity: merge and chat vector hold about one such chunk per input checkpoint.
_CHUNK_BYTES = 8 << 20

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


class SurgeryError(ValueError):
    """A checkpoint, layer set or output path that surgery cannot use; says what to change."""


# ---------------------------------------------------------------------------------------------
# Public helpers


def validate_layers(num_hidden_layers: int, layers: Iterable[int]) -> tuple[int, ...]:
    """`layers` as non-negative indices into a model of `num_hidden_layers` decoder layers.

    Negative indices count from the end (-1 is the last layer). The result must be distinct
    and increasing, the order in which the ELO model runs them.
    """
    if isinstance(layers, (int, str, bytes)) or not isinstance(layers, Iterable):
        raise SurgeryError(f"layers must be a sequence of layer indices such as (0, -1), got {layers!r}")
    given = list(layers)
    if not given:
        raise SurgeryError("layers is empty: name at least one decoder layer to detach, e.g. (0, -1)")
    n = num_hidden_layers
    out: list[int] = []
    for raw in given:
        if isinstance(raw, bool) or not isinstance(raw, int):
            try:
                raw = int(raw.__index__())  # numpy integers
            except AttributeError:
                raise SurgeryError(f"layer index {raw!r} is not an integer; layers look like (0, -1)") from None
        if not -n <= raw < n:
            raise SurgeryError(
                f"layer index {raw} is out of range for a model with {n} decoder layers; "
                f"use 0..{n - 1} or -{n}..-1"
            )
        idx = raw % n
        if idx in out:
            raise SurgeryError(
                f"layer {idx} is listed twice in layers={tuple(given)}; list each layer once"
            )
        out.append(idx)
    if out != sorted(out):
        raise SurgeryError(
            f"layers must be in increasing order (the order the ELO model runs them): "
            f"got {tuple(given)} = {tuple(out)}; use {tuple(sorted(out))}"
        )
    return tuple(out)


def checkpoint_config(checkpoint: str) -> transformers.PretrainedConfig:
    """The model config stored in `checkpoint`'s `config.json`."""
    checkpoint = os.fspath(checkpoint)
    if not storage.exists(checkpoint):
        raise SurgeryError(f"checkpoint {checkpoint} does not exist; give a directory or URI holding config.json")
    uri = storage.join(checkpoint, CONFIG_NAME)
    try:
        data = json.loads(storage.read_text(uri))
    except storage.StorageError:
        raise SurgeryError(
            f"no {CONFIG_NAME} in {checkpoint}; a Hugging Face checkpoint holds config.json and "
            "*.safetensors (write one with save_pretrained)"
        ) from None
    except json.JSONDecodeError as e:
        raise SurgeryError(f"{uri} is not valid JSON ({e}); rewrite it with config.save_pretrained") from e
    model_type = data.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise SurgeryError(
            f"{uri} has model_type={model_type!r}, which this transformers "
            f"{transformers.__version__} does not know; supported: {SUPPORTED}"
        )
    return transformers.CONFIG_MAPPING[model_type].from_dict(data)


# ---------------------------------------------------------------------------------------------
# Safetensors, a tensor (or a chunk of one) at a time, through plain or fsspec file objects


@dataclass(frozen=True)
class _TensorInfo:
    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the shard file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class _Shard:
    name: str
    header: bytes  # the 8-byte length and the JSON header, exactly as in the file
    tensors: dict[str, _TensorInfo]  # in file order
    size: int


def _open_read(uri: str):
    fs, path = storage.filesystem(uri)
    if storage.is_local(fs):
        return open(path, "rb")
    return fs.open(path, "rb", cache_type="none")


def _open_write(uri: str):
    fs, path = storage.filesystem(uri)
    if storage.is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return open(path, "wb")
    return fs.open(path, "wb")


def _read_exact(f, buf: memoryview, where: str) -> None:
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            raise SurgeryError(f"{where} ends early (truncated file?); rewrite or re-download the checkpoint")
        got += n


def _read_shard_header(f, uri: str, name: str) -> _Shard:
    f.seek(0)
    head = f.read(8)
    if len(head) != 8:
        raise SurgeryError(f"{uri} is not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > 100 << 20:
        raise SurgeryError(f"{uri} is not a safetensors file (header length {n} is implausible)")
    raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{uri} is not a safetensors file (bad header: {e})") from e
    header.pop("__metadata__", None)
    tensors = {}
    end = 0
    for key, spec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if spec["dtype"] not in _DTYPES:
            raise SurgeryError(f"{uri}: tensor {key} has dtype {spec['dtype']}, which surgery does not handle")
        begin, stop = spec["data_offsets"]
        tensors[key] = _TensorInfo(name, _DTYPES[spec["dtype"]], tuple(spec["shape"]), 8 + n + begin, 8 + n + stop)
        end = max(end, stop)
    return _Shard(name, head + raw, tensors, 8 + n + end)


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


class _Checkpoint:
    """A checkpoint's config and tensor directory; reads tensors by ranged reads, lazily.

    Shard headers are read only for the shards a caller touches (with an index file), so that
    `detach` never opens a shard that holds only middle layers.
    """

    def __init__(self, uri: str):
        self.uri = os.fspath(uri).rstrip("/") or "/"
        self.config = checkpoint_config(self.uri)
        names = _listdir(self.uri)
        self.files = names
        self._shards: dict[str, _Shard] = {}
        self._handles: dict[str, object] = {}
        self._chunk: torch.Tensor | None = None
        if INDEX_NAME in names:
            self.index = storage.read_bytes(storage.join(self.uri, INDEX_NAME))
            try:
                weight_map = json.loads(self.index)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SurgeryError(f"{self.uri}/{INDEX_NAME} has no readable weight_map ({e})") from e
            self.weight_map: dict[str, str] = dict(weight_map)
        else:
            self.index = None
            files = [WEIGHTS_NAME] if WEIGHTS_NAME in names else sorted(n for n in names if n.endswith(".safetensors"))
            if not files:
                pickled = [n for n in names if any(fnmatch.fnmatch(n, p) for p in PICKLE_WEIGHTS)]
                if pickled:
                    raise SurgeryError(
                        f"{self.uri} holds only pickle weights ({', '.join(pickled)}), which surgery never "
                        "loads (unpickling runs code). Convert them once in a trusted environment: "
                        "from_pretrained(path).save_pretrained(path) writes *.safetensors"
                    )
                raise SurgeryError(
                    f"{self.uri} holds no weights (*.safetensors) next to config.json; "
                    "save the model with save_pretrained"
                )
            self.weight_map = {}
            for name in files:
                for key in self.shard(name).tensors:
                    if key in self.weight_map:
                        raise SurgeryError(
                            f"{self.uri}: tensor {key} is in both {self.weight_map[key]} and {name}; "
                            f"remove the stray file or add {INDEX_NAME}"
                        )
                    self.weight_map[key] = name
        self.shard_names = sorted(set(self.weight_map.values()))
        self._absent = set(self.shard_names) - set(names)
        self.layer_of: dict[str, tuple[int, str]] = {}
        for key in self.weight_map:
            m = _LAYER_KEY.match(key)
            if m:
                self.layer_of[key] = (int(m.group(1)), m.group(2))

    # -- structure

    @property
    def num_hidden_layers(self) -> int:
        return self.config.num_hidden_layers

    def check_architecture(self) -> None:
        """Decoder layers at `model.layers.N`, all N in 0..num_hidden_layers-1 present."""
        n = getattr(self.config, "num_hidden_layers", None)
        if not isinstance(n, int) or not self.layer_of:
            prefixes = sorted({".".join(k.split(".")[:2]) for k in self.weight_map})[:6]
            raise SurgeryError(
                f"{self.uri} is a {self.config.model_type} model whose decoder layers are not at "
                f"model.layers (its tensors start with {prefixes}); surgery handles decoder-only "
                f"models with layers at model.layers: {SUPPORTED}"
            )
        found = {i for i, _ in self.layer_of.values()}
        missing = sorted(set(range(n)) - found)
        extra = sorted(found - set(range(n)))
        if missing or extra:
            raise SurgeryError(
                f"{self.uri}: config.json says num_hidden_layers={n} but the weights hold layers "
                f"{sorted(found)} (missing {missing}, unexpected {extra}); the checkpoint is "
                "incomplete or its config does not match its weights"
            )

    def check_shards(self, keys: Iterable[str] | None = None) -> None:
        """The shards holding `keys` (default: all) exist and their headers are readable."""
        shards = sorted({self.weight_map[k] for k in keys} if keys is not None else self.shard_names)
        absent = [s for s in shards if s in self._absent]
        if absent:
            raise SurgeryError(
                f"{self.uri}/{INDEX_NAME} names shard(s) {absent} that are missing from the "
                "checkpoint; copy the complete checkpoint"
            )
        for name in shards:
            self.shard(name)

    def layer_keys(self, i: int) -> dict[str, str]:
        """{suffix: tensor name} of decoder layer i."""
        return {suffix: key for key, (j, suffix) in self.layer_of.items() if j == i}

    # -- reading

    def shard(self, name: str) -> _Shard:
        if name not in self._shards:
            f = self._handle(name)
            shard = _read_shard_header(f, self._shard_uri(name), name)
            size = f.size if hasattr(f, "size") else os.fstat(f.fileno()).st_size
            if size < shard.size:
                raise SurgeryError(
                    f"{self._shard_uri(name)} holds {size} bytes but its header describes "
                    f"{shard.size}: the file is truncated; copy the complete checkpoint"
                )
            self._shards[name] = shard
        return self._shards[name]

    def info(self, key: str) -> _TensorInfo:
        shard = self.shard(self.weight_map[key])
        if key not in shard.tensors:
            raise SurgeryError(
                f"{self.uri}/{INDEX_NAME} places {key} in {shard.name}, which does not hold it; "
                "the index does not match the shards"
            )
        return shard.tensors[key]

    def read_flat(self, info: _TensorInfo, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements lo..hi of a tensor, flattened, in its stored dtype (into `out` if given)."""
        if out is None:
            out = torch.empty(hi - lo, dtype=info.dtype)
        if hi > lo:
            f = self._handle(info.shard)
            f.seek(info.start + lo * out.element_size())
            _read_exact(f, _as_bytes(out), self._shard_uri(info.shard))
        return out

    def read_chunk(self, info: _TensorInfo, lo: int, hi: int) -> torch.Tensor:
        """Like `read_flat`, into this checkpoint's reused buffer: valid until the next call."""
        nbytes = (hi - lo) * info.dtype.itemsize
        return self.read_flat(info, lo, hi, self._buffer(nbytes)[:nbytes].view(info.dtype))

    def read(self, key: str) -> torch.Tensor:
        info = self.info(key)
        return self.read_flat(info, 0, info.numel).reshape(info.shape)

    def copy_bytes(self, info: _TensorInfo, dst) -> None:
        """Copy a tensor's stored bytes to `dst`, a chunk at a time."""
        f = self._handle(info.shard)
        f.seek(info.start)
        view = _as_bytes(self._buffer(_CHUNK_BYTES))
        start = info.start
        while start < info.end:
            n = min(len(view), info.end - start)
            _read_exact(f, view[:n], self._shard_uri(info.shard))
            dst.write(view[:n])
            start += n

    def _buffer(self, nbytes: int) -> torch.Tensor:
        if self._chunk is None or len(self._chunk) < nbytes:
            self._chunk = torch.empty(max(nbytes, _CHUNK_BYTES), dtype=torch.uint8)
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


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def _listdir(uri: str, *, dirs: bool = False) -> list[str]:
    """Names of the files (and with `dirs`, the directories) directly under `uri`."""
    fs, path = storage.filesystem(uri)
    if not storage.is_local(fs):
        fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return sorted(
        posixpath.basename(p["name"].rstrip("/"))
        for p in fs.ls(path, detail=True)
        if dirs or p.get("type") != "directory"
    )


# ---------------------------------------------------------------------------------------------
# Output: staged beside `out`, moved into place when complete


def _location(uri: str) -> tuple[str, str]:
    fs, path = storage.filesystem(uri)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if storage.is_local(fs):
        return "file", os.path.realpath(path)
    return protocol, path.rstrip("/")


class _Output:
    """A checkpoint being written: files go to a staging directory (or prefix) beside `out`;
    `commit` moves them into place, `abort` removes them. Checks `out` on creation."""

    def __init__(self, out: str, *, overwrite: bool, inputs: Sequence[str]):
        self.out = os.fspath(out).rstrip("/") or "/"
        self.fs, self.path = storage.filesystem(self.out)
        self.local = storage.is_local(self.fs)
        for src in inputs:
            if _location(src) == _location(self.out):
                raise SurgeryError(f"out={self.out} is also an input; write the result to a new path")
        parent, base = posixpath.split(self.path.rstrip("/"))
        if not self.local and not parent:
            raise SurgeryError(f"out={self.out} is a bucket root; write the checkpoint under a prefix (s3://bucket/name)")
        if self.local and os.path.isfile(self.path):
            raise SurgeryError(f"out={self.out} is a file; give a directory path for the checkpoint")
        names = _listdir(self.out, dirs=True)
        if names:
            holds_checkpoint = CONFIG_NAME in names or any(n.endswith(".safetensors") for n in names)
            if holds_checkpoint and not overwrite:
                raise SurgeryError(
                    f"out={self.out} already holds a checkpoint; pass overwrite=True to replace it "
                    "or choose another path"
                )
            if not holds_checkpoint:
                raise SurgeryError(
                    f"out={self.out} holds other files ({', '.join(names[:5])}); write the "
                    "checkpoint to a new or empty path"
                )
        self.replace = bool(names)
        staging = posixpath.join(parent, f".{base}.tmp-{uuid.uuid4().hex[:8]}")
        self.staging = staging if self.local else f"{_location(self.out)[0]}://{staging}"
        self._staging_path = staging
        self.written: list[str] = []

    def uri(self, name: str) -> str:
        return storage.join(self.staging, name)

    def open(self, name: str):
        self.written.append(name)
        return _open_write(self.uri(name))

    def copy_in(self, src_uri: str, name: str) -> None:
        """Copy a small file (config, tokenizer) into the staged checkpoint."""
        with self.open(name) as f:
            f.write(storage.read_bytes(src_uri))

    def upload(self, local_dir: str) -> None:
        for name in sorted(os.listdir(local_dir)):
            src = os.path.join(local_dir, name)
            if os.path.isfile(src):
                with open(src, "rb") as f_in, self.open(name) as f_out:
                    shutil.copyfileobj(f_in, f_out, _CHUNK_BYTES)

    def commit(self) -> str:
        if self.local:
            if self.replace or os.path.isdir(self.path):
                old = f"{self._staging_path}.old"
                os.rename(self.path, old)
                os.rename(self._staging_path, self.path)
                shutil.rmtree(old)
            else:
                os.rename(self._staging_path, self.path)
            return self.out
        # Object stores have no rename: copy, weights first and config.json last, so that an
        # interrupted copy never looks like a checkpoint; on failure remove what was copied.
        if self.replace:
            self.fs.rm(self.path, recursive=True)
        order = sorted(set(self.written), key=lambda n: (n == CONFIG_NAME, n == INDEX_NAME, n))
        try:
            for name in order:
                self.fs.copy(posixpath.join(self._staging_path, name), posixpath.join(self.path, name))
        except BaseException:
            for name in order:
                try:
                    self.fs.rm(posixpath.join(self.path, name))
                except FileNotFoundError:
                    pass
            raise
        self.abort()
        return self.out

    def abort(self) -> None:
        try:
            if self.local:
                shutil.rmtree(self._staging_path, ignore_errors=True)
            elif self.fs.exists(self._staging_path):
                self.fs.rm(self._staging_path, recursive=True)
        except FileNotFoundError:
            pass
        if not self.local:
            self.fs.invalidate_cache(self._staging_path)


def _write_checkpoint(output: _Output, write: Callable[[_Output], None]) -> str:
    try:
        write(output)
        return output.commit()
    except BaseException:
        output.abort()
        raise


def _copy_side_files(src: str, names: Iterable[str], output: _Output) -> None:
    for name in names:
        if any(fnmatch.fnmatch(name, p) for p in SIDE_FILES):
            output.copy_in(storage.join(src, name), name)


def _stream_shard(output: _Output, src: _Checkpoint, shard_name: str, produce) -> None:
    """Write `shard_name` of `src` to the output with the same header; `produce(key, info, dst)`
    returns True when it wrote the key's bytes itself, False to copy them from `src`."""
    shard = src.shard(shard_name)
    with output.open(shard_name) as dst:
        dst.write(shard.header)
        for key, info in shard.tensors.items():
            if not produce(key, info, dst):
                src.copy_bytes(info, dst)


def _write_like(src: "_Checkpoint", output: _Output, produce) -> None:
    """Write a checkpoint with `src`'s shards, index and side files, tensors from `produce`;
    config.json goes last."""
    for shard in src.shard_names:
        _stream_shard(output, src, shard, produce)
    if src.index is not None:
        with output.open(INDEX_NAME) as f:
            f.write(src.index)
    _copy_side_files(src.uri, src.files, output)
    output.copy_in(storage.join(src.uri, CONFIG_NAME), CONFIG_NAME)


def _stream_elementwise(dst, n: int, out_dtype: torch.dtype, sources, fn) -> None:
    """Write fn(*chunks).to(out_dtype) for each chunk of n elements read from `sources`
    [(checkpoint, info)], so that no whole tensor is ever in memory."""
    step = max(1, _CHUNK_BYTES // max(info.dtype.itemsize for _, info in sources))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        parts = [ckpt.read_chunk(info, lo, hi) for ckpt, info in sources]
        dst.write(_as_bytes(fn(*parts).to(out_dtype)))


# ---------------------------------------------------------------------------------------------
# Detach


def check_checkpoint(checkpoint: str) -> transformers.PretrainedConfig:
    """What surgery needs of a checkpoint, checked without reading tensors: its config,
    safetensors weights, and decoder layers at `model.layers`. Returns the config."""
    ckpt = _Checkpoint(checkpoint)
    ckpt.check_architecture()
    return ckpt.config



def _causal_lm_class(config: transformers.PretrainedConfig, uri: str):
    cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None:
        raise SurgeryError(
            f"{uri}: {config.model_type} has no causal-LM class in transformers; "
            f"surgery handles decoder-only models with layers at model.layers: {SUPPORTED}"
        )
    return cls


def _elo_config(config: transformers.PretrainedConfig, layers: tuple[int, ...]) -> transformers.PretrainedConfig:
    n = config.num_hidden_layers
    data = config.to_dict()
    for key, value in list(data.items()):
        if key not in _NOT_PER_LAYER and isinstance(value, (list, tuple)) and len(value) == n:
            data[key] = [value[i] for i in layers]
    base_layers = getattr(config, "elo_layers", None)  # detaching an ELO model again
    data["num_hidden_layers"] = len(layers)
    data["elo_layers"] = [base_layers[i] for i in layers] if base_layers else list(layers)
    data["elo_base_num_hidden_layers"] = getattr(config, "elo_base_num_hidden_layers", n) if base_layers else n
    return type(config).from_dict(data)


def detach(
    checkpoint: str,
    layers: Sequence[int] = (0, -1),
    *,
    train_embeddings: bool = False,
    train_norm: bool = False,
    train_head: bool = False,
    dtype: torch.dtype | None = None,
) -> transformers.PreTrainedModel:
    """The ELO model of `checkpoint`: embedding -> decoder `layers` in order -> norm -> head.

    An ordinary model of the checkpoint's class with `num_hidden_layers == len(layers)`; its
    config records the original indices (`elo_layers`) and depth (`elo_base_num_hidden_layers`)
    for `merge`. Only the tensors it holds are read. The detached layers require grad; the
    embedding, final norm and head are frozen unless `train_*` say otherwise (tied embedding
    and head are one tensor: set both flags alike). `dtype` casts (default: as stored).
    """
    with _Checkpoint(checkpoint) as ckpt:
        ckpt.check_architecture()
        chosen = validate_layers(ckpt.num_hidden_layers, layers)
        cls = _causal_lm_class(ckpt.config, ckpt.uri)
        config = _elo_config(ckpt.config, chosen)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if tied and train_embeddings != train_head:
            raise SurgeryError(
                f"{ckpt.uri} ties its head to the embedding (tie_word_embeddings=True), so they "
                "are one tensor: set train_embeddings and train_head to the same value"
            )
        with torch.device("meta"):
            skeleton = cls(config)
        if not isinstance(getattr(getattr(skeleton, "model", None), "layers", None), torch.nn.ModuleList):
            raise SurgeryError(f"{cls.__name__} keeps no decoder layers at model.layers; supported: {SUPPORTED}")
        expected = list(skeleton.state_dict())
        del skeleton
        source: dict[str, str] = {}  # ELO tensor name -> checkpoint tensor name
        for key in expected:
            m = _LAYER_KEY.match(key)
            source[key] = f"model.layers.{chosen[int(m.group(1))]}.{m.group(2)}" if m else key
        if tied and "lm_head.weight" not in ckpt.weight_map:
            source.pop("lm_head.weight", None)
        missing = [v for v in source.values() if v not in ckpt.weight_map]
        if missing:
            raise SurgeryError(
                f"{ckpt.uri} lacks tensors a {cls.__name__} needs: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}; the checkpoint is incomplete or of another architecture"
            )
        ckpt.check_shards(source.values())
        state = {}
        for key, src in source.items():
            t = ckpt.read(src)
            state[key] = t if dtype is None else t.to(dtype)
    load_dtype = dtype or state["model.embed_tokens.weight"].dtype
    model, info = cls.from_pretrained(
        None, config=config, state_dict=state, dtype=load_dtype, output_loading_info=True
    )
    missing = [k for k in info["missing_keys"] if not (tied and k == "lm_head.weight")]
    if missing or info["mismatched_keys"]:
        raise SurgeryError(f"{ckpt.uri}: could not load {sorted(missing) or info['mismatched_keys']} into the ELO model")
    for name, p in model.named_parameters():
        if name.startswith("model.layers."):
            p.requires_grad_(True)
        elif name.startswith("model.embed_tokens."):
            p.requires_grad_(train_embeddings)
        elif name.startswith("model.norm."):
            p.requires_grad_(train_norm)
        elif name.startswith("lm_head."):
            p.requires_grad_(train_head)
        else:
            p.requires_grad_(False)
    return model


def save_detached(checkpoint: str, layers: Sequence[int], out: str, *, overwrite: bool = False) -> str:
    """Write the ELO model of `checkpoint` (see `detach`) to `out` as its own HF checkpoint,
    with the base's tokenizer and generation files. Returns `out`."""
    output = _Output(out, overwrite=overwrite, inputs=[checkpoint])
    model = detach(checkpoint, layers)
    side = _listdir(os.fspath(checkpoint))

    def write(output: _Output) -> None:
        if output.local:
            model.save_pretrained(output.staging)
            output.written = os.listdir(output.staging)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                output.upload(tmp)
        _copy_side_files(os.fspath(checkpoint), side, output)

    return _write_checkpoint(output, write)


# ---------------------------------------------------------------------------------------------
# Merge


def merge(base: str, elo: str, out: str, *, overwrite: bool = False) -> str:
    """Write `base` with decoder layer `layers[i]` replaced by the ELO model's layer `i`.

    `layers` comes from the ELO checkpoint's config (`elo_layers`, written by `detach`). The
    result keeps base's config, shard files, index and header layout, with ELO tensors cast to
    base's dtype; tokenizer and generation files come from base. Streams tensor by tensor.
    """
    with _Checkpoint(base) as b, _Checkpoint(elo) as e:
        for c in (b, e):
            c.check_architecture()
            c.check_shards()
        layers = getattr(e.config, "elo_layers", None)
        if not layers:
            raise SurgeryError(
                f"{e.uri}/config.json records no elo_layers, so it is not an ELO checkpoint; "
                "write ELO models with save_detached or detach(...).save_pretrained"
            )
        if e.config.model_type != b.config.model_type:
            raise SurgeryError(
                f"the ELO model {e.uri} is a {e.config.model_type} model but base {b.uri} is "
                f"{b.config.model_type}; merge into the base it was detached from"
            )
        for attr in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            if getattr(e.config, attr, None) != getattr(b.config, attr, None):
                raise SurgeryError(
                    f"{attr} is {getattr(e.config, attr, None)} in the ELO model {e.uri} but "
                    f"{getattr(b.config, attr, None)} in base {b.uri}; merge into the base it was detached from"
                )
        recorded = getattr(e.config, "elo_base_num_hidden_layers", b.num_hidden_layers)
        if recorded != b.num_hidden_layers:
            raise SurgeryError(
                f"the ELO model {e.uri} was detached from a {recorded}-layer model but base {b.uri} "
                f"has {b.num_hidden_layers} layers; merge into the base it was detached from"
            )
        layers = validate_layers(b.num_hidden_layers, layers)
        if len(layers) != e.num_hidden_layers:
            raise SurgeryError(
                f"{e.uri}/config.json lists elo_layers={list(layers)} but num_hidden_layers="
                f"{e.num_hidden_layers}; the ELO config is inconsistent"
            )
        replace: dict[str, str] = {}  # base tensor -> ELO tensor
        for i, layer in enumerate(layers):
            theirs, ours = e.layer_keys(i), b.layer_keys(layer)
            if set(theirs) != set(ours):
                diff = sorted(set(theirs) ^ set(ours))
                raise SurgeryError(
                    f"ELO layer {i} and base layer {layer} hold different tensors ({diff[:5]}); "
                    "merge into the base it was detached from"
                )
            for suffix, key in ours.items():
                if e.info(theirs[suffix]).shape != b.info(key).shape:
                    raise SurgeryError(
                        f"{theirs[suffix]} of the ELO model has shape {list(e.info(theirs[suffix]).shape)} "
                        f"but {key} of base has {list(b.info(key).shape)}; merge into the base it was detached from"
                    )
                replace[key] = theirs[suffix]
        output = _Output(out, overwrite=overwrite, inputs=[b.uri, e.uri])

        def produce(key: str, info: _TensorInfo, dst) -> bool:
            if key not in replace:
                return False
            _stream_elementwise(dst, info.numel, info.dtype, [(e, e.info(replace[key]))], lambda x: x)
            return True

        return _write_checkpoint(output, lambda out: _write_like(b, out, produce))


# ---------------------------------------------------------------------------------------------
# Chat vector


def chat_vector(
    target: str,
    base: str,
    instruct: str,
    out: str,
    *,
    scale: float = 1.0,
    skip: Sequence[str] = (),
    overwrite: bool = False,
) -> str:
    """Write `target + scale * (instruct - base)`, tensor by tensor, over every tensor
    (embedding and head included), computed in fp32 and stored in target's dtype.

    Tensors whose names match a `skip` pattern (fnmatch, e.g. "model.embed_tokens.*") stay as
    in target; so do non-float tensors. All three must hold each other tensor with one shape.
    The result keeps target's config, shard layout, tokenizer and generation files.
    """
    if isinstance(skip, str):
        skip = (skip,)
    with _Checkpoint(target) as t, _Checkpoint(base) as b, _Checkpoint(instruct) as i:
        skipped = lambda key: any(fnmatch.fnmatch(key, p) for p in skip)  # noqa: E731
        for c in (t, b, i):
            c.check_shards()
        for other, role in ((b, "base"), (i, "instruct")):
            extra = sorted(k for k in other.weight_map if k not in t.weight_map and not skipped(k))
            if extra:
                raise SurgeryError(
                    f"tensor {_few(extra)} is in {role} ({other.uri}) but missing from target "
                    f"({t.uri}); the models differ in architecture. If that is intended, pass "
                    f"skip={extra!r}"
                )
            absent = sorted(k for k in t.weight_map if k not in other.weight_map and not skipped(k))
            if absent:
                raise SurgeryError(
                    f"tensor {_few(absent)} is in target ({t.uri}) but missing from {role} "
                    f"({other.uri}); pass skip={absent!r} to keep target's value"
                )
        mismatched = []
        for key in sorted(t.weight_map):
            shapes = [list(c.info(key).shape) for c in (t, b, i)]
            if not skipped(key) and not shapes[0] == shapes[1] == shapes[2]:
                mismatched.append(
                    f"{key} has shape {shapes[0]} in target, {shapes[1]} in base and {shapes[2]} in instruct"
                )
        if mismatched:
            names = [m.split(" ", 1)[0] for m in mismatched]
            raise SurgeryError(
                f"tensor {'; '.join(mismatched)}. A chat vector needs equal shapes (a resized "
                f"vocabulary?); pass skip={names!r} to keep target's values"
            )
        output = _Output(out, overwrite=overwrite, inputs=[t.uri, b.uri, i.uri])

        def produce(key: str, info: _TensorInfo, dst) -> bool:
            if skipped(key) or not info.dtype.is_floating_point:
                return False
            compute = torch.promote_types(info.dtype, torch.float32)
            sources = [(t, info), (b, b.info(key)), (i, i.info(key))]

            def add(x, y, z):  # x + scale * (z - y), in place on z's chunk
                d = z.to(compute)
                return d.sub_(y).mul_(scale).add_(x)

            _stream_elementwise(dst, info.numel, info.dtype, sources, add)
            return True

        return _write_checkpoint(output, lambda out: _write_like(t, out, produce))
