"""The durable pipeline: stage order, run layout, manifests, skip and resume.

A run lives at `{storage.root}/{run_id}/`:

    spec.yaml              the resolved job spec (every default filled in)
    {stage}/manifest.json  written LAST: the stage is committed (see manifest.py)
    {stage}/model/         a stage's model output (HF checkpoint)
    {stage}/ray/           Ray Train storage: checkpoints of a training stage (resume)
    {stage}/work/          intermediate files, not outputs

Rerunning the same spec and run id skips every stage whose manifest matches its config hash
(the values of the spec keys the stage reads, declared in stage_table.py, plus the digests of
its input manifests), resumes an interrupted
training stage from its last Ray Train checkpoint (the Ray run name carries the config hash,
so a changed config never resumes stale state), and reruns a changed stage and every stage
after it.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import yaml

from elo_ray import lease, manifest, stage_table, storage
from elo_ray.config import JobSpec, spec_to_yaml

STAGE_ORDER = stage_table.ORDER
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """The run as asked cannot go on; the message names the stage, the URI and what to do."""


class StageError(RuntimeError):
    """A stage stopped on an error: `stage` names it, `error` (also `__cause__`) is the error."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{stage}: {error}")
        self.stage = stage
        self.error = error


def resolve_run_id(template: str | None, now: dt.datetime | None = None) -> str:
    """A run id from a template: `{date}` -> 2026-11-27, `{time}` -> 0530, `{datetime}` both.

    Scheduled retraining passes e.g. `--run-id 'ko-{date}'` so that each day gets its own run
    and a rerun on the same day resumes it.
    """
    if not template:
        raise PipelineError("no run id: pass --run-id ID or set run_id in the spec")
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        run_id = template.format(
            date=now.strftime("%Y-%m-%d"), time=now.strftime("%H%M"), datetime=now.strftime("%Y-%m-%dT%H%M")
        )
    except (KeyError, IndexError, ValueError) as e:
        raise PipelineError(
            f"run id template {template!r} is not valid ({e}); use {{date}}, {{time}} or {{datetime}}"
        ) from None
    if not _RUN_ID.match(run_id):
        raise PipelineError(
            f"run id {run_id!r} must start with a letter or digit and hold only letters, digits, '.', '_', '-'"
        )
    return run_id


@dataclass
class Run:
    spec: JobSpec
    run_id: str

    @property
    def uri(self) -> str:
        return storage.join(self.spec.storage.root, self.run_id)

    def stage_uri(self, stage: str) -> str:
        return storage.join(self.uri, stage)


def config_hash(spec: JobSpec, stage: str, input_digests: dict[str, str]) -> str:
    """What decides a stage's result: the values of the spec keys it reads (stage_table.py) and
    the digests of its inputs' manifests. Resources are read by no stage: moving a run to more
    GPUs does not invalidate it."""
    return manifest.sha256_json(
        {"stage": stage, "reads": stage_table.settings(spec, stage), "inputs": input_digests}
    )


@dataclass
class StageResult:
    """What a stage function returns: named output URIs (under its stage URI) and metrics."""

    uris: dict[str, str] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


@dataclass
class StageContext:
    run: Run
    stage: str
    config_hash: str
    inputs: dict[str, manifest.Manifest]

    @property
    def spec(self) -> JobSpec:
        return self.run.spec

    @property
    def uri(self) -> str:
        return self.run.stage_uri(self.stage)

    def input_model(self) -> str:
        """The model URI of this stage's single model input."""
        (m,) = self.inputs.values()
        return m.uris["model"]


StageFn = Callable[[StageContext], StageResult]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# Sections that decide no stage's result, only where metrics go: a rerun may change them without --set.
FREE_SECTIONS = ("tracking",)


def store_spec(run: Run, overridden: bool) -> None:
    """Keep the resolved spec once per run; refuse a different spec under the same run id
    (unless only FREE_SECTIONS differ)."""
    uri = storage.join(run.uri, "spec.yaml")
    text = spec_to_yaml(run.spec)
    if storage.exists(uri):
        old = yaml.safe_load(storage.read_text(uri))
        new = yaml.safe_load(text)
        diffs = _differing_keys(old, new)
        if not overridden and any(d.split(".")[0] not in FREE_SECTIONS for d in diffs):
            raise PipelineError(
                f"run {run.run_id} at {run.uri} was started with a different spec; differing keys: "
                f"{', '.join(diffs)}. Use a new --run-id, or change keys with --set to rerun "
                "from the first changed stage."
            )
        if not diffs:
            return
        log.info(f"spec changed: {', '.join(diffs)}; changed stages and those after them rerun")
    storage.write_text(uri, text)


def _differing_keys(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differing_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def run_pipeline(
    spec: JobSpec,
    run_id: str,
    stage_fns: dict[str, StageFn],
    stages: list[str] | None = None,
    overridden: bool = False,
    force_unlock: bool = False,
) -> dict[str, manifest.Manifest]:
    """Run (or skip) the asked stages in order; returns every committed manifest of the run.

    The run's lease (lease.py) is held from before the first write to the end: a second driver
    on the same run stops with `lease.LeaseHeld`; `force_unlock` takes the lease from a holder
    that cannot be shown dead."""
    run = Run(spec, run_id)
    problems = stage_table.plan_problems(spec)
    if problems:
        raise PipelineError("; ".join(problems))
    enabled = stage_table.enabled(spec)
    asked = stages or enabled
    unknown = [s for s in asked if s not in STAGE_ORDER]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGE_ORDER)}")
    disabled = [s for s in asked if s not in enabled]
    if disabled:
        raise PipelineError(f"stage(s) {disabled} are disabled in the spec; enable them with --set {disabled[0]}.enabled=true")

    with lease.hold(run.uri, force=force_unlock):
        store_spec(run, overridden)
        log.info(f"run {run_id} at {run.uri}: stages {', '.join(asked)}")
        done = _run_stages(run, asked, stage_fns)
    missing = [s for s in asked if s not in done]
    if missing:
        raise PipelineError(f"stage(s) {missing} did not complete")
    return done


def _run_stages(run: Run, asked: list[str], stage_fns: dict[str, StageFn]) -> dict[str, manifest.Manifest]:
    """Skip or run each enabled stage in order; the manifests committed."""
    spec = run.spec
    done: dict[str, manifest.Manifest] = {}
    resolved: Run | None = None  # the run with names made locations, once, when a stage first runs
    for stage in stage_table.enabled(spec):
        uri = run.stage_uri(stage)
        inputs = {}
        needed = stage_table.inputs(spec, stage)
        for name in needed:
            if name not in done:
                if stage not in asked:
                    break
                raise PipelineError(
                    f"{stage} needs the output of {name}, which has no committed manifest at "
                    f"{run.stage_uri(name)}; run --stages {name},{stage}"
                )
            inputs[name] = done[name]
        if len(inputs) < len(needed):
            continue
        chash = config_hash(spec, stage, {k: m.digest for k, m in inputs.items()})
        log.debug(f"{stage}: config hash {chash[:12]} of {', '.join(stage_table.TABLE[stage].reads(spec))}"
                  + (f" and the manifests of {', '.join(inputs)}" if inputs else ""))
        current = manifest.read(uri)
        if current is not None and current.config_hash == chash:
            log.info(f"{stage}: complete (committed {current.finished_at}), skipped")
            done[stage] = current
            continue
        if stage not in asked:
            continue  # not asked and not committed: later stages that need it will say so
        if current is not None:
            log.info(f"{stage}: settings or inputs changed since {current.finished_at}; rerunning")
            manifest.retract(uri)
        if resolved is None:
            from elo_ray import hub, locations

            try:
                resolved = Run(locations.resolve(spec, run.uri), run.run_id)
            except hub.HubError as e:
                raise PipelineError(str(e)) from e
        ctx = StageContext(run=resolved, stage=stage, config_hash=chash, inputs=inputs)
        try:
            done[stage] = _run_stage(ctx, stage_fns[stage])
        except Exception as e:
            raise StageError(stage, e) from e
    return done


def _run_stage(ctx: StageContext, fn: StageFn) -> manifest.Manifest:
    """Run one stage and commit its manifest (written last)."""
    log.info(f"{ctx.stage}: starting")
    started, t0 = _now(), time.perf_counter()
    result = fn(ctx)
    seconds = time.perf_counter() - t0
    m = manifest.Manifest(
        stage=ctx.stage,
        config_hash=ctx.config_hash,
        inputs={k: v.digest for k, v in ctx.inputs.items()},
        outputs=manifest.describe_outputs(ctx.uri, skip_dirs=("ray", "work")),
        metrics={"seconds": round(seconds, 3), **result.metrics},
        started_at=started,
        finished_at=_now(),
        uris=result.uris,
    )
    manifest.commit(ctx.uri, m)
    log.info(f"{ctx.stage}: complete in {seconds:.1f}s")
    return m


def run_status(run_uri: str) -> dict[str, dict]:
    """Each stage's state, duration and key metrics for `elo-ray status`."""
    spec_uri = storage.join(run_uri, "spec.yaml")
    if not storage.exists(spec_uri):
        raise PipelineError(f"{run_uri} holds no elo-ray run (no spec.yaml); pass {{storage.root}}/{{run_id}}")
    spec = yaml.safe_load(storage.read_text(spec_uri)) or {}  # the run's resolved spec: every `enabled` set
    out = {}
    for stage in STAGE_ORDER:
        uri = storage.join(run_uri, stage)
        m = manifest.read(uri)
        if m is not None:
            out[stage] = {"state": "complete", "seconds": m.metrics.get("seconds"), "finished_at": m.finished_at,
                          "metrics": m.metrics, "uris": m.uris}
        elif not (spec.get(stage) or {}).get("enabled", True):
            out[stage] = {"state": "disabled"}
        elif storage.exists(uri):
            out[stage] = {"state": "started (no manifest)"}
        else:
            out[stage] = {"state": "not started"}
    return out

