"""benchmarks/gpu_check.py: the goals it checks on a GPU's figures."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


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
