"""Downstream tasks through lm-evaluation-harness: the bundled bilingual task loads from its
directory (local or S3) without any dataset hub, its accuracy is the share of questions whose
answer gets the highest log-likelihood under the model, and results keep lm-eval's metrics."""

from __future__ import annotations

import json

import pytest
import torch

from elo_ray import builtin, harness, storage
from elo_ray.tiny import tiny_config, tiny_model

pytest.importorskip("lm_eval")
LIMIT = 8


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return tiny_model(tiny_config(vocab_size=len(tiny_tokenizer)), seed=3), tiny_tokenizer


def expected_accuracy(model, tok, lang: str, limit: int) -> float:
    """The same questions scored by hand: sum of log-probabilities of each choice's tokens
    after the prompt, right when the answer's is the largest."""
    prompt = {"en": "Question: {}\nAnswer:", "ko": "질문: {}\n답:"}[lang]
    rows = [json.loads(line) for line in (builtin.TASKS_DIR / "elo_mc" / f"{lang}.jsonl").read_text().splitlines()]
    right = 0
    with torch.no_grad():
        for row in rows[:limit]:
            context = prompt.format(row["question"])
            scores = []
            for choice in row["choices"]:
                ctx = tok(context).input_ids
                whole = tok(context + " " + choice).input_ids
                logits = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
                scores.append(sum(logits[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
            right += max(range(4), key=scores.__getitem__) == row["answer"]
    return right / limit


def test_bundled_tasks_score_accuracy_as_the_models_own_likelihoods_say(lm):
    model, tok = lm
    plan = harness.plan_tasks(["elo_mc_en", "elo_mc_ko"], [str(builtin.TASKS_DIR)])
    assert plan.builtin == [] and None not in plan.managers  # lm-eval's own index was never read
    got = harness.run_tasks(model, tok, plan, device="cpu", batch_size=4, num_fewshot=None, limit=LIMIT)
    assert sorted(got) == ["elo_mc_en", "elo_mc_ko"]
    for lang in ("en", "ko"):
        assert got[f"elo_mc_{lang}"]["acc"] == pytest.approx(expected_accuracy(model, tok, lang, LIMIT))
        assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(got[f"elo_mc_{lang}"])


def test_task_directory_in_object_storage_is_fetched_to_the_node(lm, s3_bucket, tmp_path):
    model, tok = lm
    storage.upload(str(builtin.TASKS_DIR), f"{s3_bucket}/tasks")
    dirs = harness.local_task_dirs([f"{s3_bucket}/tasks"], str(tmp_path))
    fetched = sorted(p.name for p in (tmp_path / "0" / "elo_mc").iterdir())
    assert fetched == ["elo_mc_en.yaml", "elo_mc_ko.yaml", "en.jsonl", "ko.jsonl"]
    got = harness.run_tasks(model, tok, harness.plan_tasks(["elo_mc_ko"], dirs), device="cpu", batch_size=4,
                            num_fewshot=None, limit=LIMIT)
    assert got["elo_mc_ko"]["acc"] == pytest.approx(expected_accuracy(model, tok, "ko", LIMIT))


def test_missing_task_directory_is_named(s3_bucket, tmp_path):
    with pytest.raises(harness.HarnessError, match=f"eval.task_dirs: {s3_bucket}/nope does not exist"):
        harness.local_task_dirs([f"{s3_bucket}/nope"], str(tmp_path))


def test_metrics_drop_the_default_filter_suffix_and_non_numbers():
    results = {"kobest_copa": {"alias": "kobest_copa", "acc,none": 0.5, "acc_stderr,none": 0.02, "f1,none": 0.4,
                               "f1_stderr,none": "N/A", "sample_len": 1000},
               "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5}}
    assert harness.metrics_of(results) == {
        "kobest_copa": {"acc": 0.5, "acc_stderr": 0.02, "f1": 0.4},
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5},
    }


def test_validate_names_the_extra_when_lm_eval_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert harness.check(["kobest_copa"], []) == [
        "eval.tasks: lm-evaluation-harness is not installed; pip install 'elo-ray[eval]' (or remove eval.tasks)"]


TASK_FILES = {  # the forms lm-eval's own task YAMLs use to name things
    "plain/qa.yaml": "task: qa_en  # a comment\ntag:\n  - qa_all\n  - 'qa_en_tag'\ndataset_path: json\n",
    "plain/qa_ko.yaml": "tag: [qa_all, qa_ko_tag]\ntask: \"qa_ko\"\ndoc_to_text: !function utils.doc_to_text\n",
    "quoted/_template_yaml": '"tag": "from_template"\n"output_type": "multiple_choice"\n',
    "quoted/one.yaml": '"include": "_template_yaml"\n"task": "quoted_one"\n"fewshot_split": !!null "null"\n',
    "quoted/deeper/two.yaml": "include: ../_template_yaml\ntask: quoted_two\ntag: null\n",
    "groups/g.yaml": "group: my_group\ntask:\n  - qa_en\n  - task: inline_only\n    dataset_path: json\n",
    "groups/py.yaml": "class: !function utils.MyTask\ntask: py_task\ntag: py_tag\n",
    "groups/not_a_task.yaml": "tag: lonely_tag\noutput_type: generate_until\n",
    "groups/a_list.yaml": "- task: listed\n",
    "__pycache__/hidden.yaml": "task: hidden\n",
}


def test_task_names_are_the_names_lm_evals_task_manager_finds(tmp_path):
    from lm_eval.tasks import TaskManager

    from elo_ray import task_names

    for rel, text in TASK_FILES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    expected = {"qa_en", "qa_ko", "qa_all", "qa_en_tag", "qa_ko_tag", "quoted_one", "quoted_two", "from_template",
                "my_group", "py_task", "py_tag"}
    assert set(TaskManager(include_defaults=False, include_path=str(tmp_path)).all_tasks) == expected
    assert task_names.defined_in(tmp_path) == expected


def test_unknown_task_is_found_unknown_without_lm_evals_task_manager(monkeypatch):
    import lm_eval.tasks

    def no_index(*a, **k):
        raise AssertionError("TaskManager built")

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", no_index)
    plan = harness.locate(["elo_mc_en", "kobest_copa"], [str(builtin.TASKS_DIR)])
    assert plan.by_dir == {str(builtin.TASKS_DIR): ["elo_mc_en"]} and plan.builtin == ["kobest_copa"]
    with pytest.raises(harness.HarnessError, match=r"unknown task\(s\) 'kobest_cpoa' \(did you mean kobest_copa"):
        harness.locate(["kobest_cpoa"], [])
