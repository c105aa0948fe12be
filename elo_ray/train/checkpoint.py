"""Sharded DCP checkpoints through Ray Train: save every N steps, resume from the latest.

A checkpoint holds what changes during training: the trainable parameters and their optimizer
state (DCP, one file per rank), and `train_state.json` (step, data position, scheduler, token
counts, and the fingerprint of the model it belongs to). Frozen parameters are not saved: they
are read again from the stage's input checkpoint, which never changes. Each rank saves into its
own temporary directory and reports it; Ray Train merges the ranks' files into one checkpoint
directory in the run's storage (local or object store).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import ray.train
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from elo_ray.train.errors import CheckpointMismatchError

STATE_FILE = "train_state.json"
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Frozen parameters are not in checkpoints (they come from the input checkpoint), so loading is
# not strict; `mismatches` has already checked that the trainable ones agree.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def fingerprint(model: nn.Module, config, method: str, world_size: int) -> dict:
    """What a checkpoint must agree on with the model it resumes: method, layers, shapes."""
    return {
        "method": method,
        "world_size": world_size,
        "num_hidden_layers": config.num_hidden_layers,
        "elo_layers": getattr(config, "elo_layers", None),
        "params": {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad},
    }


def mismatches(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between a checkpoint's fingerprint and the model's."""
    out = []
    for key in ("method", "num_hidden_layers", "elo_layers", "world_size"):
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


def _state(model: nn.Module, optimizer) -> dict:
    return {
        "model": get_model_state_dict(model, options=_OPTIONS),
        "optim": get_optimizer_state_dict(model, optimizer, options=_OPTIONS),
    }


def save(model: nn.Module, optimizer, train_state: dict, metrics: dict) -> None:
    """Save a sharded checkpoint of step `train_state['step']` and report it with `metrics`.

    Collective: every rank calls it."""
    tmp = tempfile.mkdtemp(prefix="elo-ray-ckpt-")
    try:
        dcp.save(_state(model, optimizer), checkpoint_id=tmp)
        if dist.get_rank() == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(train_state, f, indent=1)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{train_state['step']:08d}",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(model: nn.Module, optimizer, expected: dict) -> dict | None:
    """Load the run's latest checkpoint into `model` and `optimizer`; its train state, or None.

    Raises `CheckpointMismatchError` naming every difference when the checkpoint was written for
    another model (layers, shapes, method): a run never silently starts over."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    # Per-rank download: as_directory() shares one temp dir between the ranks of a node.
    local = checkpoint.to_directory(tempfile.mkdtemp(prefix="elo-ray-resume-"))
    try:
        path = os.path.join(local, STATE_FILE)
        if not os.path.isfile(path):
            raise CheckpointMismatchError(f"checkpoint {checkpoint.path} has no {STATE_FILE}: not written by elo-ray")
        with open(path) as f:
            train_state = json.load(f)
        problems = mismatches(train_state.get("fingerprint", {}), expected)
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {checkpoint.path} (step {train_state.get('step')}) does not match the model: "
                + "; ".join(problems)
                + ". Resume with the model and settings it was written with, or start a new run name."
            )
        state = _state(model, optimizer)
        dcp.load(state, checkpoint_id=local)
        set_model_state_dict(model, state["model"], options=_LOAD_OPTIONS)
        set_optimizer_state_dict(model, optimizer, state["optim"], options=_LOAD_OPTIONS)
        return train_state
    finally:
        shutil.rmtree(local, ignore_errors=True)
