"""Write the trained model as a Hugging Face safetensors checkpoint, one tensor at a time.

Every rank takes part in gathering each parameter's full tensor in turn (`DTensor.full_tensor`);
rank 0 streams it into the output file and drops it before the next one, so no rank holds more
than its shard plus one full tensor. The safetensors header is written first (names, dtypes and
shapes are known up front), then the tensors' bytes in the same order; outputs above
`max_shard_bytes` are split into `model-0000k-of-0000n.safetensors` with an index, as HF does.
The files are staged beside `output_uri` and committed when complete, config.json last
(`hf_checkpoint.CheckpointWriter`), so a failed export leaves the earlier output as it was.

What is written: each tensor in the dtype the input checkpoint stored it in; frozen parameters
as the input checkpoint stored them, read from it (they never change, and a rank may hold them
in its compute dtype only); LoRA adapters merged into their base weights (W + scale * B A); config.json (an ELO model keeps its `elo_layers`) and
generation config and tokenizer files copied from beside the input checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from elo_ray import hf_checkpoint, storage
from elo_ray.hf_checkpoint import CheckpointReader, CheckpointWriter
from elo_ray.train.errors import TrainingError
from elo_ray.train.model import checkpoint_name, checkpoint_reader

MAX_SHARD_BYTES = 5 * 2**30


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


def entries(model: nn.Module, source: CheckpointReader) -> list[Entry]:
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
        elif not param.requires_grad and key in source:
            # Frozen: the input checkpoint's tensor as stored (the model may hold it in bf16).
            out.append(Entry(key, list(param.shape), dtype, lambda key=key: source.read(key)))
        else:
            out.append(Entry(key, list(param.shape), dtype, lambda p=param: _full(p.detach())))
    return out


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
    """Write `model` as a HF checkpoint at `output_uri`, replacing what is there; collective,
    rank 0 writes. Returns the safetensors file names."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    with checkpoint_reader(model_dir) as source:
        groups = _groups(entries(model, source), max_shard_bytes)
        names = hf_checkpoint.shard_file_names(len(groups))
        output = _open_output(output_uri, model_dir, rank)
        if output is None:
            _write_shards(None, names, groups)  # this rank takes part in the gathers only
        else:
            with output:
                _write_shards(output, names, groups)
                if len(groups) > 1:
                    weight_map = {e.name: n for n, g in zip(names, groups) for e in g}
                    total = sum(e.nbytes for g in groups for e in g)
                    output.write_bytes(hf_checkpoint.INDEX_NAME, hf_checkpoint.index_json(weight_map, total))
                output.copy_side_files(model_dir, source.files)
                output.copy_in(storage.join(model_dir, hf_checkpoint.CONFIG_NAME), hf_checkpoint.CONFIG_NAME)
                output.commit()
    if dist.is_initialized():
        dist.barrier()
    return names


def _write_shards(output: CheckpointWriter | None, names: list[str], groups: list[list[Entry]]) -> None:
    """Gather each tensor in turn (collective) and, where there is an output, stream it into its
    shard file after the shard's header."""
    for name, group in zip(names, groups):
        f = output.open(name) if output else None
        try:
            if f:
                f.write(hf_checkpoint.safetensors_header([(e.name, e.dtype, e.shape) for e in group]))
            for e in group:
                tensor = e.full().to(e.dtype).contiguous().cpu()
                if f:
                    f.write(hf_checkpoint.tensor_bytes(tensor))
                del tensor
        finally:
            if f:
                f.close()


def _open_output(output_uri: str, model_dir: str, rank: int) -> CheckpointWriter | None:
    """Rank 0's writer. An output rank 0 cannot use stops every rank alike: a TrainingError on
    rank 0 alone would leave the others waiting for it in the first gather."""
    output, problem = None, [None]
    if rank == 0:
        try:
            output = CheckpointWriter(output_uri, overwrite=True, inputs=[model_dir])
        except hf_checkpoint.CheckpointError as e:
            problem = [str(e)]
    if dist.is_initialized():
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise TrainingError(problem[0])
    return output
