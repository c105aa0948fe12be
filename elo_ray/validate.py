"""`elo-ray validate`: everything that can be checked before GPUs are spent.

Each check returns problem lines, each naming the key or URI and what to do; warnings are
things that may still work (memory estimates) and do not fail validation.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from elo_ray import builtin, locations, stage_table, storage
from elo_ray.config import JobSpec


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_storage(spec: JobSpec) -> list[str]:
    """Storage root reachable and writable: write, read back and delete a probe object."""
    root = spec.storage.root
    probe = storage.join(root, f".elo-ray-probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_text(probe, "probe")
        if storage.read_text(probe) != "probe":
            return [f"storage.root: {root} did not return what was written"]
        storage.remove(probe)
    except Exception as e:  # any failure here is the user's to fix, and says what it was
        return [f"storage.root: cannot write to {root}: {type(e).__name__}: {e}"]
    return []


def check_model(spec: JobSpec) -> tuple[list[str], object | None]:
    """Base model readable, architecture supported, layers (pretrain.layers, search.candidates) in
    range, tokenizer matches."""
    from elo_ray import surgery

    problems: list[str] = []
    try:
        base, config = locations.checked_model(spec.model.base, spec.storage.root)
    except Exception as e:
        return [f"model.base: {e}"], None
    if spec.pretrain.enabled:
        try:
            layers = surgery.validate_layers(config.num_hidden_layers, spec.pretrain.layers)
        except Exception as e:
            problems.append(f"pretrain.layers: {e}")
            layers = None
        if spec.pretrain.init_from and layers is not None:
            problems += check_warm_start(spec, layers)
    problems += check_candidates(spec, config.num_hidden_layers)
    for key in ("tokenizer", "instruct"):
        uri = getattr(spec.model, key)
        if key == "tokenizer":
            uri = stage_table.value_at(spec, stage_table.tokenizer_key(spec))
        if uri is None:
            continue
        try:
            uri = locations.for_checks(uri, spec.storage.root)
            if key == "tokenizer":
                from elo_ray.data.tokens import load_tokenizer

                tok = load_tokenizer(uri)
                if len(tok) > config.vocab_size:
                    problems.append(
                        f"model.tokenizer: {len(tok)} tokens but the model's vocab_size is {config.vocab_size}; "
                        "use the tokenizer that came with the model"
                    )
                if tok.eos_token_id is None:
                    problems.append(f"model.tokenizer: {uri} has no EOS token; documents cannot be separated")
            else:
                other = surgery.checkpoint_config(uri)
                if other.model_type != config.model_type or other.hidden_size != config.hidden_size:
                    problems.append(
                        f"model.instruct: {uri} is {other.model_type} with hidden size {other.hidden_size}, "
                        f"the base is {config.model_type} with {config.hidden_size}; the chat vector needs the same architecture"
                    )
                if spec.instruct.enabled and spec.instruct.chat_vector.enabled:
                    try:
                        surgery.check_skip_patterns(spec.instruct.chat_vector.skip, base, uri)
                    except surgery.SurgeryError as e:
                        problems.append(f"instruct.chat_vector.skip: {e}")
        except Exception as e:
            problems.append(f"model.{key}: {e}")
    return problems, config


def check_warm_start(spec: JobSpec, layers: tuple[int, ...]) -> list[str]:
    """pretrain.init_from must be an ELO model of these very layers of this base model."""
    from elo_ray import surgery

    try:
        uri = locations.for_checks(spec.pretrain.init_from, spec.storage.root)
        elo = surgery.checkpoint_config(uri)
    except Exception as e:
        return [f"pretrain.init_from: {e}"]
    found = list(getattr(elo, "elo_layers", None) or [])
    if found != list(layers):
        return [f"pretrain.init_from: {uri} holds ELO layers {found or 'none'}, the spec detaches {list(layers)}; "
                "warm-start from a run with the same pretrain.layers (its {root}/{run_id}/pretrain/model)"]
    return []


def check_candidates(spec: JobSpec, num_layers: int) -> list[str]:
    """search.candidates: every layer set is one `elo-ray search` can detach from this base model
    (checked by the search's own resolve, one problem per bad set)."""
    from elo_ray import layer_sets as candidates

    problems = []
    for i, layers in enumerate(spec.search.candidates or []):
        try:
            candidates.resolve([layers], num_layers)
        except candidates.CandidateError as e:
            problems.append(f"search.candidates[{i}]: {e}")
    return problems


def check_trained_layers(spec: JobSpec, config) -> list[str]:
    """The layers a whole-model stage trains with method layers or lora_layers exist in the base
    model, and lora_layers leaves some layer to LoRA."""
    problems = []
    n = config.num_hidden_layers
    for t in stage_table.trainings(spec):
        if t.elo or t.train.method not in stage_table.LAYER_METHODS:
            continue
        key = f"{t.stage}.train.layers" if getattr(spec, t.stage).train.layers is not None else "pretrain.layers"
        try:
            whole = t.train.full_layers(n)
        except ValueError as e:
            problems.append(f"{key}: {e}")
            continue
        if t.train.method == "lora_layers" and len(whole) == n:
            problems.append(
                f"{t.stage}.train.method: lora_layers trains layers {whole} whole ({key} and "
                f"{t.stage}.train.neighbours={t.train.neighbours}), every one of the model's {n}: none is left for "
                f"LoRA; use method layers, or lower {t.stage}.train.neighbours"
            )
    return problems


def check_data(spec: JobSpec, config=None) -> list[str]:
    """Every data section: its sources read and a sample of each parses; its seq_len fits `config`
    (the base model's config, when it could be read)."""
    from elo_ray import data
    from elo_ray.train.model import check_seq_len

    problems = []
    max_positions = getattr(config, "max_position_embeddings", None)
    for key, cfg in stage_table.data_sections(spec).items():
        problems += [f"{key}: {p}" for p in check_seq_len(cfg.seq_len, max_positions)]
        try:
            resolved = builtin.resolve_sources(cfg, spec.storage.root)
        except ValueError as e:
            problems.append(f"{key}.sources: {e}")
            continue
        problems += [f"{key}: {p}" for p in data.validate_sources(resolved)]
    return problems


def check_ecosystem(spec: JobSpec) -> list[str]:
    """eval.tasks (extra installed, every task found) and tracking backends (extras installed)."""
    from elo_ray import harness
    from elo_ray.train.metric_logging import missing_backends

    problems = missing_backends(wandb=spec.tracking.wandb is not None, mlflow=spec.tracking.mlflow is not None)
    if spec.eval.enabled and spec.eval.tasks:
        try:
            task_dirs = [builtin.resolve(d, spec.storage.root) for d in spec.eval.task_dirs]
        except ValueError as e:
            return problems + [f"eval.task_dirs: {e}"]
        problems += harness.check(spec.eval.tasks, task_dirs)
    return problems


def validate(spec: JobSpec, cluster: str | None = None) -> Report:
    """Every check; with `cluster` (a Ray cluster file), also the spec's resources against what the
    cluster offers, and memory against the cluster's GPU instead of resources.gpu_type."""
    report = Report()
    report.problems += stage_table.plan_problems(spec)
    report.problems += check_storage(spec)
    if report.problems and any(p.startswith("storage.root") for p in report.problems):
        return report  # model and data checks would only repeat the storage failure
    model_problems, config = check_model(spec)
    report.problems += model_problems
    layer_problems = check_trained_layers(spec, config) if config is not None else []
    report.problems += layer_problems
    report.problems += check_data(spec, config)
    report.problems += check_ecosystem(spec)
    if cluster is not None:
        from elo_ray.clusters import check_cluster

        try:
            report.warnings += check_cluster(spec, cluster, None if layer_problems else config)
        except (OSError, ValueError) as e:  # missing file, not YAML, no Ray cluster in it
            report.problems.append(f"--cluster {cluster}: {e}")
    elif config is not None and not layer_problems:  # the estimate counts the trained layers
        from elo_ray.memory import GPUS, memory_warnings

        gpu = spec.resources.gpu_type
        report.warnings += memory_warnings(spec, config, gpu_memory_gib=GPUS[gpu], gpu_name=gpu)
    return report
