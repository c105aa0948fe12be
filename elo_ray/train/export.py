"""Write the trained model as a Hugging Face safetensors checkpoint, one tensor at a time.

Every rank takes part in gathering each parameter's full tensor in turn (`DTensor.full_tensor`);
rank 0 streams it into the output file and drops it before the next one, so no rank holds more
than its shard plus one full tensor. The safetensors header is written first (names, dtypes and
shapes are known up front), then the tensors' bytes in the same order; outputs above
`max_shard_bytes` are split into `model-0000k-of-0000n.safetensors` with an index, as HF does.

What is written: each tensor in the dtype the input checkpoint stored it in; LoRA adapters merged
into their base weights (W + scale * B A); config.json (an ELO model keeps its `elo_layers`) and
generation config and tokenizer files copied from beside the input checkpoint.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from elo_ray import storage
from elo_ray.train.model import SafetensorsDir, checkpoint_name

MAX_SHARD_BYTES = 5 * 2**30
_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass
class Entry:
    """One output tensor: its name, global shape, dtype, and a collective that produces it."""

    name: str
    shape: list[int]
    dtype: torch.dtype
    full: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def entries(model: nn.Module, source: SafetensorsDir) -> list[Entry]:
    """The output tensors in a deterministic order (the same on every rank)."""
    lora = _lora_layers(model)
    out = []
    for name, param in model.named_parameters():
        key = checkpoint_name(name)
        if key is None:
            continue  # LoRA adapters are merged into their base weight below
        dtype = source.dtype(key) if key in source else param.dtype
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        if owner in lora and name.endswith(".weight"):
            layer = lora[owner]
            (adapter,) = layer.active_adapters

            def merged(p=param, layer=layer, adapter=adapter):
                a = _full(layer.lora_A[adapter].weight.detach())
                b = _full(layer.lora_B[adapter].weight.detach())
                return _full(p.detach()) + (b @ a) * layer.scaling[adapter]

            out.append(Entry(key, list(param.shape), dtype, merged))
        else:
            out.append(Entry(key, list(param.shape), dtype, lambda p=param: _full(p.detach())))
    return out


def _header(group: list[Entry]) -> bytes:
    header, offset = {}, 0
    for e in group:
        header[e.name] = {"dtype": _DTYPES[e.dtype], "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _groups(items: list[Entry], max_bytes: int) -> list[list[Entry]]:
    groups, size = [[]], 0
    for e in items:
        if groups[-1] and size + e.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    return groups


@torch.no_grad()
def export(model: nn.Module, model_dir: str, output_uri: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write `model` as a HF checkpoint at `output_uri`; collective, rank 0 writes. Returns the
    safetensors file names."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    groups = _groups(entries(model, SafetensorsDir(model_dir)), max_shard_bytes)
    names = (
        ["model.safetensors"] if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    fs, root = storage.filesystem(output_uri)
    if rank == 0:
        fs.makedirs(root, exist_ok=True)
        # A re-export first removes what marks a checkpoint (config.json goes back last), so
        # that a half-rewritten directory never looks like a finished one.
        for old in fs.ls(root, detail=False) if fs.exists(root) else []:
            base = old.rstrip("/").rsplit("/", 1)[-1]
            if base == "config.json" or (base.startswith("model") and ".safetensors" in base):
                fs.rm(old)
    for name, group in zip(names, groups):
        f = fs.open(f"{root}/{name}", "wb") if rank == 0 else None
        try:
            if f:
                f.write(_header(group))
            for e in group:
                tensor = e.full().to(e.dtype).contiguous().cpu()
                if f:
                    f.write(tensor.view(torch.uint8).numpy().tobytes())
                del tensor
        finally:
            if f:
                f.close()
    if rank == 0:
        if len(groups) > 1:
            index = {
                "metadata": {"total_size": sum(e.nbytes for g in groups for e in g)},
                "weight_map": {e.name: n for n, g in zip(names, groups) for e in g},
            }
            storage.write_text(storage.join(output_uri, "model.safetensors.index.json"), json.dumps(index, indent=2))
        from elo_ray.surgery import SIDE_FILES  # tokenizer and generation files, as surgery copies them

        side = sorted(n for n in os.listdir(model_dir) if any(fnmatch.fnmatch(n, p) for p in SIDE_FILES))
        for file in side + ["config.json"]:  # config.json last: it marks a finished checkpoint
            with open(os.path.join(model_dir, file), "rb") as src:
                storage.write_bytes(storage.join(output_uri, file), src.read())
    if dist.is_initialized():
        dist.barrier()
    return names
