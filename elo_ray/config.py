"""The job spec: YAML -> validated, typed objects, with errors a user can act on.

A spec is data only: it names models, data and settings, and can never execute code.
Each component has its own config class with a docstring on every field; `JobSpec` composes
them. `load_spec` reads a YAML file, applies `--set key.path=value` overrides and validates;
every problem becomes one `SpecProblem` line naming the key (and the YAML line), with a
"did you mean" for misspelled keys.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Config(BaseModel):
    """Base for every config class: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------- data


class SourceConfig(Config):
    """One corpus source: files of one language in one format."""

    uri: str = Field(description="Local path, directory, glob, or s3:// / gs:// URI of the files.")
    language: str = Field(description="Language tag of every document in this source (en, ko, ja, ...).")
    format: Literal["jsonl", "parquet", "text"] = Field(
        "jsonl", description="jsonl and parquet read `text_field`; text is one document per line."
    )
    text_field: str = Field("text", description="Column or JSON key holding the document text.")


class DataConfig(Config):
    """A mixed-language token stream for causal-LM training (pretrain and align)."""

    sources: list[SourceConfig] = Field(description="Corpus sources; several may share a language.")
    weights: dict[str, float] | None = Field(
        None,
        description="Share of trained tokens per language. Default: English 1, the other "
        "languages share 9 equally (the paper's 1:9).",
    )
    seq_len: int = Field(2048, gt=1, description="Tokens per packed training sequence.")
    max_tokens: int | None = Field(
        None, gt=0, description="Token budget of the stream; unset: `epochs` bounds it."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the scarcest language when max_tokens is unset.")
    on_exhausted: Literal["stop", "repeat"] = Field(
        "stop",
        description="When one language runs out before the budget: stop the stream (default: "
        "never trains a document twice, and keeps the ratio exact) or repeat that language.",
    )
    heldout_docs: int = Field(
        64, ge=0, description="Documents per language kept out of training for perplexity."
    )
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="Malformed JSON line: error naming file and line, or skip and count."
    )
    seed: int = Field(0, description="Seed of shuffling and mixing; same seed, same batches.")


class ChatDataConfig(Config):
    """Chat data for instruction tuning: jsonl rows with a `messages` list of {role, content}."""

    sources: list[SourceConfig] = Field(description="Chat sources (format jsonl, text_field = messages key).")
    weights: dict[str, float] | None = Field(
        None, description="Share of examples per language; default equal (paper: target:English 1:1)."
    )
    seq_len: int = Field(2048, gt=1, description="Longest example in tokens; longer ones are truncated.")
    heldout_docs: int = Field(16, ge=0, description="Conversations per language kept out of training.")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="Malformed JSON line or messages: error naming file and line, or skip and count."
    )
    seed: int = Field(0, description="Seed of shuffling.")

    @model_validator(mode="after")
    def _messages_field(self) -> "ChatDataConfig":
        for src in self.sources:  # a chat source's key defaults to `messages`, not SourceConfig's `text`
            if "text_field" not in src.model_fields_set:
                src.text_field = "messages"
        return self


# --------------------------------------------------------------------------- training


# A field marked so (`json_schema_extra=PERFORMANCE_ONLY`) changes how fast a stage trains or how much
# memory it takes, not what it computes: changing it reruns no committed stage, and an interrupted
# stage resumes from its checkpoint under the new value (`TrainConfig.result_settings`).
PERFORMANCE_ONLY = {"performance_only": True}


class TrainConfig(Config):
    """Hyper-parameters of one training stage (the same worker loop serves every stage)."""

    lr: float = Field(5e-6, gt=0, description="Peak learning rate (paper: 5e-6).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null: off.")
    micro_batch_size: int = Field(
        1, gt=0, description="Sequences per worker per forward. Only micro_batch_size x grad_accum (sequences per "
        "worker per step) decides the result: trading one for the other (to fit memory) reruns nothing, and an "
        "interrupted stage resumes with the new split.",
    )
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step (see micro_batch_size).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    activation_checkpointing: bool = Field(
        False, description="Recompute decoder layers in backward (less activation memory, about a third more compute).",
        json_schema_extra=PERFORMANCE_ONLY,
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 compute with fp32 reduce on GPU, fp32 on CPU."
    )
    checkpoint_every: int = Field(
        500, gt=0, description="Optimizer steps between checkpoints.", json_schema_extra=PERFORMANCE_ONLY
    )
    log_every: int = Field(10, gt=0, description="Optimizer steps between metric reports.", json_schema_extra=PERFORMANCE_ONLY)
    seed: int = Field(0, description="Seed of initialisation-free randomness (dropout, LoRA init).")
    method: Literal["elo", "full", "lora", "layers", "lora_layers"] = Field(
        "full",
        description="Which parameters train: elo (the detached layers; pretrain), full (all), lora "
        "(adapters on every linear layer of the decoder), layers (the decoder layers `layers` and "
        "`neighbours` on each side; all else frozen), lora_layers (those layers fully, LoRA adapters "
        "on every other decoder layer). layers and lora_layers keep less optimizer state and fewer "
        "gradients than full, so align peaks lower (benchmarks/README.md: what each keeps of full "
        "alignment's recovery).",
    )
    lora_rank: int = Field(16, gt=0, description="LoRA rank (methods lora, lora_layers).")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha (methods lora, lora_layers).")
    layers: list[int] | None = Field(
        None,
        description="Decoder layers that train fully with methods layers and lora_layers (negative: "
        "from the end). Unset: pretrain.layers, the layers ELO detached, whose seams with the "
        "untouched layers alignment repairs.",
    )
    neighbours: int = Field(
        1, ge=0, description="Methods layers, lora_layers: also train this many layers on each side of each of `layers`."
    )
    offload_to_cpu: bool = Field(
        False,
        description="FSDP2's CPUOffloadPolicy: the sharded fp32 parameters, their gradients and AdamW's "
        "state live in host memory and the optimizer step runs on the CPU; the GPU holds the gathered "
        "compute copies and the activations. Same result as without, slower (host-device copies and "
        "a CPU AdamW every step); needs about 16 bytes of host memory per trained parameter / workers.",
        json_schema_extra=PERFORMANCE_ONLY,
    )

    loss: Literal["auto", "plain", "chunked", "liger"] = Field(
        "auto",
        description="How the head's cross-entropy is computed (elo_ray/train/loss.py). chunked: head and "
        "loss over chunks of loss_chunk_tokens, so the [tokens, vocab] fp32 logits never exist at once; "
        "liger: liger-kernel's fused kernel (GPU, extra 'gpu'); plain: the model's full logits. "
        "auto: liger on GPU where installed, else chunked. All give the same loss and gradients.",
        json_schema_extra=PERFORMANCE_ONLY,
    )
    loss_chunk_tokens: int = Field(
        1024, gt=0, description="Tokens per chunk of the chunked loss (1024 x a 128K vocabulary: 0.5 GB of fp32 logits).",
        json_schema_extra=PERFORMANCE_ONLY,
    )
    frozen_params: Literal["replicate", "shard"] = Field(
        "replicate",
        description="Frozen embedding, final norm and head (all methods but full): replicate keeps one copy per worker "
        "in the compute dtype outside FSDP, never gathered or cast; shard lets FSDP shard them like the "
        "trained layers (less memory at rest, an all-gather and a cast every step).",
        json_schema_extra=PERFORMANCE_ONLY,
    )
    compile_layers: bool = Field(
        False, description="torch.compile each decoder layer's forward (compiles on the first steps). Measured "
        "1.08x faster for the 8B ELO step on an H200 (benchmarks/README.md); the GPU recipes in jobs/ set it.",
        json_schema_extra=PERFORMANCE_ONLY,
    )

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"needs distinct layer indices, e.g. [0, -1], got {v}")
        return v

    def full_layers(self, num_layers: int) -> list[int]:
        """The decoder layers that train fully under methods layers and lora_layers: `layers`
        (set by now; the stage table fills it from pretrain.layers) widened by `neighbours`, in
        order. Raises ValueError for an index outside the model's `num_layers` layers."""
        if self.layers is None:
            raise ValueError(f"method {self.method} needs train.layers (the decoder layers to train)")
        bad = [i for i in self.layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(
                f"train.layers {self.layers}: {bad} out of range for a model with {num_layers} decoder layers; "
                f"use 0..{num_layers - 1} or -{num_layers}..-1"
            )
        k = self.neighbours
        return sorted({j for i in self.layers for j in range(i % num_layers - k, i % num_layers + k + 1)
                       if 0 <= j < num_layers})

    @classmethod
    def performance_fields(cls) -> list[str]:
        """The fields marked PERFORMANCE_ONLY: how fast and in how much memory, not what is computed."""
        return [name for name, f in cls.model_fields.items() if f.json_schema_extra == PERFORMANCE_ONLY]

    def result_settings(self) -> "TrainConfig":
        """These settings as they decide the trained result (a stage's config hash reads this):
        every performance-only field at its default, and micro_batch_size x grad_accum as one
        micro-batch of that many sequences. So the settings that differ only in speed and memory
        have one hash, and it is the hash the settings with those defaults and grad_accum 1 had
        before performance-only fields existed (their runs stay committed)."""
        defaults = {name: TrainConfig.model_fields[name].default for name in self.performance_fields()}
        return self.model_copy(update={**defaults, "micro_batch_size": self.micro_batch_size * self.grad_accum,
                                       "grad_accum": 1})


class ResourcesConfig(Config):
    """Ray resources of every training stage."""

    num_workers: int = Field(1, gt=0, description="Ray Train workers (one per GPU on a cluster).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; false: CPU and gloo.")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs reserved per worker; the rest read and tokenize data."
    )
    max_failures: int = Field(1, ge=0, description="Worker failures a stage survives by restarting.")
    gpu_type: Literal["A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB", "L4-24GB", "A10G-24GB"] = Field(
        "A100-80GB", description="The GPUs the workers run on; `validate` checks each stage's memory estimate against it."
    )


# --------------------------------------------------------------------------- stages


def _hub_id_syntax(v: str | None) -> str | None:
    """A `hf://` location must be a well-formed Hub id (whether it exists is `validate`'s to check)."""
    from elo_ray import hub

    if hub.is_hub(v):
        hub.parse(v)
    return v


class ModelConfig(Config):
    """The models the pipeline starts from: a HF checkpoint directory or URI (config.json +
    *.safetensors), a Hub id `hf://ORG/NAME[@REVISION]`, or `builtin:tiny-llama`."""

    base: str = Field(description="Base model: checkpoint location or hf://ORG/NAME[@REVISION].")
    tokenizer: str | None = Field(None, description="Tokenizer location or Hub id; default: the base model's.")
    instruct: str | None = Field(
        None, description="Instruct model of the same base (location or Hub id), for the chat vector; unset: SFT only."
    )

    _hub_ids = field_validator("base", "tokenizer", "instruct")(_hub_id_syntax)


class PretrainStage(Config):
    """Stage 1: detach the chosen layers and train them on the mixed stream."""

    enabled: bool = True
    layers: list[int] = Field([0, -1], description="Decoder layers to detach (paper: first and last).")
    init_from: str | None = Field(
        None, description="Warm start: an earlier run's ELO checkpoint (location or Hub id) instead of the base model's layers."
    )

    _hub_ids = field_validator("init_from")(_hub_id_syntax)
    data: DataConfig
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(method="elo"))

    @field_validator("train", mode="before")
    @classmethod
    def _elo_method_default(cls, v):
        if isinstance(v, dict) and "method" not in v:
            return {**v, "method": "elo"}
        return v

    @field_validator("train")
    @classmethod
    def _elo_method_only(cls, v: TrainConfig) -> TrainConfig:
        if v.method != "elo":
            raise ValueError(
                f"method must be elo here (got {v.method}): the pretrain stage trains the detached "
                "layers; full and lora fine-tuning baselines run through benchmarks/throughput.py"
            )
        return v

    @field_validator("layers")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one layer index, e.g. [0, -1]")
        if len(set(v)) != len(v):
            raise ValueError(f"layer indices must be distinct, got {v}")
        return v


class MergeStage(Config):
    """Stage 2: write the trained layers back into the base model."""

    enabled: bool = True


class _WholeModelStage(Config):
    """A stage that trains the whole merged model (full fine-tuning or LoRA)."""

    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("train")
    @classmethod
    def _whole_model(cls, v: TrainConfig) -> TrainConfig:
        if v.method == "elo":
            raise ValueError(
                "method elo trains detached layers and belongs to pretrain; use full, lora, layers or lora_layers here"
            )
        return v


class AlignStage(_WholeModelStage):
    """Stage 3: brief fine-tuning of the merged model on a bilingual set.

    The paper's alignment is full fine-tuning (`train.method: full`), whose peak memory is that
    of full fine-tuning. With less memory: `train.method: layers` (the detached layers and
    `train.neighbours` on each side), `lora_layers` (those, plus LoRA on every other layer),
    or `full` with `train.offload_to_cpu: true` (the same result, optimizer state in host memory).
    """

    enabled: bool = True
    data: DataConfig | None = Field(None, description="Alignment data; unset: the pretrain data.")
    max_tokens: int | None = Field(None, gt=0, description="Token budget when reusing the pretrain data.")


class ChatVectorConfig(Config):
    """instruct - base, added to the aligned model."""

    enabled: bool = True
    scale: float = Field(1.0, description="Multiplier of the chat vector.")
    skip: list[str] = Field(
        default_factory=list,
        description="Tensors left as in the aligned model: fnmatch patterns over whole tensor names "
        "(model.embed_tokens.*, lm_head.weight); each must match some tensor.",
    )


class InstructStage(_WholeModelStage):
    """Stage 4: chat vector, then bilingual instruction tuning."""

    enabled: bool = True
    chat_vector: ChatVectorConfig = Field(default_factory=ChatVectorConfig)
    sft_enabled: bool = Field(True, description="Run instruction tuning after the chat vector.")
    data: ChatDataConfig | None = Field(None, description="Chat data; required when sft_enabled.")


class EvalStage(Config):
    """Stage 5: held-out perplexity per language, and lm-evaluation-harness tasks, for the base
    model and each stage's output, in one table per run."""

    enabled: bool = True
    max_docs: int = Field(64, gt=0, description="Held-out documents per language to score.")
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks or groups to score every model on (extra: elo-ray[eval]), "
        "e.g. [kobest_copa, kmmlu]; names from eval.task_dirs or lm-eval's own tasks.",
    )
    task_dirs: list[str] = Field(
        default_factory=list,
        description="Directories (local, s3://, gs://, builtin:tasks) of lm-eval task YAMLs with their data; "
        "data_files paths in them are relative to the directory, so no dataset hub is needed.",
    )
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per task; unset: each task's default.")
    limit: int | None = Field(None, gt=0, description="Score at most this many documents per task (a quick look).")
    batch_size: int = Field(8, gt=0, description="Requests per forward pass when scoring tasks.")


class SearchConfig(Config):
    """`elo-ray search`: which layers to detach, found by a short ELO pretraining of each
    candidate layer set, merged and scored by held-out perplexity (elo_ray/search). No stage
    reads this section: changing it never invalidates a run's stages."""

    candidates: list[list[int]] | None = Field(
        None,
        min_length=1,  # [] would quietly mean the default sets; unset (null) means that
        description="Layer sets to compare, as pretrain.layers takes them; --candidates '0,-1; 0,1' overrides. "
        "Unset: first + last, the first two, the last two, the middle pair, first + middle + last.",
    )
    max_tokens: int = Field(
        50_000_000, gt=0,
        description="Tokens of each candidate's ELO pretraining (pretrain.data capped at this budget): the same "
        "for every candidate, so that they compare at equal cost. About two minutes per candidate for an 8B "
        "model on 8 GPUs.",
    )
    max_concurrent: int | None = Field(
        None, gt=0,
        description="Candidates trained at once; unset: as many as the cluster holds at resources.num_workers "
        "workers each (GPUs / num_workers; on CPUs, leaving one CPU per candidate for its data).",
    )
    probe_docs: int = Field(
        32, ge=0,
        description="Documents per language for the gradient probe, which trains nothing (the ones after the "
        "held-out documents); 0 turns the probe off.",
    )


class StorageConfig(Config):
    """Where runs live: `{root}/{run_id}/{stage}/`."""

    root: str = Field(description="Local path or s3:// / gs:// URI; credentials come from the environment.")


class WandBConfig(Config):
    """Weights & Biases: one run per stage, grouped by run id. Credentials from WANDB_API_KEY (or
    `wandb login`), WANDB_MODE, WANDB_BASE_URL in the environment of every node."""

    project: str = Field("elo-ray", description="W&B project of the stage runs.")
    entity: str | None = Field(None, description="W&B team or user; default: the API key's default entity.")


class MLflowConfig(Config):
    """MLflow: one run per stage, nested under a parent run named after the run id."""

    experiment: str = Field("elo-ray", description="MLflow experiment of the runs (created if missing).")
    tracking_uri: str | None = Field(
        None, description="Tracking server or store; default: MLFLOW_TRACKING_URI from the environment."
    )


class TrackingConfig(Config):
    """Where training metrics go besides each stage's metrics.jsonl. Changing it reruns nothing."""

    tensorboard: bool = Field(True, description="TensorBoard event files in {run}/{stage}/tensorboard/.")
    wandb: WandBConfig | None = Field(None, description="Log to W&B (extra: elo-ray[wandb]); unset: off.")
    mlflow: MLflowConfig | None = Field(None, description="Log to MLflow (extra: elo-ray[mlflow]); unset: off.")


class JobSpec(Config):
    """A whole elo-ray job: models, storage, resources, the five stages and the layer search."""

    run_id: str | None = Field(None, description="Default run id; `--run-id` overrides (date templates allowed).")
    storage: StorageConfig
    model: ModelConfig
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    pretrain: PretrainStage
    merge: MergeStage = Field(default_factory=MergeStage)
    align: AlignStage = Field(default_factory=AlignStage)
    instruct: InstructStage = Field(default_factory=lambda: InstructStage(enabled=False))
    eval: EvalStage = Field(default_factory=EvalStage)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)

    @model_validator(mode="after")
    def _stage_inputs(self) -> "JobSpec":
        if self.instruct.enabled and self.instruct.sft_enabled and self.instruct.data is None:
            raise ValueError("instruct.data is required when instruct.sft_enabled is true")
        return self


# --------------------------------------------------------------------------- loading


class SpecError(ValueError):
    """A job spec is invalid; `problems` holds one actionable line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


def _key_lines(text: str) -> dict[tuple, int]:
    """YAML key path -> 1-based line, so errors can say where."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (k.value,)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The config class that owns the mapping at `path` (for "did you mean")."""
    cls: Any = JobSpec
    for part in path:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        cls = next((a for a in _flatten(ann) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            return None
    return cls


def _flatten(ann) -> list:
    args = getattr(ann, "__args__", None)
    if not args:
        return [ann]
    out = []
    for a in args:
        out.extend(_flatten(a))
    return out


def _problems(err: ValidationError, lines: dict[tuple, int], overridden: set[tuple] = frozenset()) -> list[str]:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = lines.get(loc) or next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
        where = f"line {line}: " if line else ""
        if any(loc[: len(o)] == o for o in overridden):
            where = "--set "
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc[:-1])
            names = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else (f"; known keys: {', '.join(names)}" if names else "")
            out.append(f"{where}{key}: unknown key{hint}")
        elif e["type"] == "missing":
            out.append(f"{where}{key}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            value = e.get("input")
            shown = f" (got {value!r})" if not isinstance(value, (dict, list)) and value is not None else ""
            out.append(f"{where}{key}: {msg}{shown}")
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], YAML-parsed value)."""
    if "=" not in item:
        raise SpecError("--set", [f"{item!r}: expected key.path=value, e.g. pretrain.train.lr=1e-5"])
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            if isinstance(node, list) and part.isdigit():
                node = node[int(part)]
                continue
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
        if isinstance(node, list) and path[-1].isdigit():
            node[int(path[-1])] = value
        else:
            node[path[-1]] = value
    return raw


def spec_from_dict(
    raw: Any, source: str = "spec", lines: dict[tuple, int] | None = None, overridden: set[tuple] = frozenset()
) -> JobSpec:
    if not isinstance(raw, dict):
        raise SpecError(source, ["the spec must be a YAML mapping of keys (storage, model, pretrain, ...)"])
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(source, _problems(e, lines or {}, overridden)) from None


def load_spec(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read, override and validate a YAML job spec; raises `SpecError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), [f"no such file: {path}"])
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise SpecError(str(path), [f"{where}not valid YAML: {getattr(e, 'problem', e)}"]) from None
    if isinstance(raw, dict):
        raw = apply_overrides(raw, list(overrides))
    overridden = {tuple(int(k) if k.isdigit() else k for k in parse_override(o)[0]) for o in overrides}
    return spec_from_dict(raw, str(path), _key_lines(text), overridden)


def spec_to_yaml(spec: JobSpec) -> str:
    """The resolved spec, every default filled in, as YAML."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def resolve_weights(weights: dict[str, float] | None, languages: list[str]) -> dict[str, float]:
    """Normalised per-language token shares; default English 1 : others 9 (split equally)."""
    langs = sorted(set(languages))
    if weights is None:
        others = [lang for lang in langs if lang != "en"]
        if "en" in langs and others:
            weights = {"en": 1.0, **{lang: 9.0 / len(others) for lang in others}}
        else:
            weights = {lang: 1.0 for lang in langs}
    unknown = sorted(set(weights) - set(langs))
    if unknown:
        raise ValueError(f"weights name languages with no source: {unknown}; sources have {langs}")
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"weights must not be negative, got {weights}")
    total = sum(weights.get(lang, 0.0) for lang in langs)
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {weights}")
    return {lang: weights.get(lang, 0.0) / total for lang in langs}
