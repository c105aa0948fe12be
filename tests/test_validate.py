"""`elo-ray validate`: each check, with its message, before any GPU is spent."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from elo_ray.memory import GPUS
from elo_ray.config import ResourcesConfig, spec_from_dict
from elo_ray.tiny import tiny_config, tiny_model
from elo_ray.validate import validate

ELO_RAY = str(Path(sys.executable).parent / "elo-ray")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer):
    """A 4-layer model with its tokenizer, and a small two-language corpus."""
    root = tmp_path_factory.mktemp("validate")
    model = tiny_model(tiny_config(num_hidden_layers=4, vocab_size=len(tiny_tokenizer)))
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    for lang, text in (("en", "A short document."), ("ko", "짧은 문서입니다.")):
        (root / f"{lang}.jsonl").write_text("\n".join(json.dumps({"text": f"{text} {i}"}) for i in range(20)) + "\n")
    return root


def raw_spec(root: Path, **changes) -> dict:
    raw = {
        "storage": {"root": str(root / "runs")},
        "model": {"base": str(root / "model")},
        "pretrain": {"layers": [0, -1], "data": {"seq_len": 16, "sources": [
            {"uri": str(root / "en.jsonl"), "language": "en"}, {"uri": str(root / "ko.jsonl"), "language": "ko"}]}},
    }
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return raw


def problems(root: Path, **changes) -> list[str]:
    return validate(spec_from_dict(raw_spec(root, **changes))).problems


def test_a_good_spec_has_no_problems(workspace):
    report = validate(spec_from_dict(raw_spec(workspace)))
    assert report.problems == [] and report.warnings == []


def test_storage_that_cannot_be_written(workspace):
    (workspace / "a-file").write_text("x")
    [line] = problems(workspace, **{"storage.root": str(workspace / "a-file" / "runs")})
    assert line.startswith(f"storage.root: cannot write to {workspace / 'a-file' / 'runs'}")


def test_storage_bucket_that_does_not_exist(workspace, s3_endpoint):
    [line] = problems(workspace, **{"storage.root": "s3://no-such-bucket-elo/runs"})
    assert line.startswith("storage.root: cannot write to s3://no-such-bucket-elo/runs")
    assert "testing" not in line  # never a credential in a message


def test_model_that_is_missing(workspace):
    [line] = problems(workspace, **{"model.base": str(workspace / "nope")})
    assert line.startswith("model.base: ") and str(workspace / "nope") in line


def test_architecture_without_decoder_layers(workspace):
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=400))
    gpt2.save_pretrained(workspace / "gpt2")
    [line] = problems(workspace, **{"model.base": str(workspace / "gpt2")})
    assert line.startswith("model.base: ") and "model.layers" in line


def test_layers_out_of_range(workspace):
    [line] = problems(workspace, **{"pretrain.layers": [0, 7]})
    assert line == "pretrain.layers: layer index 7 is out of range for a model with 4 decoder layers; use 0..3 or -4..-1"


def test_search_candidates_checked_against_the_models_depth(workspace):
    lines = problems(workspace, **{"search.candidates": [[0, -1], [0, 7], [], [1, -3]]})
    assert lines == [
        "search.candidates[1]: candidate 0,7: layer index 7 is out of range for a model with 4 decoder layers; "
        "use 0..3 or -4..-1",
        "search.candidates[2]: candidate []: layers is empty: name at least one decoder layer to detach, e.g. (0, -1)",
        "search.candidates[3]: candidate 1,-3: layer 1 is listed twice in layers=(1, -3); list each layer once",
    ]


def test_good_search_candidates_pass(workspace):
    # 0,-1 and 0,3 are the same set in a 4-layer model: the search runs it once, not a problem
    assert problems(workspace, **{"search.candidates": [[0, -1], [0, 1], [-2, -1], [0, 3]]}) == []


def test_data_source_missing_and_empty(workspace):
    (workspace / "empty").mkdir()
    sources = [{"uri": str(workspace / "missing.jsonl"), "language": "en"},
               {"uri": str(workspace / "empty" / "*.jsonl"), "language": "ko"}]
    lines = problems(workspace, **{"pretrain.data.sources": sources})
    assert len(lines) == 2
    assert lines[0].startswith(f"pretrain.data: {workspace / 'missing.jsonl'}: no such file")
    assert lines[1].startswith("pretrain.data: ") and str(workspace / "empty" / "*.jsonl") in lines[1]


def test_tokenizer_larger_than_the_models_vocabulary(workspace, tiny_tokenizer):
    small = tiny_model(tiny_config(num_hidden_layers=4, vocab_size=64))
    small.save_pretrained(workspace / "small-vocab")
    tiny_tokenizer.save_pretrained(workspace / "small-vocab")
    [line] = problems(workspace, **{"model.base": str(workspace / "small-vocab")})
    assert line == (f"model.tokenizer: {len(tiny_tokenizer)} tokens but the model's vocab_size is 64; "
                    "use the tokenizer that came with the model")


def test_gpu_memory_estimate_warns_with_numbers(workspace):
    report = validate(spec_from_dict(raw_spec(workspace, **{
        "resources": {"use_gpu": True, "num_workers": 1, "gpu_type": "L4-24GB"},
        "pretrain.data.seq_len": 200_000, "pretrain.train": {"micro_batch_size": 64}})))
    assert any(w.startswith("pretrain: estimated") and "24 GiB of an L4-24GB" in w for w in report.warnings)


def test_gpu_types_are_those_the_estimate_knows():
    assert set(typing.get_args(ResourcesConfig.model_fields["gpu_type"].annotation)) == set(GPUS)


def test_cli_exits_2_with_one_line_per_problem(workspace):
    spec = workspace / "bad.yaml"
    import yaml

    spec.write_text(yaml.safe_dump(raw_spec(workspace, **{"pretrain.layers": [0, 9], "model.instruct": None})))
    proc = subprocess.run([ELO_RAY, "validate", str(spec), "--set", "pretrain.data.seq_len=16"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "pretrain.layers: layer index 9 is out of range" in proc.stderr
    proc = subprocess.run([ELO_RAY, "validate", str(spec), "--set", "pretrain.layerz=[0]"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--set pretrain.layerz: unknown key; did you mean 'layers'?" in proc.stderr


def test_warm_start_must_hold_the_same_layers(workspace):
    from elo_ray import surgery

    elo = surgery.save_detached(str(workspace / "model"), (0, 2), str(workspace / "elo-0-2"), overwrite=True)
    assert problems(workspace, **{"pretrain.init_from": elo, "pretrain.layers": [0, 2]}) == []
    [line] = problems(workspace, **{"pretrain.init_from": elo})
    assert line.startswith(f"pretrain.init_from: {elo} holds ELO layers [0, 2], the spec detaches [0, 3]")


# --------------------------------------------------------------------------- data read before any GPU


def one_source(workspace: Path, name: str, lines: list[str], **source) -> list[str]:
    """validate's problems when English is the file `name` holding `lines`."""
    path = workspace / name
    path.write_text("\n".join(lines) + "\n")
    return problems(workspace, **{"pretrain.data.sources": [
        {"uri": str(path), "language": "en", **source}, {"uri": str(workspace / "ko.jsonl"), "language": "ko"}]})


def test_records_without_the_text_field_name_the_keys_they_have(workspace):
    lines = [json.dumps({"id": i, "body": f"A document {i}."}) for i in range(30)]
    [line] = one_source(workspace, "body.jsonl", lines)
    assert line == (f"pretrain.data: {workspace / 'body.jsonl'}: records have keys ['body', 'id'], not 'text' "
                    "(first 30 records); set text_field: body")
    assert one_source(workspace, "body.jsonl", lines, text_field="body") == []


def test_malformed_first_json_line_is_named_with_its_line(workspace):
    lines = ['{"text": "cut off'] + [json.dumps({"text": f"A document {i}."}) for i in range(5)]
    [line] = one_source(workspace, "cut.jsonl", lines)
    assert line == (f"pretrain.data: {workspace / 'cut.jsonl'}:1: malformed JSON line (Unterminated string starting "
                    "at); fix or remove the line, or set on_bad_record: skip to skip and count such lines")
    assert problems(workspace, **{"pretrain.data.on_bad_record": "skip", "pretrain.data.sources": [
        {"uri": str(workspace / "cut.jsonl"), "language": "en"}]}) == []


def test_parquet_file_in_a_jsonl_source_is_named(workspace):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (workspace / "mixed").mkdir()
    (workspace / "mixed" / "a.jsonl").write_text(json.dumps({"text": "A document."}) + "\n")
    pq.write_table(pa.table({"text": ["A document."]}), workspace / "mixed" / "b.jsonl")
    [line] = problems(workspace, **{"pretrain.data.sources": [{"uri": str(workspace / "mixed"), "language": "en"}]})
    assert line == (f"pretrain.data: {workspace / 'mixed' / 'b.jsonl'}: is a parquet file, but the source's format "
                    "is jsonl; set format: parquet")


def test_seq_len_beyond_the_models_positions(workspace):
    [line] = problems(workspace, **{"pretrain.data.seq_len": 10_000_000})
    assert line == ("pretrain.data: seq_len: 10000000 tokens is more than the model takes "
                    "(max_position_embeddings: 256); set seq_len to at most 256")
    assert problems(workspace, **{"pretrain.data.seq_len": 256}) == []


def test_records_without_the_text_field_on_s3_are_named(workspace, s3_bucket):
    from elo_ray import storage

    storage.write_text(f"{s3_bucket}/corpus/en.jsonl", "".join(json.dumps({"body": f"Doc {i}."}) + "\n" for i in range(9)))
    [line] = problems(workspace, **{"pretrain.data.sources": [{"uri": f"{s3_bucket}/corpus/", "language": "en"}]})
    assert line == (f"pretrain.data: {s3_bucket}/corpus/en.jsonl: records have keys ['body'], not 'text' "
                    "(first 9 records); set text_field: body")


def test_chat_vector_skip_pattern_that_matches_no_tensor(workspace):
    changes = {"model.instruct": str(workspace / "model"), "instruct.sft_enabled": False}
    [line] = problems(workspace, **changes, **{"instruct.chat_vector.skip": ["lm_head.*", "embed_tokens"]})
    assert line == (
        f"instruct.chat_vector.skip: skip pattern 'embed_tokens' matches no tensor of {workspace / 'model'} or "
        f"{workspace / 'model'}: a pattern must match whole tensor names (fnmatch); tensors named like it: "
        "model.embed_tokens.weight; write 'model.embed_tokens.*'"
    )
    assert problems(workspace, **changes, **{"instruct.chat_vector.skip": ["lm_head.*", "model.embed_tokens.*"]}) == []


def test_cli_checks_the_spec_against_a_cluster_file(workspace, capsys):
    """`--cluster`: the spec's resources against what the file offers, memory on the file's GPU."""
    import yaml

    from elo_ray import cli

    root = Path(__file__).resolve().parents[1]
    p4d = str(root / "cluster" / "aws-p4d-a100.yaml")
    spec = workspace / "cluster-check.yaml"
    spec.write_text(yaml.safe_dump(raw_spec(workspace, **{
        "resources": {"use_gpu": True, "num_workers": 32},
        "pretrain.train": {"micro_batch_size": 1_000_000}})))
    assert cli.main(["validate", str(spec), "--cluster", p4d]) == 0
    out, err = capsys.readouterr()
    assert out == f"{spec}: valid (checked against {p4d})\n"
    warnings = err.splitlines()
    assert warnings[0] == (f"warning: resources.num_workers is 32 but {p4d} offers at most 16 GPUs "
                           "(gpu: 2 nodes x 8 GPUs); lower num_workers to 16 or let the cluster grow to 4 nodes of 8 GPUs")
    assert warnings[1].startswith("warning: pretrain: estimated ") and "of an A100-40GB" in warnings[1]

    assert cli.main(["validate", str(spec), "--cluster", str(workspace / "no-cluster.yaml")]) == 2
    assert f"--cluster {workspace / 'no-cluster.yaml'}: " in capsys.readouterr().err


def test_eval_tasks_found_in_task_dirs_and_unknown_ones_named(workspace):
    pytest.importorskip("lm_eval")
    tasks = {"eval.tasks": ["elo_mc_en", "elo_mc_ko"], "eval.task_dirs": ["builtin:tasks"]}
    assert problems(workspace, **tasks) == []
    # a name in neither place: looked up among lm-eval's own tasks' names, then the close names offered
    [line] = problems(workspace, **{**tasks, "eval.tasks": ["elo_mc_kr"]})
    assert line.startswith("eval.tasks: unknown task(s) 'elo_mc_kr' (did you mean elo_mc_ko")
    assert line.endswith("neither in eval.task_dirs nor among lm-evaluation-harness's tasks (`lm-eval ls tasks` lists them)")


def test_tracking_backend_without_its_package_names_the_extra(workspace, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert problems(workspace, **{"tracking.mlflow": {"experiment": "ko"}}) == [
        "tracking.mlflow: the mlflow package is not installed; pip install 'elo-ray[mlflow]' (or remove tracking.mlflow)"]
