"""One optimizer step of the worker loop, and the check that a batch fits the model.

No Ray here: the loop calls these in every worker, and the benchmark's bare-vs-engine comparison
calls them on a single-process group. Both are collective (every rank calls them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from elo_ray.train.errors import TrainingError
from elo_ray.train.reader import Batch

# (model, input_ids, targets) -> the summed loss over the targets that are not -100
Loss = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BatchStats:
    """What `check_batches` learned of a step's micro-batches on all ranks."""

    label_tokens: int  # tokens that carry loss
    tokens: int  # input tokens
    seq_len: int  # of this rank's micro-batches


@dataclass
class StepResult:
    loss: float  # mean over the step's label tokens on all ranks
    grad_norm: float  # before clipping
    finite: bool  # False: NaN/inf loss or norm; the update was not applied


def check_batches(micro: list[Batch], config, step: int, device: torch.device) -> BatchStats:
    """The step's token counts on all ranks; raises `TrainingError` on every rank when any rank's
    batch of `step` does not fit the model. Two small collectives, one host sync."""
    longest = max(b["input_ids"].shape[1] for b in micro)
    highest = max(int(b["input_ids"].max()) for b in micro)
    lowest = min(int(b["input_ids"].min()) for b in micro)
    mismatched = max(int(b["labels"].shape != b["input_ids"].shape) for b in micro)
    worst = torch.tensor([longest, highest, -lowest, mismatched], dtype=torch.int64, device=device)
    counts = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro),
                           sum(b["input_ids"].numel() for b in micro)], dtype=torch.int64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    dist.all_reduce(counts)
    longest, highest, lowest, mismatched, label_tokens, tokens = torch.cat([worst, counts]).tolist()
    lowest = -lowest
    where = f"a batch of step {step}"
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and longest > max_pos:
        raise TrainingError(
            f"{where} has sequences of {longest} tokens, longer than the model's "
            f"max_position_embeddings {max_pos}; set data.seq_len to at most {max_pos}"
        )
    if highest >= config.vocab_size or lowest < 0:
        bad = highest if highest >= config.vocab_size else lowest
        raise TrainingError(
            f"{where} has token id {bad}, outside the model's vocabulary of {config.vocab_size}; "
            f"the data was tokenized with a tokenizer that does not belong to this model"
        )
    if mismatched:
        raise TrainingError(f"{where} has labels of another shape than input_ids; labels must align with input_ids")
    return BatchStats(label_tokens, tokens, micro[0]["input_ids"].shape[1])


def train_step(model, optimizer, micro: list[Batch], stats: BatchStats, grad_clip: float | None,
               device: torch.device, world: int, loss: Loss) -> StepResult:
    """Forward/backward over the micro-batches, clip, and the optimizer update (skipped when the
    loss or the gradient norm is not finite). `loss(model, input_ids, targets)` is the summed
    loss of a micro-batch (`StageModel.loss`). Collective: every rank calls it. One host sync (the
    loss and the norm together), so the GPU is not left waiting between kernels."""
    # FSDP averages gradients over ranks; this scale makes the result the mean over all label tokens.
    scale = world / max(stats.label_tokens, 1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for b in micro:
        input_ids = b["input_ids"].to(device, non_blocking=True)
        labels = b["labels"].to(device, non_blocking=True)
        # Predict token i+1 at position i; the last position has nothing to predict.
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        summed = loss(model, input_ids, targets)
        (summed * scale).backward()
        loss_sum += summed.detach()
    dist.all_reduce(loss_sum)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if grad_clip:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    loss_sum, grad_norm = torch.stack([loss_sum, norm.to(loss_sum)]).tolist()
    loss = loss_sum / max(stats.label_tokens, 1)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, finite)
