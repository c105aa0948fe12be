"""The eval stage's measurements: held-out perplexity per language (the user's evidence that
the target language improved and English held) and downstream task scores (`harness.py`),
for the base model and each stage's output, in one table per run.

Each held-out document (token ids, EOS-terminated) is scored in windows of the model's
context; perplexity is exp(total NLL / predicted tokens) over all documents of a language.
"""

from __future__ import annotations

import math
import tempfile

import torch

from elo_ray import storage


@torch.no_grad()
def perplexity(model, heldout: dict[str, list[list[int]]], max_len: int, device: str = "cpu") -> dict[str, float]:
    """Perplexity per language of `model` (a causal LM) on `heldout` token documents."""
    model.eval().to(device)
    out = {}
    for lang, docs in sorted(heldout.items()):
        nll, count = 0.0, 0
        for doc in docs:
            for start in range(0, max(len(doc) - 1, 1), max_len):
                window = doc[start : start + max_len + 1]
                if len(window) < 2:
                    continue
                ids = torch.tensor([window[:-1]], device=device)
                labels = torch.tensor([window[1:]], device=device)
                logits = model(input_ids=ids, use_cache=False).logits.float()
                nll += torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum").item()
                count += labels.numel()
        if count == 0:
            raise ValueError(f"held-out set for {lang!r} has no tokens to score")
        out[lang] = math.exp(nll / count)
    return out


def score_models(models: dict[str, str], heldout: dict[str, list[list[int]]], tokenizer_uri: str, cfg,
                 use_gpu: bool) -> dict[str, dict]:
    """{model: {"perplexity": {lang: ppl}, "tasks": {task: {metric: value}}}} for each model
    location in `models`, loaded once each; `cfg` is the spec's EvalStage. Runs where it is
    called (the eval stage's Ray task: on a GPU when the spec uses GPUs)."""
    import transformers

    from elo_ray import harness

    device = "cuda" if use_gpu else "cpu"
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="elo-ray-eval-") as tmp:
        plan = tokenizer = None
        if cfg.tasks:
            from elo_ray.data.tokens import load_tokenizer

            harness.require()
            plan = harness.plan_tasks(cfg.tasks, harness.local_task_dirs(cfg.task_dirs, f"{tmp}/tasks"))
            tokenizer = load_tokenizer(tokenizer_uri)
        for name, uri in models.items():
            with tempfile.TemporaryDirectory(dir=tmp) as model_dir:
                local = uri if not storage.has_scheme(uri) else storage.download(uri, model_dir)
                model = transformers.AutoModelForCausalLM.from_pretrained(local)
            max_len = min(1024, model.config.max_position_embeddings)
            row = {"perplexity": perplexity(model, heldout, max_len=max_len, device=device), "tasks": {}}
            if plan is not None:
                row["tasks"] = harness.run_tasks(model, tokenizer, plan, device=device, batch_size=cfg.batch_size,
                                                 num_fewshot=cfg.num_fewshot, limit=cfg.limit)
            results[name] = row
            del model
    return results


RESULTS_FILE = "results.json"  # {model: {"perplexity": {lang: ppl}, "tasks": {task: {metric: value}}}}
PRIMARY_METRICS = ("acc", "exact_match", "f1", "mcc", "bleu")  # the column a task gets in the table


def primary_metric(metrics: dict[str, float]) -> str | None:
    """The metric a task is shown by: the first of PRIMARY_METRICS it has, else its first one."""
    names = [k for k in metrics if not k.endswith("_stderr")]
    return next((m for m in PRIMARY_METRICS if m in names), names[0] if names else None)


def task_columns(results: dict[str, dict]) -> list[tuple[str, str]]:
    """(task, metric) columns of a results table, tasks in the order first seen."""
    columns: dict[str, str] = {}
    for row in results.values():
        for task, metrics in row.get("tasks", {}).items():
            metric = primary_metric(metrics)
            if task not in columns and metric is not None:
                columns[task] = metric
    return list(columns.items())


def task_score(row: dict, task: str, metric: str) -> float | None:
    return row.get("tasks", {}).get(task, {}).get(metric)


def format_table(results: dict[str, dict]) -> str:
    """A markdown table: one row per model; a perplexity column per language, then a score
    column per task (its primary metric)."""
    langs = sorted({lang for r in results.values() for lang in r.get("perplexity", {})})
    tasks = task_columns(results)
    header = [f"ppl {lang}" for lang in langs] + [f"{metric} {task}" for task, metric in tasks]
    lines = ["| model | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for name, r in results.items():
        ppl = r.get("perplexity", {})
        cells = [f"{ppl[lang]:.2f}" if lang in ppl else "-" for lang in langs]
        for task, metric in tasks:
            v = task_score(r, task, metric)
            cells.append("-" if v is None else f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
