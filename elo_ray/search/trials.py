"""Each candidate layer set as a small pipeline run of its own, run as a Ray Tune trial.

A trial is `pipeline.run_pipeline` on a spec derived from the user's (`trial_spec`): pretrain on
the candidate's layers with `pretrain.data` capped at `search.max_tokens`, merge, eval of
held-out perplexity only (no `eval.tasks`); align and instruct off; `builtin:` names resolved
once, here. It lives at

    {root}/{run_id}/search/{candidate}/     e.g. search/layers-0-31/

with its own spec.yaml, stage manifests and lease, so a rerun of the search skips every
committed stage of every candidate (a finished trial costs nothing the second time) and resumes
an interrupted pretraining from its last checkpoint: the pipeline's own skip logic, not a second
one. The search driver holds the lease of `{run_id}/search`; within it, a trial takes over
its own run's lease from a dead trial of an earlier search at once.

Tune runs the trials as function trainables, each asking for TRIAL_RESOURCES. A trial runs its
pipeline in a Ray task of its own scheduled outside the trial's placement group: inside it, Ray
Data would take the group's bundles as all it may use and wait forever for a CPU the trial itself
holds, and eval could not have a GPU. So the pipeline's reading, training workers and tasks
reserve on the cluster exactly as under `elo-ray run`. As many trials run at once as the cluster
holds at `resources` per trial (`concurrent_trials`). A trial that fails is recorded with its
error and the others go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from elo_ray import builtin, logs, manifest, storage
from elo_ray.config import JobSpec, ResourcesConfig, spec_from_dict
from elo_ray.layer_sets import Candidate

log = logging.getLogger(__name__)

TRIAL_RESOURCES = {"CPU": 0, "memory": 64 * 2**20}
"""What a trial reserves: it only waits on its pipeline's task (module docstring). No CPU: even
0.05 of one left the data reading of a 2-CPU cluster (workers 1 CPU, reading 1) without its CPU;
a Tune trial must reserve something, so a little memory."""
DATA_CPUS = 1
"""What a trial's data reading needs beside its training workers (Ray Data starves without it)."""
STAGES = ("pretrain", "merge", "eval")


@dataclass
class TrialOutcome:
    """What one candidate's trial left: its committed manifests, or the error that stopped it."""

    candidate: Candidate
    manifests: dict[str, manifest.Manifest]
    error: str | None = None
    reused: bool = False  # every stage was committed before this search started


def search_uri(spec: JobSpec, run_id: str) -> str:
    return storage.join(spec.storage.root, run_id, "search")


def trial_spec(spec: JobSpec, candidate: Candidate, run_id: str) -> JobSpec:
    """The user's spec as one candidate's short ELO run of the search of `run_id` (module docstring)."""
    root = spec.storage.root
    raw = spec.model_dump(mode="json")
    raw["run_id"] = None
    raw["storage"]["root"] = search_uri(spec, run_id)
    raw["model"]["base"] = builtin.resolve(spec.model.base, root)
    if spec.model.tokenizer:
        raw["model"]["tokenizer"] = builtin.resolve(spec.model.tokenizer, root)
    pretrain = raw["pretrain"]
    pretrain.update(enabled=True, layers=list(candidate.given), init_from=None)
    pretrain["data"]["max_tokens"] = spec.search.max_tokens
    for src in pretrain["data"]["sources"]:
        src["uri"] = builtin.resolve(src["uri"], root)
    raw["merge"]["enabled"] = raw["eval"]["enabled"] = True
    raw["eval"]["tasks"] = []  # the ranking reads held-out perplexity; task scores would cost each trial for nothing
    raw["align"]["enabled"] = raw["instruct"]["enabled"] = False
    return spec_from_dict(raw)


def concurrent_trials(resources: ResourcesConfig, cluster: dict[str, float]) -> int:
    """Trials the cluster holds at once: its GPUs over the workers' (GPU runs), or its CPUs over
    the workers' plus its data reading's."""
    if resources.use_gpu:
        fit = cluster.get("GPU", 0) // resources.num_workers
    else:
        fit = cluster.get("CPU", 0) // (resources.num_workers * resources.cpus_per_worker + DATA_CPUS)
    return max(1, int(fit))


def _run_candidate(spec_dict: dict, name: str) -> str | None:
    """One candidate's pipeline run; None when it completed, else its error in one line (a
    failure is returned, not raised: one candidate must not stop the others)."""
    from elo_ray import pipeline
    from elo_ray.stages import STAGES as STAGE_FNS
    from elo_ray.stages import root_error

    try:
        # The search driver holds {run}/search's lease: a trial's own lease can only be held by a
        # dead trial of an earlier search, so it is taken over at once.
        pipeline.run_pipeline(spec_from_dict(spec_dict), name, STAGE_FNS, overridden=True, force_unlock=True)
    except Exception as e:
        log.exception(f"search: candidate {name} failed")
        cause = root_error(e)
        stage = f"{e.stage}: " if isinstance(e, pipeline.StageError) else ""
        first = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
        return f"{stage}{type(cause).__name__}: {first}"
    return None


def _trial(config: dict, specs: dict[str, dict], run) -> None:
    """One Tune trial: its candidate's pipeline (`run`: _run_candidate logging to the search's
    driver) as a task outside the trial's placement group."""
    import ray
    import ray.tune

    name = config["candidate"]
    task = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy="DEFAULT")(run)
    ray.tune.report({"error": ray.get(task.remote(specs[name], name)) or ""})


def run_trials(spec: JobSpec, run_id: str, candidates: list[Candidate], max_concurrent: int | None = None) -> list[TrialOutcome]:
    """Every candidate's trial through Ray Tune (Ray must be up); outcomes in candidate order."""
    import ray
    import ray.tune as tune

    root = search_uri(spec, run_id)
    specs = {c.name: trial_spec(spec, c, run_id).model_dump(mode="json") for c in candidates}
    k = max_concurrent or spec.search.max_concurrent or concurrent_trials(spec.resources, ray.cluster_resources())
    log.info(f"search: {len(candidates)} candidates, {min(k, len(candidates))} at a time, "
             f"{spec.search.max_tokens:,} tokens each, under {root}")
    before = {c.name: _committed(storage.join(root, c.name)) for c in candidates}
    fs, path = storage.pyarrow_filesystem(storage.join(root, "tune"))
    trainable = tune.with_resources(tune.with_parameters(_trial, specs=specs, run=logs.in_workers(_run_candidate)),
                                    TRIAL_RESOURCES)
    tuner = tune.Tuner(
        trainable,
        param_space={"candidate": tune.grid_search([c.name for c in candidates])},
        # reuse_actors: the next trial runs in the finished one's actor, not a new process
        tune_config=tune.TuneConfig(max_concurrent_trials=k, reuse_actors=True),
        run_config=tune.RunConfig(
            name="trials", storage_path=path, storage_filesystem=fs, verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    errors = {}
    for result in tuner.fit():
        name = result.config["candidate"]
        if result.error is not None:  # the trial itself died (its process, its node)
            errors[name] = f"the trial stopped: {str(result.error).strip().splitlines()[0]}"
        else:
            errors[name] = (result.metrics or {}).get("error") or None
    return [_outcome(c, storage.join(root, c.name), errors.get(c.name, "the trial did not run"), before[c.name])
            for c in candidates]


def _committed(run_uri: str) -> dict[str, manifest.Manifest]:
    """The trial's stages that have a manifest under `run_uri`."""
    return {s: m for s in STAGES if (m := manifest.read(storage.join(run_uri, s))) is not None}


def _outcome(candidate: Candidate, run_uri: str, error: str | None,
             before: dict[str, manifest.Manifest]) -> TrialOutcome:
    manifests = _committed(run_uri)
    if error is None and len(manifests) < len(STAGES):
        error = f"stages {', '.join(s for s in STAGES if s not in manifests)} left no manifest under {run_uri}"
    # reused: every stage's manifest was there before the trials ran, and is the same one (a
    # committed time, to the second, cannot tell a rerun in the same second from a reuse)
    same = {s: (m.digest, m.finished_at) for s, m in manifests.items()} == \
        {s: (m.digest, m.finished_at) for s, m in before.items()}
    return TrialOutcome(candidate, manifests, error, error is None and same)
