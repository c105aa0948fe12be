"""benchmarks/gpu_check.py: its CPU-sized variant end to end (slow: so the GPU command cannot rot
between GPU runs), its job spec and manifest checks, its row order and deadline, and the goals
it checks on a GPU's figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """One run of `gpu_check.py --device cpu` in a subprocess (its own local Ray), outputs to $OUT."""
    root = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "OUT": str(root / "out"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--workdir", str(root / "work")], env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"report": json.loads((root / "out" / "results.json").read_text()),
            "markdown": (root / "out" / "results.md").read_text(), "stdout": proc.stdout, "out": root / "out"}


@pytest.mark.slow
def test_cpu_variant_runs_every_stage_and_checks_each_manifest(cpu_check):
    pipeline = cpu_check["report"]["pipeline"]
    assert [s["stage"] for s in pipeline["stages"]] == list(gpu_check.STAGES)
    for s in pipeline["stages"]:
        assert s["outputs"] > 0
        if s["stage"] in ("pretrain", "align", "instruct"):
            assert math.isfinite(s["loss"]) and s["tokens_total"] > 0 and s["tokens_per_s"] > 0
    eval_row = pipeline["stages"][-1]
    assert sorted(eval_row["perplexity"]) == ["align", "base", "instruct", "merge"]  # pretrain: the detached model
    assert pipeline["base_model"]["params"] > 0 and "elo-ray" in (cpu_check["out"] / "pipeline.log").read_text()


@pytest.mark.slow
def test_cpu_variant_measures_each_implementation_it_names(cpu_check):
    runs = cpu_check["report"]["throughput"]
    wanted = {(i, m) for _, methods, impls in gpu_check.PRESETS["cpu"]["runs"] for m in methods for i in impls}
    got = {(r["impl"], r["method"]) for run in runs for r in run["rows"]}
    assert got == wanted
    for run in runs:
        assert run["skipped"] == []
        for r in run["rows"]:
            assert "error" not in r, r
            assert r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 and r["flops_per_token"] > 0
            assert r["mfu"] is None  # no peak FLOP/s known for a CPU


@pytest.mark.slow
def test_cpu_variant_prints_and_writes_one_results_table(cpu_check):
    md = cpu_check["markdown"]
    assert md.startswith("# gpu_check on cpu")
    assert "## Pipeline: `elo-ray run`, one worker" in md and "| eval |" in md
    assert "## Throughput, shape tiny" in md and "| elo |" in md and "core+loss=plain+frozen_params=shard" in md
    assert md.strip() in cpu_check["stdout"]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_checks_job_spec_is_a_valid_spec_of_every_stage(device, tmp_path, monkeypatch):
    from elo_ray.config import JobSpec

    monkeypatch.setattr(gpu_check, "gpu_type", lambda: "H200-141GB")  # no GPU to ask here
    spec = JobSpec.model_validate(gpu_check.job_spec(tmp_path / "base", tmp_path / "runs", gpu_check.PRESETS[device],
                                                     torch.device(device), loss="chunked"))
    assert [s for s in gpu_check.STAGES if getattr(spec, s).enabled] == list(gpu_check.STAGES)
    assert spec.resources.use_gpu is (device == "cuda") and spec.resources.num_workers == 1
    assert spec.pretrain.train.loss == spec.align.train.loss == spec.instruct.train.loss == "chunked"
    assert spec.pretrain.train.precision == ("bf16" if device == "cuda" else "fp32")


def test_a_missing_manifest_names_its_stage(tmp_path):
    with pytest.raises(RuntimeError, match="stage pretrain: no manifest under .*/pretrain: it did not commit"):
        gpu_check.check_manifests(str(tmp_path))


def test_on_a_gpu_the_goals_rows_run_first():
    # A run cut short by --deadline still has what the three goals need.
    runs = gpu_check.PRESETS["cuda"]["runs"]
    assert runs[0] == ("8b", ["elo"], ["bare", "core", "engine"])
    assert runs[1] == ("1b", ["elo", "full"], ["bare", "core", "engine"])


def test_goals_compare_engine_with_bare_mfu_and_the_analytic_ratio():
    def r(impl, method, tps, flops, mfu=None):
        return {"impl": impl, "method": method, "tokens_per_s": tps, "flops_per_token": flops, "mfu": mfu}

    results = [
        {"shape": "8b", "rows": [r("bare", "elo", 100.0, 1), r("engine", "elo", 96.0, 1, 0.40), r("core", "elo", 97.0, 1, 0.46)]},
        {"shape": "1b", "rows": [r("bare", "elo", 400.0, 10), r("bare", "full", 100.0, 40),
                                 r("engine", "elo", 360.0, 10), r("engine", "full", 100.0, 40)]},
    ]
    goals = {g["goal"]: (round(g["value"], 3), g["met"]) for g in gpu_check.goals(results)}
    assert goals == {
        "engine ELO tok/s / bare's at 8b": (0.96, True),
        "ELO step MFU at 8b (core)": (0.46, True),
        "ELO/full speed-up / analytic at 1b (bare)": (1.0, True),
        "ELO/full speed-up / analytic at 1b (engine)": (0.9, False),
    }


def test_rows_not_begun_by_the_deadline_are_listed_not_run(tmp_path):
    import torch

    preset = gpu_check.PRESETS["cpu"]
    seen = []
    results = gpu_check.run_throughput(tmp_path, preset, torch.device("cpu"), preset["runs"], deadline=0.0,
                                       on_row=seen.append)
    assert seen == []  # nothing measured, so nothing reported row by row
    assert [(r["shape"], r["skipped"], r["rows"]) for r in results] == [
        ("tiny", ["bare elo", "core elo", "bare full", "core full", "engine elo",
                  "core+loss=plain+frozen_params=shard elo"], [])]


def test_without_liger_pins_the_chunked_loss_where_auto_would_take_liger():
    runs = [("8b", ["elo"], ["bare", "core", "engine", "core+loss=plain+frozen_params=shard", "core+compile_layers=true"])]
    assert gpu_check.without_liger(runs) == [("8b", ["elo"], [
        "bare", "core+loss=chunked", "engine+loss=chunked", "core+loss=plain+frozen_params=shard",
        "core+compile_layers=true+loss=chunked"])]
