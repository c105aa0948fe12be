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

layers and lora_layers mix these per layer: a layer trained whole costs 3 * 2P + 3 * 4SHD, a
LoRA layer 2 * 2P + 3 * 4SHD + 3 * 2R, a frozen layer above the lowest trained one 2 * 2P +
3 * 4SHD (backward passes through it), one below it 2P + 4SHD (forward only); head 2 * 2dV.

MFU = achieved FLOP/s per worker / the device's peak dense FLOP/s (bf16 on GPU, or fp32 when
training in fp32). CPUs have no reliable peak: set ELO_RAY_PEAK_TFLOPS to get an MFU there.
"""

from __future__ import annotations

import json
import os
import resource
import time

import torch

from elo_ray import storage
from elo_ray.model_size import dims, layer_matmul_params, lora_params_per_layer


def train_flops_per_token(config, method: str, seq_len: int, lora_rank: int = 0,
                          full_layers: tuple[int, ...] | None = None) -> int:
    """Model FLOPs of one trained token (forward + backward), as in the module docstring;
    `full_layers` are the layers that methods layers and lora_layers train whole."""
    d = dims(config)
    n = d.num_layers
    if method in ("full", "elo"):
        whole = set(range(n))
    elif method == "lora":
        whole = set()
    elif method in ("layers", "lora_layers") and full_layers is not None:
        whole = set(full_layers)
    else:
        raise ValueError(f"unknown method {method!r}" if method not in ("layers", "lora_layers")
                         else f"method {method} needs full_layers")
    adapted = set(range(n)) - whole if method in ("lora", "lora_layers") else set()
    p = layer_matmul_params(config)
    attention = 4 * seq_len * d.heads * d.head_dim
    head = 2 * d.hidden * d.vocab
    lora = 3 * 2 * lora_params_per_layer(config, lora_rank)
    lowest = min(whole | adapted, default=n)
    total = 0
    for i in range(n):
        if i < lowest:
            total += 2 * p + attention  # forward only: nothing below it trains
        else:
            total += 2 * 2 * p + 3 * attention + (2 * p if i in whole else 0) + (lora if i in adapted else 0)
    return total + (3 if method == "full" else 2) * head


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


def duration(seconds: float) -> str:
    """A short human duration: 45s, 3m05s, 2h07m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Rank 0's progress line, one per log interval: steps done of the total, loss, tokens/s and
    the time left.

    The time left comes from the rate measured since training (re)started in this attempt: wall
    seconds per step from the first step on, checkpoints and data waits included, so it does not
    promise what the next checkpoint will take back. The first interval began when training did
    (its `interval_s` has nothing excluded), which dates the start without a clock in the loop."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.start: tuple[int, float] | None = None  # (step, time.monotonic()) training began at

    def line(self, m: dict, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        if self.start is None:
            self.start = (m.get("resumed_from_step", 0), now - m["interval_s"])
        step, total = m["step"], self.total_steps
        elapsed, done = now - self.start[1], step - self.start[0]
        if step >= total:
            when = f"took {duration(elapsed)}"
        else:
            when = f"ETA {duration((total - step) * elapsed / max(done, 1))}"
        return (f"step {step}/{total} ({100 * step // max(total, 1)}%) loss {m['loss']:.4f} "
                f"{m['tokens_per_s']:,.0f} tok/s {when}")


def progress_detail(m: dict) -> str:
    """The rest of a log interval's metrics, for --verbose: learning rate, gradient norm, FLOP/s,
    MFU, peak memory and the share of the interval spent waiting for data."""
    mfu = f" MFU {100 * m['mfu']:.1f}%" if m.get("mfu") is not None else ""
    wait = f" data wait {100 * m['data_wait_s'] / m['interval_s']:.0f}%" if m.get("interval_s") else ""
    return (
        f"step {m['step']} lr {m['lr']:.3g} grad_norm {m['grad_norm']:.3g} "
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
