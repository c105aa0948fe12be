"""The causal-LM loss of a micro-batch: cross-entropy of the head's logits, summed over label tokens.

Three ways to compute the same number (`TrainConfig.loss`):
- plain:   the model's logits for every token ([tokens, vocab], 1 GB in bf16 for 2 x 2048 tokens
           of a 128K vocabulary), upcast to fp32 for the loss: 2 GB more, and as much again for
           their gradient;
- chunked: the head and the loss together, over chunks of `loss_chunk_tokens` tokens
           (`linear_cross_entropy`): the gradients of the hidden states and of the head's
           weight are computed chunk by chunk in the forward pass, so only one chunk's logits
           ever exist, and no matrix product is done twice (forward 1x, backward 2x, as plain);
- liger:   liger-kernel's fused Triton kernel of the same (GPU only; `pip install
           'elo-ray[gpu]'`).
auto is liger where it is installed and the model is on a GPU, else chunked.

The head runs inside the model's forward either way (a hook on the decoder computes the loss
from its output, and the model computes logits for the last position only), so FSDP2 gathers
and reduces the head's weight exactly as when the model computes the logits itself.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(softcap(hidden @ weight.T), targets), one chunk of rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, softcap: float | None):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens]
            t = targets[start:start + chunk_tokens]
            # As the plain path: the product in the compute dtype, the loss in fp32.
            logits = (h @ weight.T).float()
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            valid = t != IGNORE_INDEX
            safe = torch.where(valid, t, 0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=1)
            loss += ((lse - logits.gather(1, safe).squeeze(1)) * valid).sum()
            if not (need_hidden or need_weight):
                continue
            # d loss / d logits = softmax - one_hot(target); nothing on ignored rows.
            grad = logits.sub_(lse.unsqueeze(1)).exp_()
            grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
            grad.mul_(valid.unsqueeze(1))
            if softcap is not None:
                grad.mul_(1 - capped * capped)
            grad = grad.to(weight.dtype)
            if need_hidden:
                torch.mm(grad, weight, out=grad_hidden[start:start + chunk_tokens])
            if need_weight:
                grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int = 1024, softcap: float | None = None) -> torch.Tensor:
    """sum(cross_entropy(softcap(hidden @ weight.T), targets)) over targets != -100, in fp32, without
    ever holding more than `chunk_tokens` rows of logits. hidden: [tokens, d], weight: [vocab, d],
    targets: [tokens]. softcap: Gemma's final_logit_softcapping (logits = c * tanh(logits / c))."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, softcap)


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve(loss: str, device: torch.device) -> str:
    """The loss implementation `loss` means on `device`: auto is liger on a GPU where liger-kernel
    is installed, else chunked; liger asked for where it cannot run is an error."""
    if loss == "auto":
        return "liger" if device.type == "cuda" and liger_available() else "chunked"
    if loss == "liger" and not (device.type == "cuda" and liger_available()):
        why = "liger-kernel is not installed (pip install 'elo-ray[gpu]')" if not liger_available() else \
            f"its Triton kernels need a GPU, and this worker runs on {device.type}"
        raise ValueError(f"train.loss is liger, but {why}; use loss: chunked (or auto)")
    return loss


def _liger(hidden, weight, targets, softcap):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum",
                                            softcap=softcap, accum_dtype=torch.float32)


def _decoder(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def summed_loss(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, impl: str,
                chunk_tokens: int = 1024) -> torch.Tensor:
    """The summed next-token loss of one micro-batch (targets already shifted, -100: no loss) by
    implementation `impl` (plain, chunked or liger, as `resolve` returns). No KV cache: training
    never decodes, and with one each compiled decoder layer recompiled for its layer index (on an
    H200, a 16-layer model hit torch._dynamo's recompile limit at the 8th layer and ran the rest
    eager)."""
    if impl == "plain":
        logits = model(input_ids=input_ids, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    found = {}

    def from_hidden_states(module, args, output):
        hidden = (output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]).flatten(0, 1)
        if impl == "liger":
            found["loss"] = _liger(hidden, head.weight, targets.flatten(), softcap)
        else:
            found["loss"] = linear_cross_entropy(hidden, head.weight, targets.flatten(), chunk_tokens, softcap)

    with _decoder(model).register_forward_hook(from_hidden_states):  # removed on leaving
        model(input_ids=input_ids, logits_to_keep=1, use_cache=False)  # the last position's logits only: nearly free
    return found["loss"]
