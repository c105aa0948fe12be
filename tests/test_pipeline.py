"""The durable pipeline's rules, with stage functions that write small files to real storage
(local and moto's S3). The real stages run end to end in test_demo.py."""

import datetime as dt
import json

import pytest

from elo_ray import cli, manifest, pipeline, storage
from elo_ray.config import spec_from_dict


def make_spec(root, **changes):
    raw = {
        "storage": {"root": root},
        "model": {"base": "/models/base"},
        "pretrain": {"data": {"sources": [{"uri": "/d/en.jsonl", "language": "en"}]}},
        "instruct": {"enabled": False},
    }
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return spec_from_dict(raw)


class Recorder:
    """Stage functions that record their calls and write one output file each."""

    def __init__(self):
        self.calls = []

    def fns(self):
        def make(stage):
            def fn(ctx):
                self.calls.append(stage)
                inputs = {k: storage.read_text(m.uris["model"] + "/weights.txt") for k, m in ctx.inputs.items()}
                out = storage.join(ctx.uri, "model")
                storage.write_text(storage.join(out, "weights.txt"), f"{stage}<-{json.dumps(inputs, sort_keys=True)}")
                return pipeline.StageResult(uris={"model": out}, metrics={"steps": 3})
            return fn
        return {s: make(s) for s in pipeline.STAGE_ORDER}


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    return request.getfixturevalue("s3_bucket") + "/runs"


def test_first_run_commits_every_stage_with_checksums(root):
    rec = Recorder()
    done = pipeline.run_pipeline(make_spec(root), "r1", rec.fns())
    assert rec.calls == ["pretrain", "merge", "align", "eval"]
    m = manifest.read(storage.join(root, "r1", "merge"))
    assert m.inputs == {"pretrain": done["pretrain"].digest}
    [out] = m.outputs
    body = storage.read_bytes(storage.join(root, "r1", "merge", "model", "weights.txt"))
    import hashlib
    assert out == {"path": "model/weights.txt", "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert m.metrics["steps"] == 3 and m.metrics["seconds"] >= 0
    assert set(m.versions) == {"elo_ray", "torch", "ray", "transformers", "python"}
    assert "pretrain" in storage.read_text(storage.join(root, "r1", "spec.yaml"))


def test_rerun_skips_committed_stages(root):
    rec = Recorder()
    pipeline.run_pipeline(make_spec(root), "r1", rec.fns())
    rec.calls.clear()
    pipeline.run_pipeline(make_spec(root), "r1", rec.fns())
    assert rec.calls == []


def test_config_change_reruns_that_stage_and_every_later_one(tmp_path):
    root = str(tmp_path)
    rec = Recorder()
    pipeline.run_pipeline(make_spec(root), "r1", rec.fns())
    rec.calls.clear()
    pipeline.run_pipeline(make_spec(root, **{"align.train": {"lr": 1e-5}}), "r1", rec.fns(), overridden=True)
    assert rec.calls == ["align", "eval"]
    rec.calls.clear()
    pipeline.run_pipeline(make_spec(root, **{"pretrain.layers": [0, 1]}), "r1", rec.fns(), overridden=True)
    assert rec.calls == ["pretrain", "merge", "align", "eval"]


def test_stage_output_without_manifest_is_never_consumed(tmp_path):
    root = str(tmp_path)
    rec = Recorder()
    pipeline.run_pipeline(make_spec(root), "r1", rec.fns(), stages=["pretrain"])
    # a merge that died after writing its model but before committing
    storage.write_text(storage.join(root, "r1", "merge", "model", "weights.txt"), "half-written")
    with pytest.raises(pipeline.PipelineError, match="align needs the output of merge, which has no committed manifest"):
        pipeline.run_pipeline(make_spec(root), "r1", rec.fns(), stages=["align"])
    rec.calls.clear()
    pipeline.run_pipeline(make_spec(root), "r1", rec.fns())
    assert rec.calls == ["merge", "align", "eval"]
    assert storage.read_text(storage.join(root, "r1", "merge", "model", "weights.txt")).startswith("merge<-")


def test_failed_stage_commits_nothing_and_rerun_retries_it(tmp_path):
    root = str(tmp_path)
    rec = Recorder()
    fns = rec.fns()

    def broken(ctx):
        storage.write_text(storage.join(ctx.uri, "model", "weights.txt"), "partial")
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        pipeline.run_pipeline(make_spec(root), "r1", {**fns, "align": broken})
    assert manifest.read(storage.join(root, "r1", "align")) is None
    assert pipeline.run_status(storage.join(root, "r1"))["align"] == {"state": "started (no manifest)"}
    rec.calls.clear()
    pipeline.run_pipeline(make_spec(root), "r1", fns)
    assert rec.calls == ["align", "eval"]


def test_same_run_id_with_other_spec_is_refused_naming_keys(tmp_path):
    root = str(tmp_path)
    pipeline.run_pipeline(make_spec(root), "r1", Recorder().fns())
    with pytest.raises(pipeline.PipelineError, match=r"differing keys: align.train.lr, pretrain.layers"):
        pipeline.run_pipeline(make_spec(root, **{"pretrain.layers": [1, 2], "align.train": {"lr": 1.0}}), "r1",
                              Recorder().fns())


def test_tracking_change_needs_no_set_and_reruns_nothing(tmp_path):
    root = str(tmp_path)
    rec = Recorder()
    pipeline.run_pipeline(make_spec(root), "r1", rec.fns())
    rec.calls.clear()
    pipeline.run_pipeline(make_spec(root, **{"tracking.tensorboard": False, "tracking.mlflow": {"experiment": "ko"}}),
                          "r1", rec.fns())
    assert rec.calls == []
    stored = storage.read_text(storage.join(root, "r1", "spec.yaml"))
    assert "tensorboard: false" in stored and "experiment: ko" in stored


def test_eval_tasks_change_reruns_eval_only(tmp_path):
    root = str(tmp_path)
    rec = Recorder()
    pipeline.run_pipeline(make_spec(root), "r1", rec.fns())
    rec.calls.clear()
    pipeline.run_pipeline(make_spec(root, **{"eval.tasks": ["kobest_copa"]}), "r1", rec.fns(), overridden=True)
    assert rec.calls == ["eval"]


def test_status_reports_each_stage(tmp_path, capsys):
    root = str(tmp_path)
    pipeline.run_pipeline(make_spec(root), "r1", Recorder().fns(), stages=["pretrain", "merge"])
    status = pipeline.run_status(storage.join(root, "r1"))
    assert [s["state"] for s in status.values()] == ["complete", "complete", "not started", "disabled", "not started"]
    assert status["merge"]["metrics"]["steps"] == 3
    capsys.readouterr()
    assert cli.main(["status", storage.join(root, "r1")]) == 0
    states = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert states == [["lease", "released"], ["pretrain", "complete"], ["merge", "complete"], ["align", "not"],
                      ["instruct", "disabled"], ["eval", "not"]]
    with pytest.raises(pipeline.PipelineError, match="holds no elo-ray run"):
        pipeline.run_status(str(tmp_path / "nothing"))


def test_disabled_and_unknown_stages_are_errors(tmp_path):
    spec = make_spec(str(tmp_path))
    with pytest.raises(pipeline.PipelineError, match=r"stage\(s\) \['instruct'\] are disabled"):
        pipeline.run_pipeline(spec, "r1", Recorder().fns(), stages=["instruct"])
    with pytest.raises(pipeline.PipelineError, match=r"unknown stage\(s\) \['pretrian'\]"):
        pipeline.run_pipeline(spec, "r1", Recorder().fns(), stages=["pretrian"])
    with pytest.raises(pipeline.PipelineError, match="merge.enabled: merge needs the output of pretrain; enable pretrain or disable merge"):
        pipeline.run_pipeline(make_spec(str(tmp_path), **{"pretrain.enabled": False}), "r1", Recorder().fns())


def test_run_id_templates():
    now = dt.datetime(2026, 11, 27, 5, 30, tzinfo=dt.timezone.utc)
    assert pipeline.resolve_run_id("ko-{date}", now) == "ko-2026-11-27"
    assert pipeline.resolve_run_id("ko-{datetime}", now) == "ko-2026-11-27T0530"
    with pytest.raises(pipeline.PipelineError, match="use {date}, {time} or {datetime}"):
        pipeline.resolve_run_id("ko-{day}", now)
    with pytest.raises(pipeline.PipelineError, match="must start with a letter or digit"):
        pipeline.resolve_run_id("../escape", now)


def test_storage_that_stops_answering_fails_with_stage_and_uri(tmp_path, monkeypatch):
    """An S3 endpoint with nothing listening: retried, then the stage and URI are named."""
    import socket
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    monkeypatch.setattr(storage, "RETRY_WAIT_S", 0.01)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own retries, for speed
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    spec = make_spec(str(tmp_path))

    def writes_to_dead_s3(ctx):
        storage.write_text("s3://bucket/x/model.bin", "x")

    try:
        with pytest.raises(pipeline.StageError, match=r"pretrain: writing s3://bucket/x/model.bin failed after 4 attempts") as e:
            pipeline.run_pipeline(spec, "r1", {**Recorder().fns(), "pretrain": writes_to_dead_s3})
        assert e.value.stage == "pretrain" and isinstance(e.value.error, storage.StorageError)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert manifest.read(storage.join(str(tmp_path), "r1", "pretrain")) is None


# --------------------------------------------------------------------------- what invalidates a stage


def full_spec(root, **changes):
    """Every stage enabled: instruct adds the chat vector and tunes on chat data."""
    return make_spec(root, **{
        "model.instruct": "/models/instruct",
        "instruct": {"enabled": True, "data": {"sources": [{"uri": "/d/chat.jsonl", "language": "en"}]}},
        **changes,
    })


@pytest.mark.parametrize(("change", "reruns"), [
    ({"resources.num_workers": 8, "resources.use_gpu": True, "resources.max_failures": 3}, []),
    ({"eval.max_docs": 8}, ["eval"]),
    ({"instruct.train": {"lr": 1e-5}}, ["instruct", "eval"]),
    ({"instruct.chat_vector": {"scale": 0.5}}, ["instruct", "eval"]),
    ({"model.instruct": "/models/instruct-v2"}, ["instruct", "eval"]),
    ({"align.train": {"lr": 1e-5}}, ["align", "instruct", "eval"]),
    ({"align.data": {"sources": [{"uri": "/d/align.jsonl", "language": "en"}]}}, ["align", "instruct", "eval"]),
    ({"pretrain.train": {"lr": 1e-4}}, ["pretrain", "merge", "align", "instruct", "eval"]),
    ({"pretrain.data.seq_len": 512}, ["pretrain", "merge", "align", "instruct", "eval"]),
    ({"model.tokenizer": "/models/tokenizer"}, ["pretrain", "merge", "align", "instruct", "eval"]),
    ({"model.base": "/models/base-v2"}, ["pretrain", "merge", "align", "instruct", "eval"]),
], ids=lambda v: ",".join(v) if isinstance(v, dict) else None)
def test_a_change_reruns_the_stages_that_read_it_and_those_after(tmp_path, change, reruns):
    root = str(tmp_path)
    rec = Recorder()
    pipeline.run_pipeline(full_spec(root), "r1", rec.fns())
    assert rec.calls == ["pretrain", "merge", "align", "instruct", "eval"]
    rec.calls.clear()
    pipeline.run_pipeline(full_spec(root, **change), "r1", rec.fns(), overridden=True)
    assert rec.calls == reruns


# Each performance-only train setting at a value other than its default.
PERFORMANCE = {"activation_checkpointing": True, "checkpoint_every": 7, "log_every": 3, "offload_to_cpu": True,
               "loss": "plain", "loss_chunk_tokens": 256, "frozen_params": "shard", "compile_layers": True}


def test_performance_only_settings_are_these_and_change_no_stages_hash(tmp_path):
    """The OOM story: turning on activation checkpointing (or offload, another loss kernel, ...)
    keeps every committed stage, and an interrupted one resumes under the same Ray run name."""
    from elo_ray.config import TrainConfig

    assert sorted(TrainConfig.performance_fields()) == sorted(PERFORMANCE)
    root = str(tmp_path)
    rec = Recorder()
    pipeline.run_pipeline(full_spec(root), "r1", rec.fns())
    rec.calls.clear()
    faster = {f"{stage}.train": dict(PERFORMANCE) for stage in ("pretrain", "align", "instruct")}
    pipeline.run_pipeline(full_spec(root, **faster), "r1", rec.fns(), overridden=True)
    assert rec.calls == []


def test_trading_micro_batch_size_for_grad_accum_reruns_nothing_and_another_product_does(tmp_path):
    root = str(tmp_path)
    rec = Recorder()
    pipeline.run_pipeline(full_spec(root, **{"align.train": {"micro_batch_size": 4}}), "r1", rec.fns())
    rec.calls.clear()
    pipeline.run_pipeline(full_spec(root, **{"align.train": {"micro_batch_size": 1, "grad_accum": 4}}), "r1",
                          rec.fns(), overridden=True)
    assert rec.calls == []
    pipeline.run_pipeline(full_spec(root, **{"align.train": {"micro_batch_size": 1, "grad_accum": 2}}), "r1",
                          rec.fns(), overridden=True)
    assert rec.calls == ["align", "instruct", "eval"]


def test_a_spec_with_default_performance_settings_keeps_the_hash_it_had_before_they_were_set_apart(tmp_path):
    """Runs committed by an elo-ray whose hash read every train setting as it is stay committed
    when they left the performance-only settings at their defaults and grad_accum at 1."""
    from elo_ray import stage_table

    spec = full_spec(str(tmp_path), **{"pretrain.train": {"lr": 1e-3, "micro_batch_size": 2}})
    for stage in stage_table.ORDER:
        as_before = {key: stage_table.value_at(spec, key) for key in stage_table.TABLE[stage].reads(spec)}
        assert stage_table.settings(spec, stage) == as_before, stage
    assert stage_table.settings(spec, "pretrain")["pretrain"]["train"]["micro_batch_size"] == 2


def test_adding_the_chat_vector_afterwards_reruns_only_instruct_and_eval(tmp_path):
    """The user story of issue 11: pretrain, merge and align are hours of 8 GPUs; keep them."""
    root = str(tmp_path)
    rec = Recorder()
    sft_only = {"instruct": {"enabled": True, "data": {"sources": [{"uri": "/d/chat.jsonl", "language": "en"}]}}}
    pipeline.run_pipeline(make_spec(root, **sft_only), "r1", rec.fns())
    committed = {s: manifest.read(storage.join(root, "r1", s)).digest for s in ("pretrain", "merge", "align")}
    rec.calls.clear()
    pipeline.run_pipeline(make_spec(root, **sft_only, **{"model.instruct": "/models/instruct"}), "r1", rec.fns(),
                          overridden=True)
    assert rec.calls == ["instruct", "eval"]
    assert {s: manifest.read(storage.join(root, "r1", s)).digest for s in committed} == committed


def test_instruct_without_the_chat_vector_ignores_model_instruct(tmp_path):
    root = str(tmp_path)
    rec = Recorder()
    off = {"instruct.chat_vector": {"enabled": False}}
    pipeline.run_pipeline(full_spec(root, **off), "r1", rec.fns())
    rec.calls.clear()
    pipeline.run_pipeline(full_spec(root, **off, **{"model.instruct": "/models/other"}), "r1", rec.fns(), overridden=True)
    assert rec.calls == []


def test_align_with_its_own_data_does_not_read_the_pretrain_data(tmp_path):
    """Seen on the hash: a pretrain.data change reruns pretrain, hence everything, anyway."""
    own = {"align.data": {"sources": [{"uri": "/d/align.jsonl", "language": "en"}]}}
    inputs = {"merge": "digest-of-merge"}
    before = pipeline.config_hash(make_spec(str(tmp_path), **own), "align", inputs)
    after = pipeline.config_hash(make_spec(str(tmp_path), **own, **{"pretrain.data.seq_len": 64}), "align", inputs)
    assert before == after
    reused = pipeline.config_hash(make_spec(str(tmp_path)), "align", inputs)
    assert reused != pipeline.config_hash(make_spec(str(tmp_path), **{"pretrain.data.seq_len": 64}), "align", inputs)


def test_instruct_takes_the_latest_model_and_eval_every_model(tmp_path):
    from elo_ray import stage_table

    spec = full_spec(str(tmp_path))
    assert [stage_table.inputs(spec, s) for s in stage_table.ORDER] == [
        [], ["pretrain"], ["merge"], ["align"], ["merge", "align", "instruct"]]
    no_align = full_spec(str(tmp_path), **{"align.enabled": False})
    assert stage_table.inputs(no_align, "instruct") == ["merge"]
    assert stage_table.inputs(no_align, "eval") == ["merge", "instruct"]


def test_stage_plan_names_the_missing_input_and_what_to_do(tmp_path):
    from elo_ray import stage_table

    spec = full_spec(str(tmp_path), **{"merge.enabled": False})
    assert stage_table.plan_problems(spec) == [
        "align.enabled: align needs the output of merge; enable merge or disable align"]
    spec = full_spec(str(tmp_path), **{"merge.enabled": False, "align.enabled": False})
    assert stage_table.plan_problems(spec) == [
        "instruct.enabled: instruct needs the output of merge or align; enable merge or disable instruct"]
    spec = full_spec(str(tmp_path), **{"instruct.sft_enabled": False, "model.instruct": None})
    assert stage_table.plan_problems(spec) == [
        "instruct: nothing to do; set model.instruct for the chat vector or enable sft"]


def test_a_run_held_by_another_driver_is_refused_before_any_write(root):
    from elo_ray import lease

    run_uri = storage.join(root, "r1")
    rec = Recorder()
    with lease.hold(run_uri) as held:
        with pytest.raises(lease.LeaseHeld, match=f"run {run_uri} is held by another driver: host .*, pid {held.holder.pid},"):
            pipeline.run_pipeline(make_spec(root), "r1", rec.fns())
    assert rec.calls == [] and not storage.exists(storage.join(run_uri, "spec.yaml"))
    pipeline.run_pipeline(make_spec(root), "r1", rec.fns())  # released: the next driver runs
    assert rec.calls == ["pretrain", "merge", "align", "eval"]
    assert lease.current(run_uri)[1].state == "released"
