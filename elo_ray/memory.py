"""Will it fit? The per-GPU memory of each training stage, before any GPU hour is spent.

Arithmetic on a job spec and a Hugging Face config: no GPU, no weights, no Ray. `elo-ray
validate` prints `memory_warnings` (against resources.gpu_type, or the GPU of the cluster file
given with --cluster, see clusters.py). Which stages train, on which data and with which
settings, comes from the stage table; parameter counts from model_size.py.

Memory per GPU of one stage at its peak, as elo_ray/train builds the stage: fp32 parameters
sharded by FSDP2 over N = resources.num_workers GPUs (one unit per decoder layer, one root unit
for the rest), bf16 compute through FSDP's mixed precision, AdamW. P the stage model's
parameters, T the trainable ones, c bytes per compute element (bf16: 2, fp32: 4):
    weights      P*4/N fp32 shards (they are AdamW's master weights), plus the copies FSDP
                 gathers whole in compute precision: the root unit (embedding, final norm, head),
                 which stays gathered through forward and backward, and two decoder layers (the
                 one computing and the one prefetched): (root + 2*layer)*c
    optimizer    T*8/N: AdamW's two fp32 moments. With the fp32 master in the weights that is
                 the usual 16 bytes per trained parameter; a frozen one costs 4 bytes.
    activations  per micro-batch of b sequences of s tokens (b*s tokens):
                 without checkpointing  L * b*s * A + b*s * H
                 with checkpointing     L * b*s * c*h + b*s * A + b*s * H
                 (each layer keeps its input; one layer is recomputed at a time)
    grads        backward frees activations as it makes gradients, so the two do not peak
                 together. At the start of backward every activation is alive and only the
                 head's gradient exists (V*h*c, full fine-tuning); at its end the activations
                 are gone and every gradient exists: T*4/N fp32 shards plus the gathered units'
                 gradients before their reduce-scatter. The peak is the larger moment, and the
                 breakdown shows that moment (activations 0 when it is the end of backward).
    other        OTHER_GIB (CUDA context, NCCL buffers) + ALLOCATOR_SLACK of the rest
Which parameters train (T) and which layers keep activations follow `train.method`: full and
elo train every layer; lora adapters R per layer; layers trains the layers of
`train.full_layers` whole and freezes the rest; lora_layers adds adapters on the rest. A frozen
layer above the lowest trained one saves A minus what only weight gradients need (the inputs of
its linear layers and its norms' normalised x):
    A_frozen = A - c*(2h + i) - n_norm*r*h  (- r*(q+kv) with qk_norm, - c*q with eager attention)
and a layer below the lowest trained one saves nothing (no gradient reaches it).
With `train.offload_to_cpu` (FSDP2's CPUOffloadPolicy) the P*4/N shards, the T*4/N gradient
shards and the T*8/N optimizer state are in host memory (`host_gib`, per worker); the GPU keeps
the gathered compute copies, each unit's fp32 shard while it is copied in for the all-gather,
the gathered units' gradients before their reduce-scatter, and the activations.
with A the bytes one decoder layer saves for backward per token, counted from what PyTorch
saves in a bf16 Hugging Face layer with SDPA/flash attention (no s*s attention matrix), and
checked in tests against the tensors a real forward saves:
    A = n_norm*(4h + 4 + r*h)        RMSNorm: fp32 input, 1/rms, normalised x (r = c, Gemma: 4)
      + c*(2h + i)                   inputs of q/k/v and gate/up (shared), and of down
      + c*(2q + 2kv) + 4*nh          attention: q, k, v, output, fp32 log-sum-exp
                                     (Gemma2, eager: 4*c*q + nh*s*(2c + 4), scores kept)
      + 3*c*i                        gate output, up output, activation output
      + qk_norm: 4(q+kv) + 4(nh+nkv) + r*(q+kv)
and H the bytes per token of the final norm and the head, dominated by the logits:
    H = 4h + 4 + r*h + c*h + 8 + 8 + 2*c*d + (c + 4 + 4 + 4)*V
    (final norm, head input, token ids and labels, rotary cos/sin, then per vocabulary entry the
    bf16 logits, the fp32 log-probabilities cross-entropy keeps, and at the start of backward
    the fp32 gradients of both; Gemma2's logit soft-capping adds c*V). For Llama-3.1-8B at
    8192 tokens the logits alone take 13.7 GiB.

Checked on one H100 (torch 2.11, FSDP2 built as train/model.py builds it, Llama-3.1-8B sizes
with 2 to 6 layers, 8192 tokens per micro-batch, with and without checkpointing): the estimate
without `other` was 3-8% above the measured peak of allocated memory. The caching allocator
reserved 6-20% more than it allocated with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
(the image sets it), which `other` covers, but 16-36% more without it. Ray Data's buffers and
a loop that differs from stock Hugging Face and FSDP2 move the real number too: treat these as
estimates good to about ten percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elo_ray import stage_table
from elo_ray.config import JobSpec, TrainConfig, apply_overrides, spec_from_dict
from elo_ray.model_size import dims, lora_params_per_layer, param_counts

GIB = 1024**3
OTHER_GIB = 2.0
"""CUDA context (~0.5 GiB), NCCL communicators and buffers."""
ALLOCATOR_SLACK = 0.10
"""What PyTorch's caching allocator reserves beyond what tensors use, as a share of the rest."""

GPUS: dict[str, float] = {
    "A100-40GB": 40.0,
    "A100-80GB": 80.0,
    "H100-80GB": 80.0,
    "H200-141GB": 141.0,
    "L4-24GB": 24.0,
    "A10G-24GB": 24.0,
}
"""GPU memory in GiB by name, as `memory_warnings` names them."""


# --------------------------------------------------------------------------- activations


def layer_activation_bytes(model_config: Any, compute_bytes: int = 2, seq_len: int = 2048) -> int:
    """Bytes one decoder layer saves for backward per token (A in the module docstring);
    `seq_len` matters only for eager attention, whose saved scores grow with it."""
    d = dims(model_config)
    c, h, i = compute_bytes, d.hidden, d.intermediate
    r = 4 if d.arch.fp32_norm_output else c
    norms = d.arch.norms_per_layer * (4 * h + 4 + r * h)
    linear_inputs = c * (2 * h + i)
    if d.arch.eager_attention:
        # q, k and v repeated to all heads, o_proj's input; scores, fp32 softmax, bf16 probs
        attention = 4 * c * d.q + d.heads * seq_len * (2 * c + 4)
    else:
        attention = c * (2 * d.q + 2 * d.kv) + 4 * d.heads
    mlp = 3 * c * i
    qk_norm = (4 * (d.q + d.kv) + 4 * (d.heads + d.kv_heads) + r * (d.q + d.kv)) if d.arch.qk_norm else 0
    return norms + linear_inputs + attention + mlp + qk_norm


def frozen_layer_savings(model_config: Any, compute_bytes: int = 2) -> int:
    """Bytes per token that a frozen decoder layer does not save, of what a trained one does
    (A - A_frozen in the module docstring): what only its weight gradients need."""
    d = dims(model_config)
    c = compute_bytes
    r = 4 if d.arch.fp32_norm_output else c
    saved = c * (2 * d.hidden + d.intermediate) + d.arch.norms_per_layer * r * d.hidden
    if d.arch.qk_norm:
        saved += r * (d.q + d.kv)
    if d.arch.eager_attention:  # o_proj's input is a copy of the attention output there
        saved += c * d.q
    return saved


def head_activation_bytes(model_config: Any, compute_bytes: int = 2) -> int:
    """Bytes per token of the final norm, the head and the loss at their peak (H)."""
    d = dims(model_config)
    c, h = compute_bytes, d.hidden
    r = 4 if d.arch.fp32_norm_output else c
    softcap = c * d.vocab if d.logit_softcap else 0  # Gemma2 keeps tanh(logits / cap)
    return (4 * h + 4 + r * h) + c * h + 16 + 2 * c * d.head_dim + (c + 12) * d.vocab + softcap


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class StageMemory:
    """Estimated memory per GPU of one training stage, in GiB."""

    stage: str
    params: int
    trainable: int
    num_gpus: int
    seq_len: int
    micro_batch_size: int
    activation_checkpointing: bool
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    other_gib: float
    gpu_memory_gib: float
    host_gib: float = 0.0  # per worker in host memory: what offload_to_cpu moved off the GPU

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib + self.other_gib

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.gpu_memory_gib

    def breakdown(self) -> str:
        host = f"; {self.host_gib:.1f} more in host memory (offload_to_cpu)" if self.host_gib else ""
        return (
            f"weights {self.weights_gib:.1f}, grads {self.grads_gib:.1f}, "
            f"optimizer {self.optimizer_gib:.1f}, activations {self.activations_gib:.1f}, "
            f"other {self.other_gib:.1f}{host}"
        )


def _compute_bytes(train: TrainConfig, use_gpu: bool) -> int:
    if train.precision == "fp32" or (train.precision == "auto" and not use_gpu):
        return 4
    return 2


def _stage_memory(
    stage: str,
    train: TrainConfig,
    seq_len: int,
    num_layers: int,
    spec: JobSpec,
    model_config: Any,
    gpu_memory_gib: float,
) -> StageMemory:
    counts = param_counts(model_config)
    d = dims(model_config)
    n = spec.resources.num_workers
    c = _compute_bytes(train, spec.resources.use_gpu)
    whole, adapted = _trained_layers(train, num_layers)
    lora_per_layer = lora_params_per_layer(model_config, train.lora_rank)
    root_trainable = counts.root if train.method == "full" else 0
    lora = lora_per_layer * len(adapted)
    params = counts.with_layers(num_layers) + lora
    trainable = len(whole) * counts.layer + lora + root_trainable
    layer_trainable = counts.layer if whole else lora_per_layer  # of the largest gathered unit
    gathered_layers = min(2, num_layers)
    gathered = (counts.root + gathered_layers * counts.layer) * c

    tokens = train.micro_batch_size * seq_len
    per_layer = layer_activation_bytes(model_config, c, seq_len)
    frozen = per_layer - frozen_layer_savings(model_config, c)
    lowest = min(whole | adapted, default=num_layers)
    saving = range(lowest, num_layers)  # no gradient reaches a layer below the lowest trained one
    if train.activation_checkpointing:
        layers = len(saving) * tokens * c * d.hidden + (tokens * per_layer if saving else 0)
    else:
        layers = tokens * sum(per_layer if i in whole | adapted else frozen for i in saving)
    activations = layers + tokens * head_activation_bytes(model_config, c)

    # The gathered units' gradients exist before their reduce-scatter; the fp32 gradient shards
    # (T*4/N) live on the GPU, or in host memory with offload, as do the weights' shards and
    # AdamW's state.
    unit_grads = (root_trainable + gathered_layers * layer_trainable) * c
    host = 0.0
    if train.offload_to_cpu:
        weights = gathered + max(counts.root, counts.layer) * 4 / n  # the shard copied in for the all-gather
        optimizer, all_grads = 0.0, unit_grads
        host = (params * 4 + trainable * 4 + trainable * 8) / n
    else:
        weights = params * 4 / n + gathered
        optimizer, all_grads = trainable * 8 / n, trainable * 4 / n + unit_grads

    # Gradients appear as backward frees activations, so the two never peak together. At the
    # start of backward all activations live and only the head's gradient exists (full
    # fine-tuning); at its end the activations are gone and every gradient exists.
    head_grad = (counts.head or counts.embedding) * c if train.method == "full" else 0
    if activations + head_grad >= all_grads:
        grads = head_grad
    else:
        grads, activations = all_grads, 0.0
    subtotal = (weights + grads + optimizer + activations) / GIB

    return StageMemory(
        stage=stage,
        params=params,
        trainable=trainable,
        num_gpus=n,
        seq_len=seq_len,
        micro_batch_size=train.micro_batch_size,
        activation_checkpointing=train.activation_checkpointing,
        weights_gib=weights / GIB,
        grads_gib=grads / GIB,
        optimizer_gib=optimizer / GIB,
        activations_gib=activations / GIB,
        other_gib=OTHER_GIB + ALLOCATOR_SLACK * subtotal,
        gpu_memory_gib=gpu_memory_gib,
        host_gib=host / GIB,
    )


def _trained_layers(train: TrainConfig, num_layers: int) -> tuple[set[int], set[int]]:
    """(layers trained whole, layers with LoRA adapters) of a stage model of `num_layers` layers."""
    if train.method in ("full", "elo"):
        return set(range(num_layers)), set()
    whole = set(train.full_layers(num_layers)) if train.method in stage_table.LAYER_METHODS else set()
    adapted = set(range(num_layers)) - whole if train.method in ("lora", "lora_layers") else set()
    return whole, adapted


def estimate_memory(spec: JobSpec, model_config: Any, gpu_memory_gib: float) -> list[StageMemory]:
    """Per-GPU memory of each enabled training stage (stage_table.trainings): pretrain trains the
    ELO model (len(pretrain.layers) decoder layers + embedding + head), align and instruct the full model."""
    full = dims(model_config).num_layers
    return [
        _stage_memory(t.stage, t.train, t.data.seq_len, len(spec.pretrain.layers) if t.elo else full, spec,
                      model_config, gpu_memory_gib)
        for t in stage_table.trainings(spec)
    ]


def _article(name: str) -> str:
    # Letters whose spoken name starts with a vowel sound: "an A100", "an H100", "a T4".
    return "an" if name[:1].upper() in "AEFHILMNORSX" else "a"


def _with_overrides(spec: JobSpec, overrides: list[str]) -> JobSpec:
    """A copy of `spec` with `--set key=value` overrides, applied as the command line applies them."""
    return spec_from_dict(apply_overrides(spec.model_dump(mode="json"), overrides))


def _remedy(m: StageMemory, spec: JobSpec, model_config: Any) -> str:
    """What to change, each option tried on a copy of the spec and shown with its new estimate:
    the options that fit on their own, or else every option that helps (to combine)."""
    stage, n = m.stage, spec.resources.num_workers
    seq_key, seq = stage_table.training(spec, stage).seq_len_key, m.seq_len
    # (what to tell the user, the --set overrides it means)
    options: list[tuple[str, list[str]]] = []
    if not m.activation_checkpointing:
        options.append((f"turn on {stage}.train.activation_checkpointing", [f"{stage}.train.activation_checkpointing=true"]))
    if m.micro_batch_size > 1:
        accum = stage_table.training(spec, stage).train.grad_accum * m.micro_batch_size
        options.append((
            f"lower {stage}.train.micro_batch_size to 1 and raise grad_accum {m.micro_batch_size}x, to {accum}",
            [f"{stage}.train.micro_batch_size=1", f"{stage}.train.grad_accum={accum}"],
        ))
    if seq >= 1024:
        options.append((f"lower {seq_key} to {seq // 2}", [f"{seq_key}={seq // 2}"]))
    options.append((f"shard over {2 * n} GPUs (resources.num_workers: {2 * n})", [f"resources.num_workers={2 * n}"]))
    options += _method_options(spec, stage)
    fitting, helping = [], []
    for text, overrides in options:
        trial = _with_overrides(spec, overrides)
        new = next(x for x in estimate_memory(trial, model_config, m.gpu_memory_gib) if x.stage == stage)
        if new.total_gib < 0.95 * m.total_gib:
            (fitting if new.fits else helping).append(f"{text} (~{new.total_gib:.1f} GiB)")
    if fitting:
        return " or ".join(fitting)
    if helping:
        return "no single change is enough; combine: " + ", ".join(helping)
    return "use GPUs with more memory"


def _method_options(spec: JobSpec, stage: str) -> list[tuple[str, list[str]]]:
    """Ways to train `stage` with less memory that change what trains or where its state lives
    (what each keeps of full alignment's recovery: benchmarks/README.md)."""
    train = stage_table.training(spec, stage).train
    options = []
    if not train.offload_to_cpu:
        options.append((f"keep {stage}'s weight shards, gradients and optimizer state in host memory "
                        f"({stage}.train.offload_to_cpu: true; the same result, slower)",
                        [f"{stage}.train.offload_to_cpu=true"]))
    if train.method == "full":
        options.append((f"train only the detached layers and their neighbours ({stage}.train.method: layers)",
                        [f"{stage}.train.method=layers"]))
        options.append((f"train those layers whole and LoRA adapters on the rest ({stage}.train.method: lora_layers)",
                        [f"{stage}.train.method=lora_layers"]))
    return options


def memory_warnings(
    spec: JobSpec,
    model_config: Any,
    gpu_memory_gib: float = GPUS["A100-80GB"],
    gpu_name: str = "A100-80GB",
) -> list[str]:
    """One line per training stage whose estimate exceeds the GPU's memory, with the numbers
    and what to change. Empty for CPU runs (resources.use_gpu false): no GPU memory to exceed."""
    if not spec.resources.use_gpu:
        return []
    lines = []
    for m in estimate_memory(spec, model_config, gpu_memory_gib):
        if m.fits:
            continue
        lines.append(
            f"{m.stage}: estimated {m.total_gib:.1f} GiB per GPU ({m.breakdown()}) exceeds the "
            f"{gpu_memory_gib:g} GiB of {_article(gpu_name)} {gpu_name}; {_remedy(m, spec, model_config)}"
        )
    return lines

