"""The whole job end to end: the demo spec through the real stages on moto's S3 endpoint;
reruns skip; a driver killed during pretraining resumes from its checkpoint to the same
weights. The same spec on local storage through `ray job submit` is in test_job_submit.py."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elo_ray import manifest, pipeline, report, storage
from elo_ray.config import load_spec
from elo_ray.stages import STAGES
from elo_ray.train import metric_logging
from tfevents import scalars
from drivers import REPO, cli, wait_for_checkpoint

DEMO = str(resources.files("elo_ray") / "demo.yaml")
# The demo spec, shrunk to a few steps per training stage.
SMALL = [
    "pretrain.train.max_steps=4", "pretrain.train.checkpoint_every=2", "pretrain.train.log_every=2",
    "align.train.max_steps=2", "instruct.train.max_steps=2", "eval.max_docs=4", "eval.limit=8",
]


def tensors(uri: str, tmp: Path) -> dict[str, torch.Tensor]:
    local = storage.download(uri, str(tmp / uri.replace("/", "_"))) if storage.has_scheme(uri) else uri
    out = {}
    for name in sorted(os.listdir(local)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(local, name)))
    return out


@pytest.fixture(scope="module")
def ray_address(ray_local):
    return ray_local.get_runtime_context().gcs_address


def test_jobs_demo_is_the_packaged_demo_spec():
    assert (REPO / "jobs" / "demo.yaml").read_bytes() == Path(DEMO).read_bytes()


def test_demo_on_s3_commits_every_stage_and_rerun_skips(ray_local, s3_bucket, demo_base, tmp_path, caplog):
    root = f"{s3_bucket}/runs"
    spec = load_spec(DEMO, [f"storage.root={root}", f"model.base={demo_base}", *SMALL])
    done = pipeline.run_pipeline(spec, "s3demo", STAGES, overridden=True)
    assert list(done) == ["pretrain", "merge", "align", "instruct", "eval"]
    run = f"{root}/s3demo"
    for stage, m in done.items():
        on_disk = manifest.read(f"{run}/{stage}")
        assert on_disk.digest == m.digest and on_disk.status == "complete"
        for out in m.outputs:  # every listed output exists with the recorded size
            assert len(storage.read_bytes(f"{run}/{stage}/{out['path']}")) == out["size"]
    pre = done["pretrain"].metrics
    assert pre["step"] == 4
    data = pre["data"]
    assert set(data["trained_tokens"]) == {"en", "ko"} and sum(data["trained_tokens"].values()) == 4 * 8 * 128
    assert data["asked_shares"] == {"en": 0.1, "ko": 0.9}
    assert all(r["dropped"] < 0.01 * r["tokens"] for r in data["per_language"].values())

    # merge changed exactly the detached layers (0 and 5 of 6) of the base model
    base = tensors(demo_base, tmp_path)
    merged = tensors(done["merge"].uris["model"], tmp_path)
    changed = sorted({k.split(".")[2] for k in base if not torch.equal(base[k], merged[k])})
    assert changed == ["0", "5"]

    ppl = json.loads(storage.read_text(f"{run}/eval/perplexity.json"))
    assert list(ppl) == ["base", "merge", "align", "instruct"]
    assert all(math.isfinite(v) and v > 1 for row in ppl.values() for v in row.values())
    results = json.loads(storage.read_text(f"{run}/eval/results.json"))  # perplexity and task scores, one table
    assert {name: r["perplexity"] for name, r in results.items()} == ppl
    for r in results.values():
        assert sorted(r["tasks"]) == ["elo_mc_en", "elo_mc_ko"]
        assert all(r["tasks"][t]["acc"] * 8 in range(9) for t in r["tasks"])  # 8 questions each (eval.limit)

    # every training stage's TensorBoard events, uploaded to S3, hold its metrics.jsonl numbers
    for stage in ("pretrain", "align", "instruct"):
        records = [json.loads(line) for line in storage.read_text(done[stage].uris["metrics"]).splitlines()]
        logged = scalars(f"{run}/{stage}/tensorboard")
        want = {}
        for r in records:
            for key, value in metric_logging.scalars(r).items():
                want.setdefault(key, {})[r["step"]] = value
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gb", "tokens_en", "tokens_ko"} <= set(want)
        assert set(logged) == set(want), stage
        for key, steps in want.items():
            assert logged[key].keys() == steps.keys(), (stage, key)
            assert all(math.isclose(logged[key][s], v, rel_tol=1e-6) for s, v in steps.items()), (stage, key)

    out = report.write_report(run)
    assert storage.read_bytes(f"{out}/loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
    page = storage.read_text(f"{out}/README.md")
    assert all(f"| {stage} |" in page for stage in done)

    caplog.clear()
    caplog.set_level(logging.INFO, logger="elo_ray")
    again = pipeline.run_pipeline(spec, "s3demo", STAGES, overridden=True)
    assert {s: m.digest for s, m in again.items()} == {s: m.digest for s, m in done.items()}
    assert caplog.text.count("skipped") == 5 and "starting" not in caplog.text


def test_killed_driver_resumes_pretraining_to_the_same_weights(ray_address, demo_base, tmp_path):
    """SIGKILL the driver once pretraining has checkpointed; the rerun resumes from there and
    ends with the weights of a run that was never interrupted."""
    root = tmp_path / "runs"
    steps = ["--set", "pretrain.train.max_steps=8", "--set", "pretrain.train.checkpoint_every=2"]
    common = ["run", "jobs/demo.yaml", "--stages", "pretrain", "--set", f"storage.root={root}",
              "--set", f"model.base={demo_base}", *steps]
    env = {"RAY_ADDRESS": ray_address}

    whole = cli([*common, "--run-id", "whole"], env)
    out, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, out

    victim = cli([*common, "--run-id", "killed"], env)
    wait_for_checkpoint(root / "killed" / "pretrain" / "ray", victim)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert manifest.read(str(root / "killed" / "pretrain")) is None

    again = cli([*common, "--run-id", "killed"], env)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    resumed = manifest.read(str(root / "killed" / "pretrain")).metrics
    assert resumed["resumed_from_step"] >= 2 and resumed["step"] == 8
    a = tensors(str(root / "whole" / "pretrain" / "model"), tmp_path)
    b = tensors(str(root / "killed" / "pretrain" / "model"), tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow  # a third pretraining run of the demo
def test_warm_start_trains_from_an_earlier_elo_model(ray_local, demo_base, tmp_path):
    """Scheduled retraining: pretraining starts from a previous run's ELO layers, not the base's."""
    from elo_ray import surgery

    earlier = surgery.save_detached(demo_base, (0, -1), str(tmp_path / "earlier-elo"))
    spec = load_spec(DEMO, [f"storage.root={tmp_path / 'runs'}", f"model.base={demo_base}",
                            f"pretrain.init_from={earlier}", "pretrain.train.max_steps=2"])
    done = pipeline.run_pipeline(spec, "warm", STAGES, stages=["pretrain"], overridden=True)
    assert not (tmp_path / "runs" / "warm" / "pretrain" / "work").exists()  # nothing detached from the base
    out = done["pretrain"].uris["model"]
    assert surgery.checkpoint_config(out).elo_layers == [0, 5]
    before, after = tensors(earlier, tmp_path), tensors(out, tmp_path)
    assert before.keys() == after.keys()
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
