"""What a Hugging Face checkpoint is made of: its file names, the safetensors header (parsed and
built), the dtype table, and its config."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

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
# The model types elo-ray operates on (elo_ray.tiny builds one of each for the tests).
SUPPORTED = "llama, mistral, qwen2, qwen3, gemma2, gemma3_text"
# Granularity of streamed reads: a reader holds one buffer of about this size.
CHUNK_BYTES = 8 << 20

# safetensors dtype names <-> torch dtypes: the one table of the project.
DTYPES = {
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
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or an output that cannot be written; says what to do."""


def read_config(checkpoint: str):
    """The model config (a `transformers.PretrainedConfig`) in `checkpoint`'s `config.json`."""
    import transformers

    checkpoint = os.fspath(checkpoint)
    if not storage.exists(checkpoint):
        raise CheckpointError(f"checkpoint {checkpoint} does not exist; give a directory or URI holding config.json")
    uri = storage.join(checkpoint, CONFIG_NAME)
    try:
        data = json.loads(storage.read_text(uri))
    except storage.StorageError:
        raise CheckpointError(
            f"no {CONFIG_NAME} in {checkpoint}; a Hugging Face checkpoint holds config.json and "
            "*.safetensors (write one with save_pretrained)"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{uri} is not valid JSON ({e}); rewrite it with config.save_pretrained") from e
    model_type = data.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise CheckpointError(
            f"{uri} has model_type={model_type!r}, which this transformers "
            f"{transformers.__version__} does not know; supported: {SUPPORTED}"
        )
    return transformers.CONFIG_MAPPING[model_type].from_dict(data)


def side_files(names: Iterable[str]) -> list[str]:
    """The tokenizer and generation files among `names`."""
    return sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in SIDE_FILES))


def shard_file_names(count: int) -> list[str]:
    """Weight file names of a checkpoint in `count` shards, as Hugging Face names them."""
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def index_json(weight_map: dict[str, str], total_size: int) -> bytes:
    """`model.safetensors.index.json` for tensors placed by `weight_map` {tensor: file}."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2).encode()


# ---------------------------------------------------------------------------------------------
# safetensors: an 8-byte little-endian header length, a JSON header, then the tensors' bytes


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor's bytes are: its shard file and absolute byte range, dtype and shape."""

    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ShardHeader:
    name: str
    raw: bytes  # the 8-byte length and the JSON header, exactly as in the file
    tensors: dict[str, TensorInfo]  # in file order
    size: int  # bytes the header describes


def safetensors_header(tensors: Sequence[tuple[str, torch.dtype, Sequence[int]]]) -> bytes:
    """The header of a safetensors file holding `tensors` [(name, dtype, shape)] in that order,
    their data following back to back."""
    header, offset = {}, 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def parse_header(f, uri: str, name: str) -> ShardHeader:
    f.seek(0)
    head = f.read(8)
    if len(head) != 8:
        raise CheckpointError(f"{uri} is not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > 100 << 20:
        raise CheckpointError(f"{uri} is not a safetensors file (header length {n} is implausible)")
    raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{uri} is not a safetensors file (bad header: {e})") from e
    header.pop("__metadata__", None)
    tensors = {}
    end = 0
    for key, spec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if spec["dtype"] not in DTYPES:
            raise CheckpointError(f"{uri}: tensor {key} has dtype {spec['dtype']}, which elo-ray does not handle")
        begin, stop = spec["data_offsets"]
        tensors[key] = TensorInfo(name, DTYPES[spec["dtype"]], tuple(spec["shape"]), 8 + n + begin, 8 + n + stop)
        end = max(end, stop)
    return ShardHeader(name, head + raw, tensors, 8 + n + end)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of `t` as stored in a safetensors file (little-endian, row-major)."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
