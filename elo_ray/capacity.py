"""Will it fit? Per-GPU memory of each training stage, and the cluster a spec asks for.

Everything here is arithmetic on a job spec and a Hugging Face config: no GPU, no weights,
no Ray. `elo-ray validate` prints `memory_warnings` and `resource_warnings` before any GPU
hour is spent.

Parameters, from the config alone (h hidden, i intermediate, V vocab, nh/nkv attention and
key-value heads, d head_dim, q = nh*d, kv = nkv*d):
    embedding   V*h
    layer       attention h*q + 2*h*kv + q*h  (+ q + 2*kv biases in Qwen2, + q + 2*kv + h with
                `attention_bias`), q/k norms 2*d (Qwen3, Gemma3), MLP 3*h*i (+ 2*i + h with
                `mlp_bias`), norms 2*h (Gemma2/3: 4*h)
    final norm  h
    head        V*h, or 0 when `tie_word_embeddings`
Llama-3.1-8B: 525.3M + 32 * 218.1M + 4096 + 525.3M = 8.03B.

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from elo_ray import stage_table
from elo_ray.config import JobSpec, TrainConfig

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

# Cloud machine -> (GPUs, GPU name, vCPUs) for the machines the cluster files use and their kin.
MACHINES: dict[str, tuple[int, str, int]] = {
    "p4d.24xlarge": (8, "A100-40GB", 96),
    "p4de.24xlarge": (8, "A100-80GB", 96),
    "p5.48xlarge": (8, "H100-80GB", 192),
    "p5e.48xlarge": (8, "H200-141GB", 192),
    "p5en.48xlarge": (8, "H200-141GB", 192),
    "g5.48xlarge": (8, "A10G-24GB", 192),
    "a2-highgpu-8g": (8, "A100-40GB", 96),
    "a2-ultragpu-8g": (8, "A100-80GB", 96),
    "a3-highgpu-8g": (8, "H100-80GB", 208),
    "a3-megagpu-8g": (8, "H100-80GB", 208),
    "a3-ultragpu-8g": (8, "H200-141GB", 224),
    "g2-standard-96": (8, "L4-24GB", 96),
}
# GKE accelerator label -> GPU name.
ACCELERATORS: dict[str, str] = {
    "nvidia-tesla-a100": "A100-40GB",
    "nvidia-a100-80gb": "A100-80GB",
    "nvidia-h100-80gb": "H100-80GB",
    "nvidia-h100-mega-80gb": "H100-80GB",
    "nvidia-h200-141gb": "H200-141GB",
    "nvidia-l4": "L4-24GB",
}


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Architecture:
    """What a decoder layer holds beyond the Llama layout, by `model_type`."""

    qkv_bias: bool = False  # Qwen2: biases on q/k/v whatever `attention_bias` says
    qk_norm: bool = False  # Qwen3, Gemma3: RMSNorm over head_dim on q and k
    norms_per_layer: int = 2  # Gemma2/3 add pre/post feed-forward norms
    fp32_norm_output: bool = False  # Gemma's RMSNorm keeps its normalised x in fp32
    eager_attention: bool = False  # Gemma2: no SDPA in transformers, so s*s scores are kept


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(),
    "mistral": Architecture(),
    "qwen2": Architecture(qkv_bias=True),
    "qwen3": Architecture(qk_norm=True),
    "gemma": Architecture(fp32_norm_output=True),
    "gemma2": Architecture(norms_per_layer=4, fp32_norm_output=True, eager_attention=True),
    "gemma3_text": Architecture(qk_norm=True, norms_per_layer=4, fp32_norm_output=True),
}
"""Unknown model types are counted as the Llama layout, the common decoder of this family."""


@dataclass(frozen=True)
class Dims:
    """The sizes of a decoder LM that memory depends on."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    attention_bias: bool
    mlp_bias: bool
    logit_softcap: bool

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES.get(self.model_type, Architecture())


def dims(model_config: Any) -> Dims:
    """Sizes from a `transformers.PretrainedConfig` (the text part of a multimodal one)."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    return Dims(
        model_type=cfg.model_type,
        vocab=cfg.vocab_size,
        hidden=hidden,
        intermediate=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or hidden // heads,
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(cfg, "attention_bias", False)),
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        logit_softcap=bool(getattr(cfg, "final_logit_softcapping", None)),
    )


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a decoder LM by part; `total` is what `sum(p.numel())` gives."""

    embedding: int
    layer: int
    norm: int
    head: int
    num_layers: int

    def with_layers(self, n: int) -> int:
        """Parameters of the same model with `n` decoder layers (the ELO model)."""
        return self.embedding + n * self.layer + self.norm + self.head

    @property
    def root(self) -> int:
        """What FSDP's root group holds: everything outside the decoder layers."""
        return self.embedding + self.norm + self.head

    @property
    def total(self) -> int:
        return self.with_layers(self.num_layers)


def param_counts(model_config: Any) -> ParamCounts:
    """Parameter counts computed from the config (formulas in the module docstring)."""
    d = dims(model_config)
    h, i = d.hidden, d.intermediate
    attention = h * d.q + 2 * h * d.kv + d.q * h
    if d.arch.qkv_bias:
        attention += d.q + 2 * d.kv
    elif d.attention_bias:
        attention += d.q + 2 * d.kv + h
    if d.arch.qk_norm:
        attention += 2 * d.head_dim
    mlp = 3 * h * i + ((2 * i + h) if d.mlp_bias else 0)
    layer = attention + mlp + d.arch.norms_per_layer * h
    return ParamCounts(
        embedding=d.vocab * h,
        layer=layer,
        norm=h,
        head=0 if d.tied else d.vocab * h,
        num_layers=d.num_layers,
    )


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

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib + self.other_gib

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.gpu_memory_gib

    def breakdown(self) -> str:
        return (
            f"weights {self.weights_gib:.1f}, grads {self.grads_gib:.1f}, "
            f"optimizer {self.optimizer_gib:.1f}, activations {self.activations_gib:.1f}, "
            f"other {self.other_gib:.1f}"
        )


def _compute_bytes(train: TrainConfig, use_gpu: bool) -> int:
    if train.precision == "fp32" or (train.precision == "auto" and not use_gpu):
        return 4
    return 2


def _lora_params(d: Dims, rank: int, num_layers: int) -> int:
    """LoRA A and B on every projection of every layer: rank * (in + out) each."""
    per_layer = (d.hidden + d.q) * 2 + (d.hidden + d.kv) * 2 + (d.hidden + d.intermediate) * 3
    return rank * per_layer * num_layers


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
    params = counts.with_layers(num_layers)
    lora = 0
    if train.method == "full":
        trainable, root_trainable = params, counts.root
    elif train.method == "elo":  # every decoder layer of the stage's model trains (train/model.py)
        trainable, root_trainable = num_layers * counts.layer, 0
    else:
        lora = _lora_params(d, train.lora_rank, num_layers)
        trainable, root_trainable = lora, 0
    params += lora
    layer_trainable = counts.layer if train.method != "lora" else lora // max(num_layers, 1)
    gathered_layers = min(2, num_layers)

    weights = params * 4 / n + (counts.root + gathered_layers * counts.layer) * c
    optimizer = trainable * 8 / n

    tokens = train.micro_batch_size * seq_len
    per_layer = layer_activation_bytes(model_config, c, seq_len)
    if train.activation_checkpointing:
        layers = num_layers * tokens * c * d.hidden + tokens * per_layer
    else:
        layers = num_layers * tokens * per_layer
    activations = layers + tokens * head_activation_bytes(model_config, c)

    # Gradients appear as backward frees activations, so the two never peak together. At the
    # start of backward all activations live and only the head's gradient exists (full
    # fine-tuning); at its end the activations are gone and every gradient exists.
    head_grad = (counts.head or counts.embedding) * c if train.method == "full" else 0
    all_grads = trainable * 4 / n + (root_trainable + gathered_layers * layer_trainable) * c
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
    )


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


def _set(spec: JobSpec, key: str, value: Any) -> None:
    *path, last = key.split(".")
    node: Any = spec
    for part in path:
        node = getattr(node, part)
    setattr(node, last, value)


def _remedy(m: StageMemory, spec: JobSpec, model_config: Any) -> str:
    """What to change, each option tried on a copy of the spec and shown with its new estimate:
    the options that fit on their own, or else every option that helps (to combine)."""
    stage, n = m.stage, spec.resources.num_workers
    seq_key, seq = stage_table.training(spec, stage).seq_len_key, m.seq_len
    options: list[tuple[str, list[tuple[str, Any]]]] = []
    if not m.activation_checkpointing:
        options.append((f"turn on {stage}.train.activation_checkpointing", [(f"{stage}.train.activation_checkpointing", True)]))
    if m.micro_batch_size > 1:
        options.append((
            f"lower {stage}.train.micro_batch_size to 1 and raise grad_accum {m.micro_batch_size}x",
            [(f"{stage}.train.micro_batch_size", 1)],
        ))
    if seq >= 1024:
        options.append((f"lower {seq_key} to {seq // 2}", [(seq_key, seq // 2)]))
    options.append((f"shard over {2 * n} GPUs (resources.num_workers: {2 * n})", [("resources.num_workers", 2 * n)]))
    fitting, helping = [], []
    for text, changes in options:
        trial = spec.model_copy(deep=True)
        for key, value in changes:
            _set(trial, key, value)
        new = next(x for x in estimate_memory(trial, model_config, m.gpu_memory_gib) if x.stage == stage)
        if new.total_gib < 0.95 * m.total_gib:
            (fitting if new.fits else helping).append(f"{text} (~{new.total_gib:.1f} GiB)")
    if fitting:
        return " or ".join(fitting)
    if helping:
        return "no single change is enough; combine: " + ", ".join(helping)
    return "use GPUs with more memory"


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


# --------------------------------------------------------------------------- clusters


@dataclass(frozen=True)
class NodeGroup:
    """One kind of node a cluster can start: how many, and what each offers Ray."""

    name: str
    gpus: int
    max_nodes: int
    cpus: int | None = None
    gpu_name: str | None = None


@dataclass(frozen=True)
class ClusterOffer:
    """The GPUs a cluster file offers at its largest scale."""

    source: str
    groups: list[NodeGroup] = field(default_factory=list)

    @property
    def gpu_groups(self) -> list[NodeGroup]:
        return [g for g in self.groups if g.gpus > 0 and g.max_nodes > 0]

    @property
    def max_gpus(self) -> int:
        return sum(g.gpus * g.max_nodes for g in self.gpu_groups)

    @property
    def gpu_name(self) -> str | None:
        return next((g.gpu_name for g in self.gpu_groups if g.gpu_name), None)

    @property
    def gpu_memory_gib(self) -> float | None:
        return GPUS.get(self.gpu_name) if self.gpu_name else None


def _launcher_offer(doc: dict, source: str) -> ClusterOffer:
    groups = []
    head = doc.get("head_node_type")
    for name, node in (doc.get("available_node_types") or {}).items():
        node_config = node.get("node_config") or {}
        machine = node_config.get("InstanceType") or node_config.get("machineType")
        known = MACHINES.get(machine or "")
        resources = node.get("resources") or {}
        gpus = resources.get("GPU")
        if gpus is None:
            accel = sum(int(a.get("acceleratorCount", 0)) for a in node_config.get("guestAccelerators") or [])
            gpus = accel or (known[0] if known else 0)
        max_nodes = 1 if name == head else node.get("max_workers", doc.get("max_workers", 0))
        groups.append(
            NodeGroup(
                name=name,
                gpus=int(gpus),
                max_nodes=int(max_nodes),
                cpus=resources.get("CPU", known[2] if known else None),
                gpu_name=known[1] if known else None,
            )
        )
    return ClusterOffer(source, groups)


def _pod_group(name: str, group: dict, max_nodes: int) -> NodeGroup:
    pod = (group.get("template") or {}).get("spec") or {}
    gpus = 0
    cpus = None
    for container in pod.get("containers") or []:
        res = container.get("resources") or {}
        limits = {**(res.get("requests") or {}), **(res.get("limits") or {})}
        gpus += int(limits.get("nvidia.com/gpu", 0))
        if "cpu" in limits:
            cpus = int(float(str(limits["cpu"]).rstrip("m")) / (1000 if str(limits["cpu"]).endswith("m") else 1))
    params = group.get("rayStartParams") or {}
    if "num-gpus" in params:
        gpus = int(params["num-gpus"])
    if "num-cpus" in params:
        cpus = int(params["num-cpus"])
    selector = pod.get("nodeSelector") or {}
    gpu_name = ACCELERATORS.get(selector.get("cloud.google.com/gke-accelerator", ""))
    machine = selector.get("node.kubernetes.io/instance-type") or selector.get("beta.kubernetes.io/instance-type")
    if gpu_name is None and machine in MACHINES:
        gpu_name = MACHINES[machine][1]
    return NodeGroup(name=name, gpus=gpus, max_nodes=max_nodes, cpus=cpus, gpu_name=gpu_name)


def _kuberay_offer(spec: dict, source: str) -> ClusterOffer:
    groups = [_pod_group("head", spec.get("headGroupSpec") or {}, 1)]
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for g in spec.get("workerGroupSpecs") or []:
        replicas = g.get("maxReplicas", g.get("replicas", 0)) if autoscaling else g.get("replicas", 0)
        groups.append(_pod_group(g.get("groupName", "workers"), g, int(replicas) * int(g.get("numOfHosts", 1))))
    return ClusterOffer(source, groups)


def cluster_offer(path: str | Path) -> ClusterOffer:
    """What a Ray cluster launcher YAML, a KubeRay RayCluster or a RayJob offers."""
    path = Path(path)
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if isinstance(d, dict)]
    for doc in docs:
        if "available_node_types" in doc:
            return _launcher_offer(doc, str(path))
        if doc.get("kind") == "RayCluster":
            return _kuberay_offer(doc.get("spec") or {}, str(path))
        if doc.get("kind") == "RayJob" and (doc.get("spec") or {}).get("rayClusterSpec"):
            return _kuberay_offer(doc["spec"]["rayClusterSpec"], str(path))
    raise ValueError(
        f"{path}: no Ray cluster found; expected a cluster launcher YAML (available_node_types), "
        "a KubeRay RayCluster or a RayJob with rayClusterSpec"
    )


def resource_warnings(spec: JobSpec, offer: ClusterOffer) -> list[str]:
    """Lines where the spec's resources and the cluster disagree, with the numbers."""
    r = spec.resources
    src = offer.source
    gpu_groups = offer.gpu_groups
    if not r.use_gpu:
        if gpu_groups:
            return [
                f"resources.use_gpu is false but {src} offers up to {offer.max_gpus} GPUs: training "
                "would run on CPUs with gloo while the GPUs idle; set resources.use_gpu: true"
            ]
        return []
    if not gpu_groups:
        return [
            f"resources.use_gpu is true but {src} offers no GPU worker; the job would wait for GPUs "
            "forever. Use a GPU cluster file or set resources.use_gpu: false"
        ]
    lines = []
    per_node = max(g.gpus for g in gpu_groups)
    if r.num_workers > offer.max_gpus:
        detail = ", ".join(f"{g.name}: {g.max_nodes} nodes x {g.gpus} GPUs" for g in gpu_groups)
        nodes_needed = -(-r.num_workers // per_node)
        lines.append(
            f"resources.num_workers is {r.num_workers} but {src} offers at most {offer.max_gpus} GPUs "
            f"({detail}); lower num_workers to {offer.max_gpus} or let the cluster grow to "
            f"{nodes_needed} nodes of {per_node} GPUs"
        )
    elif r.num_workers % per_node:
        nodes = -(-r.num_workers // per_node)
        idle = nodes * per_node - r.num_workers
        lines.append(
            f"resources.num_workers is {r.num_workers} on nodes of {per_node} GPUs: {nodes} node(s) "
            f"with {idle} GPU(s) idle; use a multiple of {per_node}"
        )
    cpus = min((g.cpus for g in gpu_groups if g.cpus), default=None)
    if cpus is not None:
        reserved = r.cpus_per_worker * min(r.num_workers, per_node)
        if reserved > cpus:
            lines.append(
                f"resources.cpus_per_worker {r.cpus_per_worker:g} x {min(r.num_workers, per_node)} workers "
                f"per node needs {reserved:g} CPUs but a node of {src} has {cpus}; lower cpus_per_worker"
            )
    return lines


def check_cluster(spec: JobSpec, path: str | Path, model_config: Any | None = None) -> list[str]:
    """`resource_warnings` for a cluster file, plus `memory_warnings` on its GPU when the
    model config is given and the GPU is known."""
    offer = cluster_offer(path)
    lines = resource_warnings(spec, offer)
    if model_config is not None and offer.gpu_memory_gib is not None:
        lines += memory_warnings(spec, model_config, offer.gpu_memory_gib, offer.gpu_name)
    return lines

