"""`elo-ray report`: from a run's manifests, metrics.jsonl files and results.json, two PNG plots
and a markdown page listing every stage with its numbers (a small run written by hand)."""

from __future__ import annotations

import json
import struct

import pytest

from elo_ray import cli, manifest, report, storage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RESULTS = {
    "base": {"perplexity": {"en": 9.87, "ko": 143.2}, "tasks": {"elo_mc_en": {"acc": 0.4}, "elo_mc_ko": {"acc": 0.25}}},
    "merge": {"perplexity": {"en": 10.5, "ko": 88.1}, "tasks": {"elo_mc_en": {"acc": 0.35}, "elo_mc_ko": {"acc": 0.3}}},
    "align": {"perplexity": {"en": 10.1, "ko": 61.75}, "tasks": {"elo_mc_en": {"acc": 0.45}, "elo_mc_ko": {"acc": 0.375}}},
}


def commit(run: str, stage: str, metrics: dict, uris: dict | None = None) -> None:
    m = manifest.Manifest(stage=stage, config_hash=f"{stage}0123456789abcdef", inputs={}, outputs=[], metrics=metrics,
                          started_at="2026-11-29T10:00:00+00:00", finished_at="2026-11-29T10:05:00+00:00",
                          versions={}, uris=uris or {})
    manifest.commit(storage.join(run, stage), m)


def curve(losses: list[float]) -> str:
    return "".join(json.dumps({"step": 2 * (i + 1), "loss": v, "lr": 1e-3}) + "\n" for i, v in enumerate(losses))


@pytest.fixture
def run(tmp_path) -> str:
    run = str(tmp_path / "runs" / "ko-2026-11-29")
    storage.write_text(f"{run}/spec.yaml", "run_id: ko\n")
    # pretrain names its metrics in the manifest; align is an older run found by its Ray run directory
    storage.write_text(f"{run}/pretrain/ray/pretrain-x/metrics.jsonl", curve([7.5, 6.25, 5.5]))
    commit(run, "pretrain", {"seconds": 61.5, "step": 6, "tokens_per_s": 4321.0,
                             "data": {"trained_tokens": {"en": 1024, "ko": 9216}}},
           {"model": f"{run}/pretrain/model", "metrics": f"{run}/pretrain/ray/pretrain-x/metrics.jsonl"})
    commit(run, "merge", {"seconds": 3.25}, {"model": f"{run}/merge/model"})
    storage.write_text(f"{run}/align/ray/align-align0123456/metrics.jsonl", curve([4.5, 4.125]))
    commit(run, "align", {"seconds": 20.0, "step": 4, "tokens_per_s": 3000.0}, {"model": f"{run}/align/model"})
    storage.write_text(f"{run}/eval/results.json", json.dumps(RESULTS))
    commit(run, "eval", {"seconds": 12.0})
    return run


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_writes_the_plots_and_a_page_with_every_stage(run):
    out = report.write_report(run)
    assert out == f"{run}/report"
    assert sorted(storage.listdir(out)) == ["README.md", "eval.png", "loss.png"]
    for name in ("loss.png", "eval.png"):
        width, height = png_size(storage.read_bytes(f"{out}/{name}"))
        assert width > 300 and height > 200
    page = storage.read_text(f"{out}/README.md")
    assert "| pretrain | 2026-11-29T10:05:00+00:00 | 61.5 | 6 | 7.5 | 5.5 | 4,321 | en 1,024, ko 9,216 |" in page
    assert "| merge | 2026-11-29T10:05:00+00:00 | 3.2 | - | - | - | - | - |" in page
    assert "| align | 2026-11-29T10:05:00+00:00 | 20.0 | 4 | 4.5 | 4.125 | 3,000 | - |" in page
    assert "| eval | " in page
    assert "| model | ppl en | ppl ko | acc elo_mc_en | acc elo_mc_ko |" in page
    assert "| align | 10.10 | 61.75 | 0.450 | 0.375 |" in page
    assert "![training loss](loss.png)" in page and "![evaluation](eval.png)" in page


def test_report_on_s3(run, s3_bucket, tmp_path):
    remote = f"{s3_bucket}/runs/ko"
    storage.upload(run, remote)
    storage.write_text(f"{remote}/pretrain/manifest.json", storage.read_text(f"{run}/pretrain/manifest.json")
                       .replace(run, remote))
    out = report.write_report(remote)
    assert png_size(storage.read_bytes(f"{out}/loss.png"))[0] > 300
    assert "| pretrain |" in storage.read_text(f"{out}/README.md")


def test_report_command_names_where_it_wrote(run, capsys):
    assert cli.main(["report", run]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run}/report/README.md with eval.png, loss.png beside it"


def test_report_of_a_directory_without_a_run_says_so(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path} holds no elo-ray run (no spec.yaml)" in capsys.readouterr().err
