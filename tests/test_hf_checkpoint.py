"""Hugging Face checkpoint I/O, as a specification: the reader's ranged reads.

Checkpoints are tiny models built from configs; the S3 tests use the real moto server."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from elo_ray import storage
from elo_ray.hf_checkpoint import CheckpointReader
from elo_ray.tiny import tiny_config, tiny_model


def tensors_of(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


# ---------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("where", ["local", "s3"])
def test_reader_reads_tensors_whole_by_rows_and_in_chunks_as_stored(tmp_path, request, where):
    path = str(tmp_path / "bf16")
    tiny_model(tiny_config("llama"), seed=0).to(torch.bfloat16).save_pretrained(path, max_shard_size="20KB")
    expected = tensors_of(path)
    uri = path
    if where == "s3":
        uri = request.getfixturevalue("s3_bucket") + "/bf16"
        storage.upload(path, uri)
    with CheckpointReader(uri) as reader:
        assert len(reader.shard_names) > 2 and reader.index is not None
        assert sorted(reader.names()) == sorted(expected)
        for key, tensor in expected.items():
            assert reader.dtype(key) == torch.bfloat16 and reader.shape(key) == list(tensor.shape), key
            assert torch.equal(reader.read(key), tensor), key
            assert torch.equal(reader.rows(key, 1, 3), tensor[1:3]), key
            assert torch.equal(reader.read_chunk(reader.info(key), 5, 11), tensor.reshape(-1)[5:11]), key
