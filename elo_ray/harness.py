"""Downstream benchmarks in the eval stage, through lm-evaluation-harness (the `eval` extra).

`eval.tasks` names tasks or groups as lm-eval knows them (`kobest_copa`, `kmmlu`, `mmlu`,
`ja_leaderboard_jcommonsenseqa`, ...) or as task YAMLs in `eval.task_dirs` define them.
Directories in object storage are copied to the eval node first, and each directory's tasks are
loaded with it as the working directory, so `dataset_kwargs.data_files` paths in its YAMLs are
relative to it: a task and its JSONL travel together and need no dataset hub. Names are looked
up in `task_names` (seconds); lm-eval's own TaskManager (its full index: a minute or more) is
built only in the eval stage, and only when a task comes from lm-eval's own tasks.

Each model is scored as loaded for perplexity (one load per model), wrapped in lm-eval's `HFLM`,
with the run's tokenizer, on the GPU when the spec uses GPUs. Results keep every metric lm-eval
reports, named without its filter suffix (`acc`, `acc_stderr`, `acc_norm`, ...).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import tempfile
from dataclasses import dataclass, field

from elo_ray import storage, task_names

EXTRA_HINT = "pip install 'elo-ray[eval]'"
BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics (f1, mcc); means use the closed form


class HarnessError(ValueError):
    """The eval tasks cannot run as configured; says which task or directory and what to do."""


def installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def require() -> None:
    if not installed():
        raise HarnessError(f"eval.tasks needs lm-evaluation-harness, which is not installed: {EXTRA_HINT}")


def local_task_dirs(task_dirs: list[str], into: str) -> list[str]:
    """Local directories holding `task_dirs` (object-storage ones copied under `into`)."""
    out = []
    for i, uri in enumerate(task_dirs):
        if not storage.has_scheme(uri):
            path = uri.removeprefix("file://")
            if not os.path.isdir(path):
                raise HarnessError(f"eval.task_dirs: {uri} is not a directory of task YAMLs")
            out.append(os.path.abspath(path))
            continue
        fs, path = storage.filesystem(uri)
        if not storage.retrying("checking", uri, lambda: fs.isdir(path)):
            raise HarnessError(f"eval.task_dirs: {uri} does not exist or is not a directory")
        local = os.path.join(into, str(i))
        storage.retrying("downloading", uri, lambda: fs.get(path.rstrip("/") + "/", local + "/", recursive=True))
        out.append(local)
    return out


@dataclass
class TaskPlan:
    """Where each asked task is defined: a local task directory, or lm-eval's own tasks."""

    by_dir: dict[str, list[str]] = field(default_factory=dict)  # local dir -> task names
    builtin: list[str] = field(default_factory=list)  # names from lm-eval's own tasks
    managers: dict[str | None, object] = field(default_factory=dict)  # dir (None: lm-eval's) -> TaskManager


def locate(names: list[str], local_dirs: list[str]) -> TaskPlan:
    """Find every name in `local_dirs` first, then among lm-eval's own tasks (no TaskManager
    built); unknown names are an error offering the closest known ones."""
    plan = TaskPlan()
    defined = {d: task_names.defined_in(d) for d in local_dirs}
    for name in names:
        where = next((d for d in local_dirs if name in defined[d]), None)
        if where is not None:
            plan.by_dir.setdefault(where, []).append(name)
        else:
            plan.builtin.append(name)
    if plan.builtin:
        own = task_names.lm_eval_tasks_dir()
        known = task_names.defined_in(own) if own and os.path.isdir(own) else frozenset()
        unknown = [n for n in plan.builtin if n not in known]
        if unknown:
            everything = known.union(*defined.values())
            hints = []
            for n in unknown:
                close = difflib.get_close_matches(n, everything, n=3)
                hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise HarnessError(
                f"eval.tasks: unknown task(s) {', '.join(hints)}: neither in eval.task_dirs nor among "
                "lm-evaluation-harness's tasks (`lm-eval ls tasks` lists them)"
            )
    return plan


def plan_tasks(names: list[str], local_dirs: list[str]) -> TaskPlan:
    """`locate`, then lm-eval's TaskManager for each directory a task comes from (lm-eval's own
    only when one does), ready to load the tasks."""
    from lm_eval.tasks import TaskManager

    plan = locate(names, local_dirs)
    for d in plan.by_dir:
        plan.managers[d] = TaskManager(include_defaults=False, include_path=d)
    if plan.builtin:
        plan.managers[None] = TaskManager()
    return plan


def _load(plan: TaskPlan) -> list:
    """Task objects of the plan; a directory's tasks load (and read their data) inside it."""
    tasks: list = []
    for d, names in plan.by_dir.items():
        with contextlib.chdir(d):
            loaded = plan.managers[d].load(names)
        tasks += _requested(loaded, names)
    if plan.builtin:
        tasks += _requested(plan.managers[None].load(plan.builtin), plan.builtin)
    return tasks


def _requested(loaded: dict, names: list[str]) -> list:
    """The loaded objects for `names`: groups as groups (scored as a whole), tasks as tasks."""
    found = {**loaded.get("tasks", {}), **loaded.get("groups", {})}
    return [found[n] for n in names if n in found] or list(loaded.get("tasks", {}).values())


def metrics_of(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's `results` section as {task: {metric: value}}, numbers only, filter suffix
    dropped for the default filter (`acc,none` -> `acc`; `exact_match,strict` kept whole)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else key] = float(value)
        out[task] = row
    return out


def run_tasks(model, tokenizer, plan: TaskPlan, *, device: str, batch_size: int,
              num_fewshot: int | None, limit: int | None) -> dict[str, dict[str, float]]:
    """Score `model` (a loaded causal LM) on the plan's tasks; {task or group: {metric: value}}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
    out = simple_evaluate(
        model=lm, tasks=_load(plan), task_manager=plan.managers.get(None) or next(iter(plan.managers.values())),
        num_fewshot=num_fewshot, limit=limit, log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS,
    )
    return metrics_of(out["results"])


def check(names: list[str], task_dirs: list[str]) -> list[str]:
    """`validate`'s check of `eval.tasks`: the extra is installed, the task directories are
    readable, every name is defined somewhere. Problem lines."""
    if not names:
        return []
    if not installed():
        return [f"eval.tasks: lm-evaluation-harness is not installed; {EXTRA_HINT} (or remove eval.tasks)"]
    with tempfile.TemporaryDirectory(prefix="elo-ray-tasks-") as tmp:
        try:
            locate(names, local_task_dirs(task_dirs, tmp))
        except (HarnessError, storage.StorageError) as e:
            return [str(e)]
    return []
