"""The five stages of an ELO job, one function each, in pipeline order.

Each takes a `StageContext` (the run, its spec, the manifests of its inputs) and returns a
`StageResult` (named output URIs and metrics); `pipeline.run_pipeline` commits the manifest.
Training stages run as Ray Train runs through the one worker loop in `elo_ray.train`; merge
and chat vector run as Ray tasks (on a cluster they land on nodes with CPUs and memory).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import ray

from elo_ray import data, evaluate, local_ray, log_relay, logs, stage_table, storage, surgery
from elo_ray.config import TrainConfig
from elo_ray.pipeline import StageContext, StageResult
from elo_ray.train import run_training
from elo_ray.train.metric_logging import TrackingTarget

log = logging.getLogger(__name__)


def ensure_ray(**local: Any) -> None:
    """Join the cluster under `ray job submit` (RAY_ADDRESS is set), else start a local Ray
    with its dashboard, which Ray Train needs (`local_ray`; `local`: more of `local_ray.start`'s
    arguments, e.g. the benchmarks' dashboard=False and num_cpus).

    Called by each stage as it starts, so that a rerun whose stages are all committed
    never pays for starting Ray. What Ray's workers print (their logs, Ray's and the
    libraries' progress bars) reaches the driver only with --verbose; elo-ray's own messages
    from workers come through `log_relay` either way. A Ray started by someone else (a
    library user, the tests) keeps its own settings, and its workers print elo-ray's
    messages themselves."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    verbose = logs.level() <= logging.DEBUG
    # Ray's own notices on the driver (token auth, node start-up) only with --verbose too.
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        url = local_ray.start(**quiet, **local)
        log.info("started a local Ray; " + (f"its dashboard: {url}" if url else "no dashboard"))
    if not verbose:
        logs.quiet_ray_data()
        logs.quiet_worker_pool_notice()
    log_relay.start()


def root_error(error: BaseException) -> BaseException:
    """The error to show: a stage's own error, out of Ray's wrappers (a task's RayTaskError, a
    Train worker group's failure). `elo-ray`'s last line and `elo-ray search`'s failed trials."""
    import ray.exceptions
    import ray.train

    from elo_ray.pipeline import StageError

    while True:
        if isinstance(error, StageError):
            error = error.error
        elif isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, Exception):
            error = error.cause
        elif isinstance(error, ray.train.WorkerGroupError) and error.worker_failures:
            error = next(iter(error.worker_failures.values()))
        else:
            return error


def _on_ray(fn):
    @functools.wraps(fn)
    def wrapper(ctx: StageContext) -> StageResult:
        ensure_ray()
        try:
            return fn(ctx)
        finally:
            log_relay.flush()  # the stage's worker messages before the pipeline's next line

    return wrapper


def base_model(ctx: StageContext) -> str:
    return ctx.spec.model.base  # a location: the pipeline resolved names before the first stage


def tokenizer_uri(ctx: StageContext) -> str:
    spec = ctx.spec  # resolved: model.tokenizer is set (the base model's location when unset)
    return stage_table.value_at(spec, stage_table.tokenizer_key(spec))


def stage_data(ctx: StageContext):
    """The stage's data, as the stage table says (its sources are locations: the spec is resolved)."""
    _, cfg = stage_table.TABLE[ctx.stage].data(ctx.spec)
    return cfg


def stage_train(ctx: StageContext) -> TrainConfig:
    """The stage's train settings, as the stage table gives them (the layers a layer method trains filled in)."""
    return stage_table.TABLE[ctx.stage].train(ctx.spec)


def _train(ctx: StageContext, model_uri: str, train: TrainConfig, plan, seq_len: int) -> StageResult:
    output = storage.join(ctx.uri, "model")
    result = run_training(
        name=f"{ctx.stage}-{ctx.config_hash[:12]}",
        model_uri=model_uri,
        output_uri=output,
        storage_uri=storage.join(ctx.uri, "ray"),
        train=train,
        resources=ctx.spec.resources,
        plan=plan,
        seq_len=seq_len,
        tracking=TrackingTarget.for_stage(
            ctx.spec.tracking, ctx.run.run_id, ctx.stage, ctx.uri, train.model_dump(mode="json")
        ),
    )
    trained = {lang: result.metrics[f"tokens_{lang}"] for lang in plan.languages if f"tokens_{lang}" in result.metrics}
    total = sum(trained.values())
    data_metrics = {
        "asked_shares": plan.weights,
        "trained_tokens": trained,
        "trained_shares": {lang: n / total for lang, n in trained.items()} if total else {},
        "per_language": plan.report,  # docs, tokens read and dropped, skipped records, held out
    }
    return StageResult(uris={"model": output, "metrics": result.metrics_uri},
                       metrics={**result.metrics, "data": data_metrics})


def _remote(fn, *args, **kwargs):
    """Run a streaming surgery function as a Ray task and wait for it."""
    return ray.get(ray.remote(num_cpus=1, max_retries=2)(logs.in_workers(fn)).remote(*args, **kwargs))


@_on_ray
def pretrain(ctx: StageContext) -> StageResult:
    """Detach the chosen layers (or warm-start from an earlier ELO model) and train them."""
    cfg = ctx.spec.pretrain
    if cfg.init_from:
        model_uri = cfg.init_from
        log.info(f"pretrain: warm start from {model_uri}")
    else:
        model_uri = storage.join(ctx.uri, "work", "init")
        log.info(f"pretrain: detaching layers {cfg.layers} of {base_model(ctx)}")
        _remote(surgery.save_detached, base_model(ctx), tuple(cfg.layers), model_uri, overwrite=True)
    data_cfg = stage_data(ctx)
    plan = data.plan_pretrain_stream(data_cfg, tokenizer_uri(ctx), world_size=ctx.spec.resources.num_workers)
    return _train(ctx, model_uri, cfg.train.model_copy(update={"method": "elo"}), plan, data_cfg.seq_len)


@_on_ray
def merge(ctx: StageContext) -> StageResult:
    """Write the trained ELO layers back over the base model's layers."""
    out = storage.join(ctx.uri, "model")
    _remote(surgery.merge, base_model(ctx), ctx.input_model(), out, overwrite=True)
    return StageResult(uris={"model": out})


@_on_ray
def align(ctx: StageContext) -> StageResult:
    """Brief fine-tuning of the merged model on bilingual data (align.train.method: full, or one
    that trains less of the model)."""
    data_cfg = stage_data(ctx)  # align.data, or the pretrain data within align.max_tokens
    plan = data.plan_pretrain_stream(data_cfg, tokenizer_uri(ctx), world_size=ctx.spec.resources.num_workers)
    return _train(ctx, ctx.input_model(), stage_train(ctx), plan, data_cfg.seq_len)


@_on_ray
def instruct(ctx: StageContext) -> StageResult:
    """Chat vector (instruct - base, added to the aligned model), then instruction tuning."""
    cfg, spec = ctx.spec.instruct, ctx.spec
    model_uri = ctx.input_model()
    if stage_table.chat_vector_on(spec):
        out = storage.join(ctx.uri, "model" if not cfg.sft_enabled else "work/chat_vector")
        log.info(f"instruct: adding the chat vector {spec.model.instruct} - {base_model(ctx)}")
        _remote(
            surgery.chat_vector, model_uri, base_model(ctx), spec.model.instruct,
            out, scale=cfg.chat_vector.scale, skip=tuple(cfg.chat_vector.skip), overwrite=True,
        )
        model_uri = out
    if not cfg.sft_enabled:
        return StageResult(uris={"model": model_uri})
    data_cfg = stage_data(ctx)
    plan = data.plan_chat_stream(data_cfg, tokenizer_uri(ctx), world_size=spec.resources.num_workers)
    return _train(ctx, model_uri, stage_train(ctx), plan, data_cfg.seq_len)


@_on_ray
def eval(ctx: StageContext) -> StageResult:  # noqa: A001 - the stage is called eval
    """Held-out perplexity per language and the spec's eval.tasks, for the base model and each
    stage's output: one table (results.md), results.json, and perplexity.json."""
    spec = ctx.spec
    heldout = data.heldout(stage_data(ctx), tokenizer_uri(ctx))  # the pretrain data's held-out documents
    heldout = {lang: docs[: spec.eval.max_docs] for lang, docs in heldout.items()}
    models = {"base": base_model(ctx), **{name: m.uris["model"] for name, m in ctx.inputs.items()}}
    task = ray.remote(num_cpus=1, num_gpus=1 if spec.resources.use_gpu else 0)(logs.in_workers(evaluate.score_models))
    results = ray.get(task.remote(models, heldout, tokenizer_uri(ctx), spec.eval, spec.resources.use_gpu))
    perplexities = {name: r["perplexity"] for name, r in results.items()}
    table = evaluate.format_table(results)
    storage.write_text(storage.join(ctx.uri, "perplexity.json"), json.dumps(perplexities, indent=2))
    storage.write_text(storage.join(ctx.uri, evaluate.RESULTS_FILE), json.dumps(results, indent=2))
    storage.write_text(storage.join(ctx.uri, "results.md"), table + "\n")
    # The table itself ends `elo-ray run`'s output (cli.cmd_run), once.
    log.info("eval: held-out perplexity (lower is better)" + (" and task scores (higher is better)" if spec.eval.tasks else "")
             + f" of {', '.join(results)} in {storage.join(ctx.uri, 'results.md')}")
    metrics = {"perplexity": perplexities, "tasks": {name: r["tasks"] for name, r in results.items() if r["tasks"]}}
    return StageResult(uris={"table": storage.join(ctx.uri, "results.md")}, metrics=metrics)


STAGES = {"pretrain": pretrain, "merge": merge, "align": align, "instruct": instruct, "eval": eval}
