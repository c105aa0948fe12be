"""The stage table: for each stage, once, the stages whose output it takes and what it reads.

    stage     takes the output of                 reads (spec keys)
    pretrain  -                                   pretrain.*, model.base (unless pretrain.init_from), tokenizer
    merge     pretrain                            merge.*, model.base
    align     merge                               align.*, tokenizer; pretrain.data when align.data is unset;
                                                  pretrain.layers when its method trains layers (below)
    instruct  the latest of merge, align          instruct.*, tokenizer when sft_enabled;
                                                  model.instruct and model.base when the chat vector is on;
                                                  pretrain.layers when its method trains layers (below)
    eval      every enabled one of merge, align,  eval.*, pretrain.data (held-out documents), model.base,
              instruct                            tokenizer

"tokenizer" is `model.tokenizer` when it is set, else `model.base` (the model's own).
A whole-model stage whose `train.method` is layers or lora_layers and whose `train.layers` is
unset trains the detached layers, `pretrain.layers` (the table's `train` fills them in).
`resources`, `storage`, `tracking` and `run_id` are read by no stage: moving a run to more GPUs,
renaming it or sending its metrics elsewhere never invalidates a committed stage. Nor do a train
section's performance-only settings (activation checkpointing, CPU offload, the loss kernel, ...;
`config.PERFORMANCE_ONLY`) or how its sequences per step split into micro_batch_size x grad_accum:
turning one on to get past an out-of-memory error resumes the interrupted stage. `eval` reads
its whole section, so `eval.tasks` and `eval.task_dirs` are in its config hash.

A stage's config hash (pipeline.py) covers exactly the values of the keys it reads and the
digests of its inputs' manifests, so changing a key reruns the stages that read it and every
stage after them, and nothing before. The pipeline (order, inputs, hash), validate (the stage
plan, the data to check), the memory estimate (which stages train, on what) and the stages themselves (the
data a stage trains on) all read this table; nothing else decides these by a stage's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel

from elo_ray.config import ChatDataConfig, DataConfig, JobSpec, TrainConfig

Data = DataConfig | ChatDataConfig


@dataclass(frozen=True)
class Stage:
    """One row of the table."""

    name: str
    inputs: tuple[str, ...]  # the stages whose output it may take, in pipeline order
    takes: Literal["latest", "all"]  # latest: the last enabled of `inputs` (one is needed); all: every enabled one
    reads: Callable[[JobSpec], list[str]]  # the spec keys that decide its result
    data: Callable[[JobSpec], tuple[str, Data] | None] = lambda spec: None  # (key, config) of the data it reads
    train: Callable[[JobSpec], TrainConfig | None] = lambda spec: None  # its train settings, when it trains
    elo: bool = False  # trains the detached ELO model (len(pretrain.layers) layers), not the whole model
    problems: Callable[[JobSpec], list[str]] = lambda spec: []  # settings with which it cannot run


@dataclass(frozen=True)
class Training:
    """A stage that trains, with what it trains on: what the memory estimate and validate read."""

    stage: str
    train: TrainConfig
    data_key: str  # the spec key of its data ("align reuses pretrain.data" shows here)
    data: Data
    elo: bool

    @property
    def seq_len_key(self) -> str:
        return f"{self.data_key}.seq_len"


def tokenizer_key(spec: JobSpec) -> str:
    """The key that names the tokenizer: `model.tokenizer`, or the base model's own."""
    return "model.tokenizer" if spec.model.tokenizer else "model.base"


def chat_vector_on(spec: JobSpec) -> bool:
    """instruct adds the chat vector: it is enabled and `model.instruct` names a model."""
    return spec.instruct.chat_vector.enabled and bool(spec.model.instruct)


def _pretrain_reads(spec: JobSpec) -> list[str]:
    return ["pretrain", tokenizer_key(spec)] + ([] if spec.pretrain.init_from else ["model.base"])


def _align_data(spec: JobSpec) -> tuple[str, Data]:
    if spec.align.data is not None:
        return "align.data", spec.align.data
    data = spec.pretrain.data
    if spec.align.max_tokens:
        data = data.model_copy(update={"max_tokens": spec.align.max_tokens})
    return "pretrain.data", data


LAYER_METHODS = ("layers", "lora_layers")
"""Methods that train whole decoder layers of a whole-model stage (TrainConfig.layers)."""


def _takes_detached_layers(train: TrainConfig) -> bool:
    return train.method in LAYER_METHODS and train.layers is None


def _with_layers(spec: JobSpec, train: TrainConfig) -> TrainConfig:
    """`train`, with the detached layers (pretrain.layers) as the layers its method trains when unset."""
    if not _takes_detached_layers(train):
        return train
    return train.model_copy(update={"layers": list(spec.pretrain.layers)})


def _align_reads(spec: JobSpec) -> list[str]:
    return (["align", tokenizer_key(spec)] + (["pretrain.data"] if spec.align.data is None else [])
            + (["pretrain.layers"] if _takes_detached_layers(spec.align.train) else []))


def _instruct_reads(spec: JobSpec) -> list[str]:
    keys = ["instruct"]
    if spec.instruct.sft_enabled:
        keys.append(tokenizer_key(spec))
        if _takes_detached_layers(spec.instruct.train):
            keys.append("pretrain.layers")
    if spec.instruct.chat_vector.enabled:  # model.instruct unset -> set turns the chat vector on
        keys += ["model.instruct", "model.base"]
    return keys


def _instruct_problems(spec: JobSpec) -> list[str]:
    if spec.instruct.sft_enabled or chat_vector_on(spec):
        return []
    return ["instruct: nothing to do; set model.instruct for the chat vector or enable sft"]


TABLE: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "pretrain", inputs=(), takes="latest", reads=_pretrain_reads,
            data=lambda spec: ("pretrain.data", spec.pretrain.data),
            train=lambda spec: spec.pretrain.train, elo=True,
        ),
        Stage("merge", inputs=("pretrain",), takes="latest", reads=lambda spec: ["merge", "model.base"]),
        Stage(
            "align", inputs=("merge",), takes="latest", reads=_align_reads,
            data=_align_data, train=lambda spec: _with_layers(spec, spec.align.train),
        ),
        Stage(
            "instruct", inputs=("merge", "align"), takes="latest", reads=_instruct_reads,
            data=lambda spec: ("instruct.data", spec.instruct.data) if spec.instruct.sft_enabled else None,
            train=lambda spec: _with_layers(spec, spec.instruct.train) if spec.instruct.sft_enabled else None,
            problems=_instruct_problems,
        ),
        Stage(
            "eval", inputs=("merge", "align", "instruct"), takes="all",
            reads=lambda spec: ["eval", "pretrain.data", "model.base", tokenizer_key(spec)],
            data=lambda spec: ("pretrain.data", spec.pretrain.data),
        ),
    )
}
ORDER: tuple[str, ...] = tuple(TABLE)


def enabled(spec: JobSpec) -> list[str]:
    """The stages the spec enables, in pipeline order."""
    return [s for s in ORDER if getattr(spec, s).enabled]


def inputs(spec: JobSpec, stage: str) -> list[str]:
    """The enabled stages whose output `stage` takes."""
    row = TABLE[stage]
    on = [s for s in row.inputs if getattr(spec, s).enabled]
    return on[-1:] if row.takes == "latest" else on


def plan_problems(spec: JobSpec) -> list[str]:
    """An enabled stage whose input stages are all disabled, or that has nothing to do."""
    out = []
    for stage in enabled(spec):
        row = TABLE[stage]
        if row.inputs and row.takes == "latest" and not inputs(spec, stage):
            needs = " or ".join(row.inputs)
            out.append(f"{stage}.enabled: {stage} needs the output of {needs}; enable {row.inputs[0]} or disable {stage}")
        out += row.problems(spec)
    return out


def value_at(spec: JobSpec, key: str) -> Any:
    """The value of a dotted spec key as plain data (a section as its whole dict)."""
    node: Any = spec
    for part in key.split("."):
        node = getattr(node, part)
    return node.model_dump(mode="json") if isinstance(node, BaseModel) else node


def settings(spec: JobSpec, stage: str) -> dict[str, Any]:
    """What decides `stage`'s result besides its inputs: each key it reads and its value, with
    every train section as it decides the result (`TrainConfig.result_settings`: performance-only
    settings left out)."""
    return {key: value_at(_result_settings(spec), key) for key in TABLE[stage].reads(spec)}


def _result_settings(node: Any) -> Any:
    """`node` with every TrainConfig in it replaced by its `result_settings()`."""
    if isinstance(node, TrainConfig):
        return node.result_settings()
    if not isinstance(node, BaseModel):
        return node
    return node.model_copy(update={name: _result_settings(value) for name, value in node if isinstance(value, BaseModel)})


def training(spec: JobSpec, stage: str) -> Training | None:
    """What `stage` trains on with which settings; None when it does not train."""
    row = TABLE[stage]
    train, data = row.train(spec), row.data(spec)
    if train is None or data is None:
        return None
    return Training(stage, train, data[0], data[1], row.elo)


def trainings(spec: JobSpec) -> list[Training]:
    """The enabled stages that train, in pipeline order."""
    return [t for t in map(lambda stage: training(spec, stage), enabled(spec)) if t is not None]


def data_sections(spec: JobSpec) -> dict[str, Data]:
    """Every data section an enabled stage reads, by key (each once; validate checks them)."""
    out: dict[str, Data] = {}
    for stage in enabled(spec):
        found = TABLE[stage].data(spec)
        if found is not None:
            out.setdefault(*found)
    return out
