"""Build the model of a stage: config -> trainable set -> FSDP2 shards -> weights, tensor by tensor.

The model is built with its parameters on the meta device (buffers real, so that rotary
tables and the like keep their computed values), sharded with `fully_shard` per decoder layer
and then the root, and only then materialised: each rank reads from the safetensors files just
the rows of each tensor that it owns. No rank ever holds the whole model; frozen parameters
outside the decoder layers (ELO's embedding, norm and head) are held whole by every rank in the
compute dtype unless `TrainConfig.frozen_params` is shard (see `shard`).

Which parameters train (`TrainConfig.method`):
- elo:  the decoder layers (`model.layers.*`) of a detached ELO model; embedding, final norm
        and head stay frozen copies of the original.
- full: every parameter.
- lora: peft LoRA adapters on every linear layer of the decoder; the base model is frozen.
- layers: the decoder layers `TrainConfig.full_layers` names, whole; everything else frozen.
- lora_layers: those layers whole, and LoRA adapters on every linear layer of the other decoder
        layers; embedding, final norm and head frozen.

`TrainConfig.offload_to_cpu` shards with FSDP2's CPUOffloadPolicy: the sharded parameters (and so
their gradients and AdamW's state) live in host memory, buffers and everything outside FSDP on
the device.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from elo_ray import storage
from elo_ray.config import TrainConfig
from elo_ray.hf_checkpoint import CheckpointError, CheckpointReader
from elo_ray.train.errors import TrainingError

PEFT_PREFIX = "base_model.model."


def fetch(model_uri: str, local_rank: int = 0) -> str:
    """A local directory holding the checkpoint at `model_uri`, downloaded once per node.

    Local paths are used in place. Remote ones are cached under the temp dir, keyed by the URI
    and every file's size and modification tag, so a rewritten checkpoint is fetched again.
    Collective when torch.distributed is initialised (the other ranks wait for local rank 0)."""
    import torch.distributed as dist

    if not storage.has_scheme(model_uri):
        return model_uri.removeprefix("file://")
    fs, root = storage.filesystem(model_uri)
    infos = sorted((i["name"], i.get("size"), str(i.get("ETag") or i.get("LastModified") or i.get("mtime")))
                   for i in fs.ls(root, detail=True) if i.get("type") == "file")
    if not infos:
        raise TrainingError(f"{model_uri} is empty or does not exist: expected a Hugging Face checkpoint")
    key = hashlib.sha1(json.dumps([model_uri, infos]).encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), "elo-ray-models", key)
    if local_rank == 0 and not os.path.isfile(os.path.join(local, ".complete")):
        partial = f"{local}.partial-{os.getpid()}"
        storage.download(model_uri, partial, names=[os.path.basename(n) for n, _, _ in infos])
        open(os.path.join(partial, ".complete"), "w").close()
        shutil.rmtree(local, ignore_errors=True)
        os.replace(partial, local)
    if dist.is_initialized():
        dist.barrier()
    return local


def read_config(model_dir: str):
    """The HF config of the checkpoint in the local directory `model_dir`."""
    import transformers

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise TrainingError(f"{model_dir} has no config.json: expected a Hugging Face checkpoint directory")
    return transformers.AutoConfig.from_pretrained(model_dir)


def check_seq_len(seq_len: int, max_positions: int | None) -> list[str]:
    """seq_len must fit the model's positions: every sequence is seq_len tokens long. The one rule
    for `check_fits` and `elo-ray validate` (the data plane may not import train, nor train data)."""
    if max_positions is None or seq_len <= max_positions:
        return []
    return [f"seq_len: {seq_len} tokens is more than the model takes (max_position_embeddings: {max_positions}); "
            f"set seq_len to at most {max_positions}"]


def check_fits(config, method: str, seq_len: int, micro_batch_size: int) -> None:
    """Errors before any training for shapes and methods the model cannot take."""
    too_long = check_seq_len(seq_len, getattr(config, "max_position_embeddings", None))
    if too_long:
        raise TrainingError(too_long[0])
    if micro_batch_size < 1:
        raise TrainingError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
    if method == "elo" and getattr(config, "elo_layers", None) is None:
        raise TrainingError(
            "method 'elo' trains a detached ELO model, but this checkpoint's config has no "
            "elo_layers; detach the layers first (surgery.save_detached) or use method 'full'"
        )


@contextlib.contextmanager
def _params_on_meta():
    """Create parameters on the meta device and buffers for real (rotary tables keep values)."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a HF causal LM, also under a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TrainingError(f"cannot find the decoder layers of {type(base).__name__} (expected model.layers)")
    return layers


def full_layers(config, train: TrainConfig) -> tuple[int, ...]:
    """The decoder layers that train whole: all for full and elo, none for lora, and
    `train.full_layers` for layers and lora_layers (a TrainingError when they do not fit)."""
    n = config.num_hidden_layers
    if train.method in ("full", "elo"):
        return tuple(range(n))
    if train.method == "lora":
        return ()
    try:
        return tuple(train.full_layers(n))
    except ValueError as e:
        raise TrainingError(str(e)) from None


def _linear_names(model: nn.Module, layers: list[int]) -> list[str]:
    """Full names of the linear modules of decoder `layers` (peft matches a name as a suffix)."""
    prefix = {id(layer): f"{name}" for name, layer in model.named_modules()}
    decoder = decoder_layers(model)
    return [f"{prefix[id(decoder[i])]}.{name}" for i in layers
            for name, m in decoder[i].named_modules() if isinstance(m, nn.Linear)]


def build_meta(config, train: TrainConfig) -> nn.Module:
    """The stage's model with parameters on meta and `requires_grad` set by the method."""
    import transformers

    whole = full_layers(config, train)
    lora_on = [i for i in range(config.num_hidden_layers) if i not in whole] if "lora" in train.method else []
    if train.method == "lora_layers" and not lora_on:
        raise TrainingError(
            f"method lora_layers trains layers {list(whole)} whole, which is every decoder layer: nothing "
            "is left for LoRA; use method layers or full, or fewer train.layers / train.neighbours"
        )
    with _params_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if train.activation_checkpointing:
            # activation_checkpointing_enable: transformers 5.25 on; its old name warns there
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        if lora_on:
            import peft

            lora = peft.LoraConfig(
                r=train.lora_rank, lora_alpha=train.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                target_modules="all-linear" if train.method == "lora" else _linear_names(model, lora_on),
            )
            model = peft.get_peft_model(model, lora)
    if train.method == "full":
        model.requires_grad_(True)
    elif train.method != "lora":  # elo, layers, lora_layers: whole layers train, LoRA adapters too
        layers = decoder_layers(model)
        chosen = {id(p) for i in whole for p in layers[i].parameters()}
        for name, p in model.named_parameters():
            p.requires_grad_(id(p) in chosen or ".lora_" in name)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError(
            f"method {train.method!r} leaves no trainable parameters in this model "
            f"({config.num_hidden_layers} decoder layers); check the checkpoint and the method"
        )
    return model


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def checkpoint_name(param_name: str) -> str | None:
    """The tensor name in the HF checkpoint for a parameter; None for LoRA adapters."""
    if ".lora_" in param_name:
        return None
    return param_name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def mixed_precision(precision: str, device: torch.device):
    """bf16 compute with fp32 gradient reduction (GPU default), or None for plain fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def frozen_outside_layers(model: nn.Module) -> list[nn.Parameter]:
    """Frozen parameters that no decoder layer holds: ELO's and LoRA's embedding, final norm, head."""
    in_layers = {id(p) for p in decoder_layers(model).parameters()}
    return [p for p in model.parameters() if not p.requires_grad and id(p) not in in_layers]


def _recast_on_meta(model: nn.Module, params: list[nn.Parameter], dtype: torch.dtype) -> list[nn.Parameter]:
    """Replace `params` (on meta) by `dtype` ones in every module that holds them (ties stay tied)."""
    new = {id(p): nn.Parameter(torch.empty_like(p, dtype=dtype), requires_grad=False) for p in params}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in new:
                module._parameters[name] = new[id(p)]
    return list(new.values())


def shard(model: nn.Module, mesh, mp_policy, frozen: str = "replicate", offload_to_cpu: bool = False) -> None:
    """FSDP2: one unit per decoder layer, then the root (embedding, norm, head).

    frozen="replicate" keeps the frozen parameters outside the decoder layers out of FSDP: every
    rank holds them whole in the compute dtype, so no step gathers or casts them (at the 8B shape
    the embedding and head are 1.05B parameters: 2.1 GB in bf16 per GPU, about what FSDP holds
    of them gathered during a step anyway). They are read whole from the checkpoint, never
    checkpointed, and exported from the input checkpoint byte for byte (export.py).
    With `offload_to_cpu`, every unit keeps its shards in host memory (CPUOffloadPolicy)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kwargs = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload_to_cpu:  # pinned host memory lets the copies overlap compute; pinning needs a GPU
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    ignored = frozen_outside_layers(model) if frozen == "replicate" else []
    if ignored and mp_policy is not None:
        ignored = _recast_on_meta(model, ignored, mp_policy.param_dtype)
    fully_shard(model, ignored_params=set(ignored) or None, **kwargs)


def compile_layers(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each decoder layer's forward; FSDP2's hooks (around forward) stay eager, and
    parameter names do not change."""
    for layer in decoder_layers(model):
        layer.forward = torch.compile(layer.forward, backend=backend)


@contextlib.contextmanager
def checkpoint_reader(model_dir: str):
    """The checkpoint's tensors (`hf_checkpoint.CheckpointReader`); what it cannot read is a
    TrainingError, which no retry of the worker would fix."""
    try:
        with CheckpointReader(model_dir) as reader:
            yield reader
    except CheckpointError as e:
        raise TrainingError(str(e)) from e


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """[start, end) rows of dim 0 that this rank holds of an FSDP2 (Shard(0)) parameter."""
    from torch.distributed.tensor import DTensor

    n = param.shape[0] if param.dim() else 0
    if not isinstance(param, DTensor):
        return 0, n
    world, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
    size = math.ceil(n / world)
    start = min(rank * size, n)
    return start, min(start + size, n)


def _lora_init(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """peft's default init (A: kaiming-uniform, B: zeros), reproducible per name and seed."""
    full = torch.zeros(shape)
    if ".lora_A." in name:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
    return full


def _tied_holders(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """(module, name) of every holder of each parameter held more than once (tied embeddings)."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((module, name))
    return [h for h in holders.values() if len(h) > 1]


def _outside_fsdp_to(model: nn.Module, device: torch.device) -> None:
    """Move buffers and parameters that FSDP does not shard (no DTensor) to `device`: with CPU
    offload the shards stay in host memory, the rest computes on the device."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
        for p in module._parameters.values():
            if p is not None and not isinstance(p, DTensor) and p.device != device:
                p.data = p.data.to(device)  # in place: a parameter held twice (tied) stays one


@torch.no_grad()
def materialise(model: nn.Module, model_dir: str, device: torch.device, seed: int, offload_to_cpu: bool = False) -> None:
    """Allocate the sharded parameters on `device` (host memory with `offload_to_cpu`) and fill each
    rank's rows from the checkpoint."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    tied = _tied_holders(model)
    model.to_empty(device="cpu" if offload_to_cpu else device)
    for holders in tied:  # to_empty gives each holder of a parameter outside FSDP its own copy
        first = holders[0][0]._parameters[holders[0][1]]
        for module, name in holders[1:]:
            module._parameters[name] = first
    for name, buf in model.named_buffers():
        buf.copy_(buffers[name])
    with checkpoint_reader(model_dir) as source:
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            start, end = local_rows(param)
            key = checkpoint_name(name)
            if key is None:
                local.copy_(_lora_init(name, param.shape, seed)[start:end])
                continue
            if key not in source:
                raise TrainingError(f"{model_dir}: checkpoint has no tensor {key!r} that the model needs")
            if source.shape(key) != list(param.shape):
                raise TrainingError(
                    f"{model_dir}: tensor {key!r} has shape {source.shape(key)}, the model expects {list(param.shape)}"
                )
            local.copy_(source.rows(key, start, end))
    if offload_to_cpu and device.type != "cpu":
        _outside_fsdp_to(model, device)


@dataclass
class StageModel:
    """A sharded, materialised model and what the loop needs to know about it."""

    module: nn.Module
    config: object
    trainable: list[str]
    num_layers: int
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # summed loss of a micro-batch
    full_layers: tuple[int, ...]  # the decoder layers that train whole (FLOPs count their weight gradients)


def build(model_dir: str, train: TrainConfig, device: torch.device, mesh) -> StageModel:
    """The stage's model, sharded over `mesh`, with weights from `model_dir`."""
    from elo_ray.train import loss

    try:
        impl = loss.resolve(train.loss, device)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    config = read_config(model_dir)
    model = build_meta(config, train)
    if train.compile_layers:
        compile_layers(model)
    shard(model, mesh, mixed_precision(train.precision, device), train.frozen_params, train.offload_to_cpu)
    materialise(model, model_dir, device, train.seed, train.offload_to_cpu)
    model.train()
    stage_loss = functools.partial(loss.summed_loss, impl=impl, chunk_tokens=train.loss_chunk_tokens)
    return StageModel(model, config, trainable_names(model), len(decoder_layers(model)), stage_loss,
                      full_layers(config, train))
