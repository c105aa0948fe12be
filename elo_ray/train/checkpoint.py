"""Sharded DCP checkpoints through Ray Train: save every N steps, resume from the latest.

A checkpoint holds what changes during training, as one DCP checkpoint (one file per rank) of
three `Stateful` parts: "model" (the trainable parameters), "optim" (their optimizer state) and
"train_state" (`state.TrainState`: step, schedule, data position, token counts, the fingerprint
of the model it belongs to). Frozen parameters are not saved: they are read again from the
stage's input checkpoint, which never changes. Each rank saves into its own temporary directory
and reports it; Ray Train merges the ranks' files into one checkpoint directory in the run's
storage (local or object store). DCP reshards the model and optimizer state when the run resumes
on another number of workers.
"""

from __future__ import annotations

import shutil
import tempfile

import ray.train
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from elo_ray.train.errors import CheckpointMismatchError
from elo_ray.train.state import TrainState

TRAIN_STATE = "train_state"
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Frozen parameters are not in checkpoints (they come from the input checkpoint), so loading is
# not strict; `mismatches` has already checked that the trainable ones agree.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def fingerprint(model: nn.Module, config, method: str) -> dict:
    """What a checkpoint must agree on with the model it resumes: method, layers, shapes."""
    return {
        "method": method,
        "num_hidden_layers": config.num_hidden_layers,
        "elo_layers": getattr(config, "elo_layers", None),
        "params": {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad},
    }


def mismatches(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between a checkpoint's fingerprint and the model's."""
    out = []
    for key in ("method", "num_hidden_layers", "elo_layers"):
        if saved.get(key) != current.get(key):
            out.append(f"{key}: checkpoint {saved.get(key)!r}, model {current.get(key)!r}")
    sp, cp = saved.get("params", {}), current.get("params", {})
    missing = [n for n in cp if n not in sp]
    extra = [n for n in sp if n not in cp]
    if missing:
        out.append(f"parameters not in the checkpoint: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if extra:
        out.append(f"checkpoint parameters not in the model: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
    for n in cp:
        if n in sp and sp[n] != cp[n]:
            out.append(f"{n}: checkpoint shape {sp[n]}, model shape {cp[n]}")
    return out


class _Model(Stateful):
    """The trainable parameters, as DCP sees them (sharded, any world size)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model, options=_OPTIONS)

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state, options=_LOAD_OPTIONS)


class _Optimizer(Stateful):
    """The optimizer state of the trainable parameters, keyed by parameter name."""

    def __init__(self, model: nn.Module, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIONS)

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state, options=_LOAD_OPTIONS)


def save(model: nn.Module, optimizer, state: TrainState, metrics: dict) -> None:
    """Save a sharded checkpoint of step `state.step` and report it with `metrics`.

    Collective: every rank calls it (with the same, gathered `state`)."""
    tmp = tempfile.mkdtemp(prefix="elo-ray-ckpt-")
    try:
        dcp.save({"model": _Model(model), "optim": _Optimizer(model, optimizer), TRAIN_STATE: state},
                 checkpoint_id=tmp)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{state.step:08d}",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(model: nn.Module, optimizer, state: TrainState) -> bool:
    """Load the run's latest checkpoint into `model`, `optimizer` and `state`; False if there is none.

    Raises `CheckpointMismatchError` naming every difference when the checkpoint was written for
    another model (layers, shapes, method): a run never silently starts over."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
    # Per-rank download: as_directory() shares one temp dir between the ranks of a node.
    local = checkpoint.to_directory(tempfile.mkdtemp(prefix="elo-ray-resume-"))
    try:
        keys = dcp.FileSystemReader(local).read_metadata().state_dict_metadata
        if not any(k.startswith(TRAIN_STATE + ".") for k in keys):
            raise CheckpointMismatchError(
                f"checkpoint {checkpoint.path} has no {TRAIN_STATE}: not written by this version of elo-ray; "
                f"finish the run with the version that wrote it, or start a new run name"
            )
        expected = state.fingerprint
        dcp.load({TRAIN_STATE: state}, checkpoint_id=local)  # small: read first, to check the model
        problems = mismatches(state.fingerprint, expected)
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {checkpoint.path} (step {state.step}) does not match the model: "
                + "; ".join(problems)
                + ". Resume with the model and settings it was written with, or start a new run name."
            )
        dcp.load({"model": _Model(model), "optim": _Optimizer(model, optimizer)}, checkpoint_id=local)
        return True
    finally:
        shutil.rmtree(local, ignore_errors=True)
