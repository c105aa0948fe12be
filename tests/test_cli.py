"""How `elo-ray run` ends: one last line `run stopped: STAGE: message`, exit 2 for bad input and 1
for a failure, no traceback unless --debug. Stages are fakes raising each kind of error, through
the real CLI entry point, spec validation and pipeline; one case runs the real merge stage on Ray."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray.exceptions
import ray.train
import yaml

from elo_ray import cli, lease, pipeline, stages, storage
from elo_ray.config import SpecError
from elo_ray.data.sources import DataError
from elo_ray.storage import StorageError
from elo_ray.surgery import SurgeryError
from elo_ray.tiny import tiny_config, tiny_model
from elo_ray.train.errors import CheckpointMismatchError, DivergedError, TrainingError


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer) -> Path:
    """A valid spec: a 4-layer model with its tokenizer and a small two-language corpus."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model(tiny_config(num_hidden_layers=4, vocab_size=len(tiny_tokenizer)))
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    for lang, text in (("en", "A short document."), ("ko", "짧은 문서입니다.")):
        (root / f"{lang}.jsonl").write_text("\n".join(json.dumps({"text": f"{text} {i}"}) for i in range(20)) + "\n")
    return root


def write_spec(workspace: Path, tmp_path: Path, root: str | None = None) -> str:
    spec = {
        "storage": {"root": root or str(tmp_path / "runs")},
        "model": {"base": str(workspace / "model")},
        "pretrain": {"data": {"seq_len": 16, "sources": [
            {"uri": str(workspace / "en.jsonl"), "language": "en"}, {"uri": str(workspace / "ko.jsonl"), "language": "ko"}]}},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def fake_stage(name: str):
    def fn(ctx):
        if name == "eval":
            table = storage.join(ctx.uri, "perplexity.md")
            storage.write_text(table, "| model | ppl en |")
            return pipeline.StageResult(uris={"table": table})
        out = storage.join(ctx.uri, "model")
        storage.write_text(storage.join(out, "weights.txt"), name)
        return pipeline.StageResult(uris={"model": out})
    return fn


def raising(error: BaseException):
    def fn(ctx):
        raise error
    return fn


@pytest.fixture
def fake_stages(monkeypatch):
    """Every stage a fake that writes a file; a test swaps one for a stage that raises."""
    for name in pipeline.STAGE_ORDER:
        monkeypatch.setitem(stages.STAGES, name, fake_stage(name))
    return lambda name, error: monkeypatch.setitem(stages.STAGES, name, raising(error))


RAY_LOG_LINE = re.compile(r"^(\x1b\[\d+m)?\((\w+ )?pid=\d+")


def run(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(args)
    return code, capsys.readouterr().err


BAD_INPUT = [
    ("pretrain", DataError("/d/ko.jsonl line 1: no 'text' key; the record has keys body, id. Set text_field")),
    ("merge", SurgeryError("no config.json in /r/pretrain/model; a Hugging Face checkpoint holds config.json")),
    ("align", TrainingError("seq_len: 4096 tokens is more than the model takes (max_position_embeddings: 2048); "
                            "set seq_len to at most 2048")),
    ("align", CheckpointMismatchError("the checkpoint holds 2 layers, the model 4; start a new run id")),
    ("eval", SpecError("spec", ["eval.max_docs: must be positive"])),
]
FAILURES = [
    ("align", DivergedError("loss is nan at step 12; lower align.train.lr", step=12)),
    ("merge", StorageError("writing s3://b/r/merge/model failed after 4 attempts: ConnectionError")),
]


@pytest.mark.parametrize(("stage", "error"), BAD_INPUT, ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v)
def test_bad_input_stops_with_one_line_and_exit_2(stage, error, fake_stages, workspace, tmp_path, capsys):
    fake_stages(stage, error)
    code, err = run(["run", write_spec(workspace, tmp_path), "--run-id", "r1"], capsys)
    assert code == cli.EXIT_INVALID == 2
    assert err.splitlines()[-1] == f"run stopped: {stage}: " + "; ".join(
        line.strip() for line in str(error).splitlines())
    assert "Traceback" not in err


@pytest.mark.parametrize(("stage", "error"), FAILURES, ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v)
def test_failure_stops_with_one_line_and_exit_1(stage, error, fake_stages, workspace, tmp_path, capsys):
    fake_stages(stage, error)
    code, err = run(["run", write_spec(workspace, tmp_path), "--run-id", "r1"], capsys)
    assert code == cli.EXIT_FAILED == 1
    assert err.splitlines()[-1] == f"run stopped: {stage}: {error}"
    assert "Traceback" not in err


def test_a_crashed_ray_worker_is_a_failure_with_its_first_line(fake_stages, workspace, tmp_path, capsys):
    fake_stages("align", ray.exceptions.WorkerCrashedError())
    code, err = run(["run", write_spec(workspace, tmp_path), "--run-id", "r1"], capsys)
    assert code == 1
    first = str(ray.exceptions.WorkerCrashedError()).splitlines()[0].strip()
    assert err.splitlines()[-1] == f"run stopped: align: WorkerCrashedError: {first}; rerun with --debug for the details"
    assert "Traceback" not in err


def test_a_project_error_inside_a_train_worker_is_shown_as_itself(fake_stages, workspace, tmp_path, capsys):
    inner = DataError("/d/ko.jsonl line 7: not valid JSON; fix the line or set on_bad_record: skip")
    fake_stages("pretrain", ray.train.WorkerGroupError("[Rank 0] DataError ...\nTraceback ...", {0: inner}))
    code, err = run(["run", write_spec(workspace, tmp_path), "--run-id", "r1"], capsys)
    assert code == 2
    assert err.splitlines()[-1] == f"run stopped: pretrain: {inner}"


def test_an_unexpected_error_shows_its_traceback_and_exit_1(fake_stages, workspace, tmp_path, capsys):
    fake_stages("merge", KeyError("model"))
    code, err = run(["run", write_spec(workspace, tmp_path), "--run-id", "r1"], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1] == "run stopped: merge: KeyError: 'model'; an unexpected error: please report it with the traceback"


def test_debug_prints_the_traceback_before_the_line(fake_stages, workspace, tmp_path, capsys):
    error = DataError("/d/ko.jsonl line 1: no 'text' key")
    fake_stages("pretrain", error)
    code, err = run(["run", write_spec(workspace, tmp_path), "--run-id", "r1", "--debug"], capsys)
    assert code == 2
    assert "Traceback (most recent call last)" in err and 'raise error' in err
    assert err.splitlines()[-1] == f"run stopped: pretrain: {error}"


def test_a_run_that_cannot_start_names_no_stage(fake_stages, workspace, tmp_path, capsys):
    spec = write_spec(workspace, tmp_path)
    assert run(["run", spec, "--run-id", "r1"], capsys)[0] == 0
    code, err = run(["run", spec, "--run-id", "r1", "--stages", "instruct"], capsys)
    assert code == 2
    assert err.splitlines()[-1] == ("run stopped: stage(s) ['instruct'] are disabled in the spec; "
                                    "enable them with --set instruct.enabled=true")


def test_a_run_held_by_another_driver_stops_with_exit_2_naming_it(fake_stages, workspace, tmp_path, capsys):
    spec = write_spec(workspace, tmp_path)
    run_uri = str(tmp_path / "runs" / "r1")
    with lease.hold(run_uri) as held:
        code, err = run(["run", spec, "--run-id", "r1"], capsys)
        h = held.holder
        assert code == 2
        assert re.fullmatch(
            rf"run stopped: run {re.escape(run_uri)} is held by another driver: host {re.escape(h.host)}, pid {h.pid}, "
            rf"since {re.escape(h.since)}, last heartbeat .* \(\d+s ago\)\. Wait for it to end or stop it; a lease "
            r"without heartbeat is taken over after 300s, and --force-unlock takes it now \(only when that driver is "
            r"gone for good\)", err.splitlines()[-1])
        assert run(["run", spec, "--run-id", "r1", "--force-unlock"], capsys)[0] == 0
    n, holder = lease.current(run_uri)
    assert n == 2 and holder.state == "released"  # --force-unlock took lease 2 and released it


def test_a_second_driver_process_on_s3_exits_2_naming_the_holder(workspace, tmp_path, s3_bucket):
    """This process holds the run; `elo-ray run` in another process is refused before any stage."""
    spec = write_spec(workspace, tmp_path, root=f"{s3_bucket}/runs")
    run_uri = f"{s3_bucket}/runs/r1"
    with lease.hold(run_uri) as held:
        proc = subprocess.run([sys.executable, "-m", "elo_ray.cli", "run", spec, "--run-id", "r1"],
                              capture_output=True, text=True, timeout=600, env=os.environ)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"run stopped: run {run_uri} is held by another driver: host {held.holder.host}, "
                           f"pid {os.getpid()}, since {held.holder.since}, last heartbeat ")
    assert not storage.exists(f"{run_uri}/spec.yaml")


def test_a_surgery_error_in_a_real_ray_task_is_unwrapped(ray_local, workspace, tmp_path, capsys):
    """The real merge stage, as a Ray task, on a pretrain output that is no checkpoint."""
    from elo_ray.config import load_spec

    spec_path = write_spec(workspace, tmp_path)
    pipeline.run_pipeline(load_spec(spec_path), "real", {"pretrain": fake_stage("pretrain")}, stages=["pretrain"])
    code, err = run(["run", spec_path, "--run-id", "real", "--stages", "merge"], capsys)
    model = tmp_path / "runs" / "real" / "pretrain" / "model"
    assert code == 2
    ours = [line for line in err.splitlines() if not RAY_LOG_LINE.match(line)]  # Ray forwards its workers' logs
    assert ours[-1] == (
        f"run stopped: merge: no config.json in {model}; a Hugging Face checkpoint holds config.json and "
        "*.safetensors (write one with save_pretrained)")
    assert "elo_ray/pipeline.py" not in err  # no traceback of the driver's
