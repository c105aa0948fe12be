"""Training FLOPs, MFU, peak memory and the metrics log (JSON lines in the run's storage).

FLOPs per trained token count what is really computed (model FLOPs, the PaLM convention:
a multiply-add is 2 FLOPs; activation-checkpointing recompute is not counted). For a decoder
layer with P weight-matrix parameters and, per token, attention over S positions with H heads of
size D:

    forward(layer) = 2 P  +  4 S H D        (weights; QK^T and AV over the full S x S square)
    forward(head)  = 2 d V                 (hidden d, vocabulary V; the embedding is a lookup: 0)

Backward computes the gradient of the activations (1x forward) wherever something below still
trains, and the gradient of the weights (1x forward of those weights) only for trained ones:

    elo   = L (3 * 2P + 3 * 4SHD)        + 2 * 2dV     only the L detached layers exist; the
                                                       frozen head back-propagates, no weight grad
    full  = L (3 * 2P + 3 * 4SHD)        + 3 * 2dV
    lora  = L (2 * 2P + 3 * 4SHD + 3 * 2R) + 2 * 2dV   R = adapter parameters per layer

MFU = achieved FLOP/s per worker / the device's peak dense FLOP/s (bf16 on GPU, or fp32 when
training in fp32). CPUs have no reliable peak: set ELO_RAY_PEAK_TFLOPS to get an MFU there.
"""

from __future__ import annotations

import json
import os
import resource

import torch

from elo_ray import storage


def layer_matmul_params(config) -> int:
    """Weight-matrix parameters of one decoder layer (attention + gated MLP)."""
    d = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attention = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * d * config.intermediate_size  # gate, up, down
    return attention + mlp


def lora_params_per_layer(config, rank: int) -> int:
    """Adapter parameters of one layer with LoRA on every linear (r * (in + out) each)."""
    d = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    ff = config.intermediate_size
    shapes = [(d, heads * head_dim), (d, kv * head_dim), (d, kv * head_dim), (heads * head_dim, d),
              (d, ff), (d, ff), (ff, d)]
    return sum(rank * (i + o) for i, o in shapes)


def train_flops_per_token(config, method: str, seq_len: int, lora_rank: int = 0) -> int:
    """Model FLOPs of one trained token (forward + backward), as in the module docstring."""
    layers = config.num_hidden_layers
    p = layer_matmul_params(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = 4 * seq_len * heads * head_dim
    head = 2 * config.hidden_size * config.vocab_size
    if method == "full":
        return layers * (3 * 2 * p + 3 * attention) + 3 * head
    if method == "elo":
        return layers * (3 * 2 * p + 3 * attention) + 2 * head
    if method == "lora":
        return layers * (2 * 2 * p + 3 * attention + 3 * 2 * lora_params_per_layer(config, lora_rank)) + 2 * head
    raise ValueError(f"unknown method {method!r}")


# Peak dense tensor-core TFLOP/s (bf16, fp32) by device-name fragment, from vendor data sheets.
PEAK_TFLOPS = {
    "H200": (989.0, 67.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "A10": (125.0, 31.2),
}


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak dense TFLOP/s for `dtype`; None when unknown (CPUs)."""
    if os.environ.get("ELO_RAY_PEAK_TFLOPS"):
        return float(os.environ["ELO_RAY_PEAK_TFLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (bf16, fp32) in PEAK_TFLOPS.items():
        if fragment in name:
            return bf16 if dtype == torch.bfloat16 else fp32
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or on CPU the process's peak resident set, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def progress_line(m: dict, total_steps: int) -> str:
    """One human-readable line per log interval."""
    mfu = f" MFU {100 * m['mfu']:.1f}%" if m.get("mfu") is not None else ""
    wait = f" data wait {100 * m['data_wait_s'] / m['interval_s']:.0f}%" if m.get("interval_s") else ""
    return (
        f"step {m['step']}/{total_steps} loss {m['loss']:.4f} lr {m['lr']:.3g} "
        f"grad_norm {m['grad_norm']:.3g} {m['tokens_per_s']:,.0f} tok/s "
        f"{m['tflops_per_worker']:.3g} TFLOP/s/worker{mfu} mem {m['peak_memory_gb']:.2f} GiB{wait}"
    )


class MetricsLog:
    """Metric records of a run, kept as JSON lines at `uri` (rank 0 writes the whole file)."""

    def __init__(self, uri: str, records: list[dict] | None = None):
        self.uri = uri
        self.records = records or []

    @classmethod
    def resume(cls, uri: str, up_to_step: int) -> "MetricsLog":
        """The records already written, without any past `up_to_step` (the resumed checkpoint)."""
        records = []
        if storage.exists(uri):
            lines = storage.read_text(uri).splitlines()
            records = [r for r in map(json.loads, filter(None, lines)) if r.get("step", 0) <= up_to_step]
        return cls(uri, records)

    def append(self, record: dict) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "".join(json.dumps(r) + "\n" for r in self.records)

    def write(self, *extra_uris: str | None) -> None:
        for uri in (self.uri, *extra_uris):
            if uri:
                storage.write_text(uri, self.text())
