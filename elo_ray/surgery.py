"""Model surgery on Hugging Face causal-LM checkpoints: detach, merge, chat vector.

A checkpoint is a directory or fsspec URI (`/ckpt/llama`, `s3://bucket/llama`) holding
`config.json` and safetensors weights (see `elo_ray.hf_checkpoint`, which reads and writes them).

- `detach` builds the ELO model (paper step 1): an ordinary model of the same class holding the
  original embedding, the chosen decoder layers in order, the final norm and the head. It reads
  only those tensors; the middle layers are never read.
- `merge` writes the ELO model's layers back over the base's (step 2).
- `chat_vector` adds `instruct - base` to a target model (step 4).

Merge and chat vector never hold a model, nor even a whole tensor: they copy the base's (or
target's) shard files one by one, keeping each file's safetensors header byte for byte, and
stream every tensor's data in chunks of `hf_checkpoint.CHUNK_BYTES` through one reused buffer
per input. Outputs are staged beside `out` and moved into place only when complete, so a failed
run leaves nothing at `out`.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from typing import Iterable, Sequence

import torch
import transformers

from elo_ray import storage
from elo_ray.hf_checkpoint import (
    CHUNK_BYTES,
    CONFIG_NAME,
    INDEX_NAME,
    SUPPORTED,
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    TensorInfo,
    read_config,
    tensor_bytes,
)

# Top-level config lists that are never per-layer even when their length happens to match.
_NOT_PER_LAYER = {"architectures", "bos_token_id", "eos_token_id", "pad_token_id", "elo_layers"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class SurgeryError(ValueError):
    """A checkpoint, layer set or output path that surgery cannot use; says what to change."""


def _surgery_errors(fn):
    """Raise the checkpoint reader's and writer's errors as SurgeryError, surgery's one error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CheckpointError as e:
            raise SurgeryError(str(e)) from e

    return wrapper


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


@_surgery_errors
def checkpoint_config(checkpoint: str) -> transformers.PretrainedConfig:
    """The model config stored in `checkpoint`'s `config.json`."""
    return read_config(checkpoint)


@_surgery_errors
def check_checkpoint(checkpoint: str) -> transformers.PretrainedConfig:
    """What surgery needs of a checkpoint, checked without reading tensors: its config,
    safetensors weights, and decoder layers at `model.layers`. Returns the config."""
    with CheckpointReader(checkpoint) as ckpt:
        _check_architecture(ckpt)
        return ckpt.config


@_surgery_errors
def check_skip_patterns(skip: Sequence[str], *checkpoints: str) -> None:
    """Every chat-vector `skip` pattern matches some tensor name of `checkpoints`; otherwise a
    SurgeryError names the pattern and real names. Reads only the tensor names (index or headers)."""
    if isinstance(skip, str):
        skip = (skip,)
    if not skip:
        return
    names: list[str] = []
    for uri in checkpoints:
        with CheckpointReader(uri) as ckpt:
            names += ckpt.weight_map
    _check_patterns(skip, names, " or ".join(checkpoints))


def _check_patterns(patterns: Sequence[str], names: list[str], where: str) -> None:
    """A pattern that matches nothing skips nothing, silently: refuse it, with the names it
    probably meant (fnmatch matches whole names, so "embed_tokens" is not "model.embed_tokens.*")."""
    for pattern in patterns:
        if any(fnmatch.fnmatch(name, pattern) for name in names):
            continue
        core = pattern.strip("*")
        near = sorted({n for n in names if core and core in n})
        if near:
            end = near[0].index(core) + len(core)
            meant = near[0][:end] + (".*" if near[0][end:end + 1] == "." else "*")
            hint = f"tensors named like it: {_few(near, 3)}; write {meant!r}"
            hint += f" or {'*' + core + '*'!r} (all {len(near)})" if len(near) > 1 else ""
        else:
            hint = f"the tensors are named like {_few(difflib.get_close_matches(pattern, names, 3, 0.0) or names, 3)}"
        raise SurgeryError(
            f"skip pattern {pattern!r} matches no tensor of {where}: a pattern must match whole tensor "
            f"names (fnmatch); {hint}"
        )


# ---------------------------------------------------------------------------------------------
# Decoder layers of a checkpoint


def _layer_of(ckpt: CheckpointReader) -> dict[str, tuple[int, str]]:
    """{tensor name: (layer index, suffix)} of the tensors under model.layers.N."""
    out = {}
    for key in ckpt.weight_map:
        m = _LAYER_KEY.match(key)
        if m:
            out[key] = (int(m.group(1)), m.group(2))
    return out


def _check_architecture(ckpt: CheckpointReader) -> None:
    """Decoder layers at `model.layers.N`, all N in 0..num_hidden_layers-1 present."""
    n = getattr(ckpt.config, "num_hidden_layers", None)
    layer_of = _layer_of(ckpt)
    if not isinstance(n, int) or not layer_of:
        prefixes = sorted({".".join(k.split(".")[:2]) for k in ckpt.weight_map})[:6]
        raise SurgeryError(
            f"{ckpt.uri} is a {ckpt.config.model_type} model whose decoder layers are not at "
            f"model.layers (its tensors start with {prefixes}); surgery handles decoder-only "
            f"models with layers at model.layers: {SUPPORTED}"
        )
    found = {i for i, _ in layer_of.values()}
    missing = sorted(set(range(n)) - found)
    extra = sorted(found - set(range(n)))
    if missing or extra:
        raise SurgeryError(
            f"{ckpt.uri}: config.json says num_hidden_layers={n} but the weights hold layers "
            f"{sorted(found)} (missing {missing}, unexpected {extra}); the checkpoint is "
            "incomplete or its config does not match its weights"
        )


def _layer_keys(ckpt: CheckpointReader, i: int) -> dict[str, str]:
    """{suffix: tensor name} of decoder layer i."""
    return {suffix: key for key, (j, suffix) in _layer_of(ckpt).items() if j == i}


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------
# Output laid out like an input: same shards, headers, index and side files; tensors streamed


def _stream_shard(output: CheckpointWriter, src: CheckpointReader, shard_name: str, produce) -> None:
    """Write `shard_name` of `src` to the output with the same header; `produce(key, info, dst)`
    returns True when it wrote the key's bytes itself, False to copy them from `src`."""
    shard = src.shard(shard_name)
    with output.open(shard_name) as dst:
        dst.write(shard.raw)
        for key, info in shard.tensors.items():
            if not produce(key, info, dst):
                src.copy_bytes(info, dst)


def _write_like(src: CheckpointReader, output: CheckpointWriter, produce) -> None:
    """Write a checkpoint with `src`'s shards, index and side files, tensors from `produce`;
    config.json goes last."""
    for shard in src.shard_names:
        _stream_shard(output, src, shard, produce)
    if src.index is not None:
        output.write_bytes(INDEX_NAME, src.index)
    output.copy_side_files(src.uri, src.files)
    output.copy_in(storage.join(src.uri, CONFIG_NAME), CONFIG_NAME)


def _stream_elementwise(dst, n: int, out_dtype: torch.dtype, sources, fn) -> None:
    """Write fn(*chunks).to(out_dtype) for each chunk of n elements read from `sources`
    [(checkpoint, info)], so that no whole tensor is ever in memory."""
    step = max(1, CHUNK_BYTES // max(info.dtype.itemsize for _, info in sources))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        parts = [ckpt.read_chunk(info, lo, hi) for ckpt, info in sources]
        dst.write(tensor_bytes(fn(*parts).to(out_dtype)))


# ---------------------------------------------------------------------------------------------
# Detach


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


@_surgery_errors
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
    with CheckpointReader(checkpoint) as ckpt:
        _check_architecture(ckpt)
        chosen = validate_layers(ckpt.config.num_hidden_layers, layers)
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


@_surgery_errors
def save_detached(checkpoint: str, layers: Sequence[int], out: str, *, overwrite: bool = False) -> str:
    """Write the ELO model of `checkpoint` (see `detach`) to `out` as its own HF checkpoint,
    with the base's tokenizer and generation files. Returns `out`."""
    with CheckpointWriter(out, overwrite=overwrite, inputs=[checkpoint]) as output:
        output.save_pretrained(detach(checkpoint, layers))
        output.copy_side_files(checkpoint, storage.listdir(checkpoint, files_only=True))
        return output.commit()


# ---------------------------------------------------------------------------------------------
# Merge


@_surgery_errors
def merge(base: str, elo: str, out: str, *, overwrite: bool = False) -> str:
    """Write `base` with decoder layer `layers[i]` replaced by the ELO model's layer `i`.

    `layers` comes from the ELO checkpoint's config (`elo_layers`, written by `detach`). The
    result keeps base's config, shard files, index and header layout, with ELO tensors cast to
    base's dtype; tokenizer and generation files come from base. Streams tensor by tensor.
    """
    with CheckpointReader(base) as b, CheckpointReader(elo) as e:
        for c in (b, e):
            _check_architecture(c)
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
        recorded = getattr(e.config, "elo_base_num_hidden_layers", b.config.num_hidden_layers)
        if recorded != b.config.num_hidden_layers:
            raise SurgeryError(
                f"the ELO model {e.uri} was detached from a {recorded}-layer model but base {b.uri} "
                f"has {b.config.num_hidden_layers} layers; merge into the base it was detached from"
            )
        layers = validate_layers(b.config.num_hidden_layers, layers)
        if len(layers) != e.config.num_hidden_layers:
            raise SurgeryError(
                f"{e.uri}/config.json lists elo_layers={list(layers)} but num_hidden_layers="
                f"{e.config.num_hidden_layers}; the ELO config is inconsistent"
            )
        replace: dict[str, str] = {}  # base tensor -> ELO tensor
        for i, layer in enumerate(layers):
            theirs, ours = _layer_keys(e, i), _layer_keys(b, layer)
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

        def produce(key: str, info: TensorInfo, dst) -> bool:
            if key not in replace:
                return False
            _stream_elementwise(dst, info.numel, info.dtype, [(e, e.info(replace[key]))], lambda x: x)
            return True

        with CheckpointWriter(out, overwrite=overwrite, inputs=[b.uri, e.uri]) as output:
            _write_like(b, output, produce)
            return output.commit()


# ---------------------------------------------------------------------------------------------
# Chat vector


@_surgery_errors
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

    Tensors whose names match a `skip` pattern (fnmatch over whole names, e.g.
    "model.embed_tokens.*"; a pattern that matches no tensor is an error) stay as in target; so
    do non-float tensors. All three must hold each other tensor with one shape.
    The result keeps target's config, shard layout, tokenizer and generation files.
    """
    if isinstance(skip, str):
        skip = (skip,)
    with CheckpointReader(target) as t, CheckpointReader(base) as b, CheckpointReader(instruct) as i:
        _check_patterns(skip, [*t.weight_map, *b.weight_map, *i.weight_map], "target, base or instruct")
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

        def produce(key: str, info: TensorInfo, dst) -> bool:
            if skipped(key) or not info.dtype.is_floating_point:
                return False
            compute = torch.promote_types(info.dtype, torch.float32)
            sources = [(t, info), (b, b.info(key)), (i, i.info(key))]

            def add(x, y, z):  # x + scale * (z - y), in place on z's chunk
                d = z.to(compute)
                return d.sub_(y).mul_(scale).add_(x)

            _stream_elementwise(dst, info.numel, info.dtype, sources, add)
            return True

        with CheckpointWriter(out, overwrite=overwrite, inputs=[t.uri, b.uri, i.uri]) as output:
            _write_like(t, output, produce)
            return output.commit()
