"""Hugging Face safetensors checkpoints: read them a range at a time, write them staged.

A checkpoint is a directory or fsspec URI (`/ckpt/llama`, `s3://bucket/llama`) holding
`config.json` and safetensors weights, one file or shards with `model.safetensors.index.json`,
plus tokenizer and generation files (`SIDE_FILES`).

- `CheckpointReader` reads tensors by ranged reads through plain or fsspec file objects, so a
  remote checkpoint is never downloaded: whole tensors, rows (an FSDP rank's shard of dim 0) or
  flat chunks (for streaming through one reused buffer). It opens only the shards a caller
  touches when the checkpoint has an index.
- `CheckpointWriter` writes a checkpoint into a staging directory (prefix) beside `out` and moves
  it into place only when complete, config.json last; see its docstring for what a reader of
  `out` sees meanwhile. Staging left behind by a killed writer is swept by the next writer of
  the same `out`.

Surgery (detach, merge, chat vector), the training build (each rank reads its rows) and the
export of a trained model all read and write through this module.

Layout: `format` (file names, dtype table, safetensors header, config), `reader`, `writer`;
reader and writer import format, never each other.
"""

from elo_ray.hf_checkpoint.format import (
    CHUNK_BYTES,
    CONFIG_NAME,
    DTYPE_NAMES,
    DTYPES,
    INDEX_NAME,
    PICKLE_WEIGHTS,
    SIDE_FILES,
    SUPPORTED,
    WEIGHTS_NAME,
    CheckpointError,
    TensorInfo,
    index_json,
    read_config,
    safetensors_header,
    shard_file_names,
    side_files,
    tensor_bytes,
)
from elo_ray.hf_checkpoint.reader import CheckpointReader
from elo_ray.hf_checkpoint.writer import CheckpointWriter

__all__ = [
    "CHUNK_BYTES", "CONFIG_NAME", "DTYPE_NAMES", "DTYPES", "INDEX_NAME", "PICKLE_WEIGHTS", "SIDE_FILES",
    "SUPPORTED", "WEIGHTS_NAME", "CheckpointError", "CheckpointReader", "CheckpointWriter", "TensorInfo",
    "index_json", "read_config", "safetensors_header", "shard_file_names", "side_files", "tensor_bytes",
]
