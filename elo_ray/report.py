"""`elo-ray report RUN`: a run's training curves and scores as PNG plots and a markdown page.

Reads only what the run committed: each stage's manifest, the training stages' metrics.jsonl
and the eval stage's results.json, and writes into `{run}/report/` (or another location):

    loss.png    the loss curve of every training stage, one panel each, on one page
    eval.png    held-out perplexity per language and task scores, per model (base and stages)
    README.md   every stage with its numbers, the eval table, the two plots

Plots are drawn with matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import importlib.util
import io
import json
import math

from elo_ray import evaluate, manifest, storage
from elo_ray.pipeline import STAGE_ORDER

REPORT_DIR = "report"
TRAINING_STAGES = ("pretrain", "align", "instruct")
_PNG_DPI = 110


class ReportError(RuntimeError):
    """The run cannot be reported on; the message says why and what to do."""


def _manifests(run_uri: str) -> dict[str, manifest.Manifest]:
    if not storage.exists(storage.join(run_uri, "spec.yaml")):
        raise ReportError(f"{run_uri} holds no elo-ray run (no spec.yaml); pass {{storage.root}}/{{run_id}}")
    found = {s: manifest.read(storage.join(run_uri, s)) for s in STAGE_ORDER}
    found = {s: m for s, m in found.items() if m is not None}
    if not found:
        raise ReportError(f"{run_uri}: no stage has completed yet; nothing to report")
    return found


def metrics_uri(run_uri: str, stage: str, m: manifest.Manifest) -> str:
    """Where a training stage's metrics.jsonl is: named in its manifest (runs before the
    name was recorded: the Ray run directory the stage trained in)."""
    if "metrics" in m.uris:
        return m.uris["metrics"]
    return storage.join(run_uri, stage, "ray", f"{stage}-{m.config_hash[:12]}", "metrics.jsonl")


def training_curves(run_uri: str, manifests: dict[str, manifest.Manifest]) -> dict[str, list[dict]]:
    """{stage: metric records, one per log interval} of every committed training stage."""
    curves = {}
    for stage in TRAINING_STAGES:
        m = manifests.get(stage)
        if m is None:
            continue
        uri = metrics_uri(run_uri, stage, m)
        if storage.exists(uri):
            curves[stage] = [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]
    return curves


def eval_results(run_uri: str, manifests: dict[str, manifest.Manifest]) -> dict[str, dict] | None:
    """The eval stage's results ({model: {"perplexity": ..., "tasks": ...}}), if it ran."""
    if "eval" not in manifests:
        return None
    uri = storage.join(run_uri, "eval", evaluate.RESULTS_FILE)
    if storage.exists(uri):
        return json.loads(storage.read_text(uri))
    ppl = json.loads(storage.read_text(storage.join(run_uri, "eval", "perplexity.json")))  # older runs
    return {name: {"perplexity": row, "tasks": {}} for name, row in ppl.items()}


# ------------------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_PNG_DPI, bbox_inches="tight")
    return buf.getvalue()


def loss_plot(curves: dict[str, list[dict]], run_id: str) -> bytes:
    """One panel per training stage: loss against optimizer step."""
    from matplotlib.figure import Figure

    stages = list(curves) or ["(no training stage)"]
    fig = Figure(figsize=(4.2 * len(stages), 3.4))
    for ax, stage in zip(fig.subplots(1, len(stages), squeeze=False)[0], stages):
        records = curves.get(stage, [])
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], marker=".", color="tab:blue")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run_id}: training loss")
    return _png(fig)


def eval_plot(results: dict[str, dict], run_id: str) -> bytes:
    """Held-out perplexity per language and task score per task, one bar per model."""
    from matplotlib.figure import Figure

    models = list(results)
    langs = sorted({lang for r in results.values() for lang in r.get("perplexity", {})})
    tasks = evaluate.task_columns(results)
    panels = [("held-out perplexity (lower is better, log scale)", langs, lambda r, k: r.get("perplexity", {}).get(k))]
    if tasks:
        panels.append(("task scores (higher is better)", [f"{t} {metric}" for t, metric in tasks],
                       lambda r, k: evaluate.task_score(r, *k.rsplit(" ", 1))))
    fig = Figure(figsize=(6.0 * len(panels), 3.8))
    width = 0.8 / max(len(models), 1)
    for ax, (title, keys, value) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for i, name in enumerate(models):
            ys = [value(results[name], k) for k in keys]
            xs = [j + i * width for j in range(len(keys))]
            ax.bar(xs, [y if y is not None and math.isfinite(y) else 0.0 for y in ys], width, label=name)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(keys))], keys, rotation=15)
        ax.set_title(title)
        if title.startswith("held-out perplexity"):
            ax.set_yscale("log")  # English near 10 and the target language in the hundreds, both readable
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{run_id}: evaluation per model")
    return _png(fig)


# ------------------------------------------------------------------------------------- markdown


def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def stage_table(manifests: dict[str, manifest.Manifest], curves: dict[str, list[dict]]) -> str:
    lines = ["| stage | finished | seconds | steps | first loss | last loss | tokens/s | tokens trained |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for stage, m in manifests.items():
        records = curves.get(stage, [])
        trained = m.metrics.get("data", {}).get("trained_tokens", {})
        tokens = ", ".join(f"{lang} {n:,}" for lang, n in sorted(trained.items())) or "-"
        lines.append(
            f"| {stage} | {m.finished_at} | {_fmt(m.metrics.get('seconds'), '.1f')} | {_fmt(m.metrics.get('step'), 'd')} "
            f"| {_fmt(records[0]['loss'] if records else None)} | {_fmt(records[-1]['loss'] if records else None)} "
            f"| {_fmt(m.metrics.get('tokens_per_s'), ',.0f')} | {tokens} |"
        )
    return "\n".join(lines)


def markdown(run_uri: str, run_id: str, manifests, curves, results) -> str:
    parts = [f"# elo-ray run {run_id}", "", f"Run: `{run_uri}`", "", "## Stages", "", stage_table(manifests, curves), ""]
    if curves:
        parts += ["## Training loss", "", "![training loss](loss.png)", ""]
    if results is not None:
        parts += ["## Evaluation", "", evaluate.format_table(results), "", "![evaluation](eval.png)", ""]
    return "\n".join(parts)


def write_report(run_uri: str, out_uri: str | None = None) -> str:
    """Write the plots and README.md of the run at `run_uri` into `out_uri` (default
    `{run}/report`); returns `out_uri`."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError("elo-ray report draws with matplotlib: pip install 'elo-ray[report]'")
    run_uri = run_uri.rstrip("/")
    out_uri = out_uri or storage.join(run_uri, REPORT_DIR)
    run_id = run_uri.rsplit("/", 1)[-1]
    manifests = _manifests(run_uri)
    curves = training_curves(run_uri, manifests)
    results = eval_results(run_uri, manifests)
    if curves:
        storage.write_bytes(storage.join(out_uri, "loss.png"), loss_plot(curves, run_id))
    if results is not None:
        storage.write_bytes(storage.join(out_uri, "eval.png"), eval_plot(results, run_id))
    storage.write_text(storage.join(out_uri, "README.md"), markdown(run_uri, run_id, manifests, curves, results))
    return out_uri

