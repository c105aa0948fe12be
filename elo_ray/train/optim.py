"""AdamW over the trainable parameters and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from elo_ray.config import TrainConfig


def build_optimizer(model: nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters only (frozen ones get no state); no decay on norms/biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(
        # With offload_to_cpu the parameters and their state are in host memory: the step runs there.
        groups, lr=train.lr, betas=tuple(train.betas), fused=device.type == "cuda" and not train.offload_to_cpu
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warm-up, then cosine
    from 1 down to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int | Callable[[], int]):
    """The warm-up + cosine schedule over `total_steps` (a number, or a function read at every
    step: the train state's schedule length, which a resumed run restores)."""
    length = total_steps if callable(total_steps) else (lambda: total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, train.warmup_steps, length(), train.min_lr_ratio)
    )
