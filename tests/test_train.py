"""The training stage end to end: `run_training` on a real local Ray (2 CPU workers, FSDP2 over
gloo), tiny models, local storage and moto's S3 endpoint. Each fit costs ~10-15 s, so one ELO
run is shared by the tests that only read what it produced."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import ray.cloudpickle
import torch
import transformers
from safetensors.torch import load_file

from elo_ray import storage, surgery
from elo_ray.config import ResourcesConfig, TrainConfig
from elo_ray.tiny import tiny_config, tiny_model
from elo_ray.train import CheckpointMismatchError, DivergedError, TrainingError, run_training
from elo_ray.train.synthetic import RowsReader, learnable_rows, rows_plan

# Workers unpickle the test's reader subclass by value: tests/ is not on their sys.path.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

VOCAB, SEQ, STEPS = 320, 32, 12
ELO_TRAIN = dict(method="elo", lr=1e-2, warmup_steps=2, max_steps=STEPS, micro_batch_size=2,
                 checkpoint_every=4, log_every=2, seed=0)
WORKERS = ResourcesConfig(num_workers=2, cpus_per_worker=0.5, max_failures=1)


def tensors(uri: str) -> dict[str, torch.Tensor]:
    """All tensors of an exported checkpoint (local path or URI)."""
    local = uri
    if storage.has_scheme(uri):
        local = storage.download(uri, os.path.join("/tmp", "elo-ray-test-" + uri.replace("/", "_")))
    out = {}
    for name in sorted(os.listdir(local)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(local, name)))
    return out


def checkpoint_keys(checkpoint_dir: str) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return sorted(FileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    """A 4-layer base model with a tokenizer, and its ELO model (layers 0 and 3 detached)."""
    root = tmp_path_factory.mktemp("models")
    # initializer_range 0.2: a head strong enough that training two layers visibly lowers the loss
    base = tiny_model(tiny_config(num_hidden_layers=4, vocab_size=VOCAB, initializer_range=0.2), seed=1)
    base.save_pretrained(root / "base")
    tiny_tokenizer.save_pretrained(root / "base")
    surgery.save_detached(str(root / "base"), [0, -1], str(root / "elo"))  # as the pretrain stage does
    return {"base": str(root / "base"), "elo": str(root / "elo"), "root": root}


def train(models, name, storage_uri, output_uri, *, model="elo", reader=None, resources=WORKERS, **overrides):
    plan = rows_plan(learnable_rows(STEPS * 2 * 2, SEQ, VOCAB))
    if reader is not None:
        plan.reader = reader
    return run_training(
        name=name, model_uri=models[model], output_uri=output_uri, storage_uri=storage_uri,
        train=TrainConfig(**{**ELO_TRAIN, **overrides}), resources=resources, plan=plan, seq_len=SEQ,
    )


@pytest.fixture(scope="module")
def elo_run(ray_local, models):
    """ELO pretraining, uninterrupted, on local storage: 12 steps, checkpoints every 4."""
    runs, out = models["root"] / "runs", models["root"] / "elo-out"
    result = train(models, "elo", str(runs), str(out))
    return {"result": result, "runs": runs, "out": str(out)}


# --------------------------------------------------------------------------- ELO pretraining


def test_elo_loss_decreases_on_a_learnable_stream(elo_run):
    records = [json.loads(line) for line in open(elo_run["result"].metrics_uri)]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0


def test_elo_trains_only_the_detached_layers(elo_run, models):
    before, after = tensors(models["elo"]), tensors(elo_run["out"])
    assert sorted(after) == sorted(before)
    for name in before:
        if name.startswith("model.layers."):
            assert not torch.equal(after[name], before[name]), f"{name} did not train"
        else:  # embedding, final norm, head: frozen copies of the base
            assert torch.equal(after[name], before[name]), f"{name} changed"


def test_elo_checkpoint_holds_state_of_the_layers_only(elo_run):
    ckpt = elo_run["runs"] / "elo" / f"checkpoint_{STEPS:08d}"
    keys = checkpoint_keys(str(ckpt))
    assert any(k.startswith("optim.state.model.layers.") for k in keys)
    frozen = ("embed_tokens", "model.norm", "lm_head")
    assert [k for k in keys if any(f in k for f in frozen)] == []
    assert sorted(os.listdir(elo_run["runs"] / "elo")) == [
        ".validate_storage_marker", "checkpoint_00000008", "checkpoint_00000012",
        "checkpoint_manager_snapshot.json", "metrics.jsonl",
    ]


def test_elo_export_loads_with_from_pretrained_and_keeps_elo_layers_and_tokenizer(elo_run, models):
    model = transformers.AutoModelForCausalLM.from_pretrained(elo_run["out"])
    assert model.config.elo_layers == [0, 3] and model.config.num_hidden_layers == 2
    tok = transformers.AutoTokenizer.from_pretrained(elo_run["out"])
    assert tok("빠른 갈색 여우").input_ids == transformers.AutoTokenizer.from_pretrained(models["elo"])("빠른 갈색 여우").input_ids
    ids = torch.tensor([list(range(10, 26))])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_elo_metrics_report_loss_lr_throughput_and_memory(elo_run):
    m = elo_run["result"].metrics
    assert elo_run["result"].steps == STEPS and elo_run["result"].resumed_from_step == 0
    assert m["tokens_total"] == STEPS * 2 * 2 * SEQ == m["tokens_en"]
    assert m["tokens_per_s"] > 0 and m["tflops_per_worker"] > 0 and m["peak_memory_gb"] > 0
    assert m["mfu"] is None  # CPUs have no known peak
    assert 0 < m["lr"] < 1e-2 and m["grad_norm"] > 0
    assert 0 <= m["data_wait_s"] < m["interval_s"] and m["worker_cpu_s"] > 0


def test_exported_elo_model_merges_back_into_the_base(elo_run, models, tmp_path):
    merged = surgery.merge(models["base"], elo_run["out"], str(tmp_path / "merged"))
    got, base, elo = tensors(merged), tensors(models["base"]), tensors(elo_run["out"])
    for name, t in got.items():
        if name.startswith("model.layers.0."):
            assert torch.equal(t, elo[name])
        elif name.startswith("model.layers.3."):
            assert torch.equal(t, elo[name.replace("layers.3.", "layers.1.")])
        else:
            assert torch.equal(t, base[name]), name


# --------------------------------------------------------------------------- failures and resume


class DyingReader(RowsReader):
    """Kills worker rank 1 (os._exit) when it reaches micro-batch `die_at`, once per marker.

    It waits a moment first: Ray Train's controller registers a reported checkpoint when it next
    polls the workers, and a worker that dies within that poll loses the report."""

    def __init__(self, inner: RowsReader, die_at: int, marker: str):
        super().__init__(inner.num_rows, inner.seq_len, inner.dataset)
        self.die_at, self.marker = die_at, marker

    def batches(self, micro_batch_size, skip=0, start=None):
        rank = ray.train.get_context().get_world_rank()
        for i, b in enumerate(super().batches(micro_batch_size, skip, start), start=skip):
            if i == self.die_at and rank == 1 and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                time.sleep(2)
                os._exit(1)
            yield b


def test_worker_killed_mid_run_resumes_on_s3_to_the_same_weights(elo_run, models, s3_bucket, tmp_path):
    marker = str(tmp_path / "died")
    inner = rows_plan(learnable_rows(STEPS * 2 * 2, SEQ, VOCAB)).reader
    out = f"{s3_bucket}/elo-out"
    result = train(models, "elo", f"{s3_bucket}/runs", out, reader=DyingReader(inner, die_at=5, marker=marker))
    assert os.path.exists(marker), "the worker was not killed"
    assert result.resumed_from_step == 4 and result.steps == STEPS
    assert result.checkpoint_uri == f"{s3_bucket}/runs/elo/checkpoint_{STEPS:08d}"
    resumed, uninterrupted = tensors(out), tensors(elo_run["out"])
    assert sorted(resumed) == sorted(uninterrupted)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    lines = storage.read_text(f"{s3_bucket}/runs/elo/metrics.jsonl").splitlines()
    assert len(lines) == STEPS // 2
    assert transformers.AutoConfig.from_pretrained(storage.download(out, str(tmp_path / "dl"))).elo_layers == [0, 3]


class StoppingReader(RowsReader):
    """Stops a fresh stream at micro-batch `stop_at` on every rank (a `TrainingError`, as a lost
    node ends a run); a stream resumed on another number of workers (`start` given) runs on."""

    def __init__(self, inner: RowsReader, stop_at: int):
        super().__init__(inner.num_rows, inner.seq_len, inner.dataset)
        self.stop_at = stop_at

    def batches(self, micro_batch_size, skip=0, start=None):
        for i, b in enumerate(super().batches(micro_batch_size, skip, start), start=skip):
            if i == self.stop_at and not start:
                raise TrainingError("a node was lost")
            yield b


def assert_trained_as_uninterrupted(result, out, elo_run) -> None:
    """A resumed run's tokens, losses and learning rates at every logged step, and its exported
    weights, are the uninterrupted run's (fp32 tolerance)."""
    assert result.metrics["tokens_total"] == elo_run["result"].metrics["tokens_total"] == STEPS * 4 * SEQ
    resumed = [json.loads(line) for line in open(result.metrics_uri)]
    whole = [json.loads(line) for line in open(elo_run["result"].metrics_uri)]
    assert [m["step"] for m in resumed] == [m["step"] for m in whole] == list(range(2, STEPS + 1, 2))
    for r, w in zip(resumed, whole):
        assert r["loss"] == pytest.approx(w["loss"], rel=1e-5) and r["lr"] == pytest.approx(w["lr"], rel=1e-6)
    after, uninterrupted = tensors(str(out)), tensors(elo_run["out"])
    assert sorted(after) == sorted(uninterrupted)
    for name in uninterrupted:
        torch.testing.assert_close(after[name], uninterrupted[name], rtol=0, atol=1e-5, msg=name)


def test_run_stopped_on_two_workers_resumes_on_one_to_the_same_weights(elo_run, models, tmp_path):
    """The step-4 checkpoint of 2 workers, resumed on 1: DCP reshards it, the global batch of 4
    sequences becomes micro-batch 2 x accumulation 2, and the exact stream continues at row 16, so
    losses and weights are the uninterrupted 2-worker run's (fp32 tolerance)."""
    inner = rows_plan(learnable_rows(STEPS * 2 * 2, SEQ, VOCAB)).reader
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match="a node was lost"):
        train(models, "elo", str(tmp_path), str(out), reader=StoppingReader(inner, stop_at=5))
    assert not out.exists()

    one = ResourcesConfig(num_workers=1, cpus_per_worker=0.5, max_failures=0)
    result = train(models, "elo", str(tmp_path), str(out), reader=StoppingReader(inner, stop_at=5), resources=one)
    assert result.resumed_from_step == 4 and result.steps == STEPS
    assert result.metrics["resumed"] == [{
        "from_step": 4, "old_world": 2, "new_world": 1, "micro_batch_size": 2, "grad_accum": 2,
        "sequences_trained": {"en": 16}, "max_sequences_repeated_or_skipped": 0,
    }]
    assert_trained_as_uninterrupted(result, out, elo_run)


def test_run_stopped_resumes_with_other_performance_settings_and_split_to_the_same_weights(elo_run, models, tmp_path):
    """What a user does after an out-of-memory stop: the step-4 checkpoint (micro-batches of 2),
    resumed on the same workers with activation checkpointing, CPU offload, the plain loss, sharded
    frozen parameters and each step's 2 sequences per worker as 1 x accumulation 2: the stream is
    replayed exactly, so losses and weights are the uninterrupted run's (fp32 tolerance)."""
    inner = rows_plan(learnable_rows(STEPS * 2 * 2, SEQ, VOCAB)).reader
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match="a node was lost"):
        train(models, "elo", str(tmp_path), str(out), reader=StoppingReader(inner, stop_at=5))
    smaller = dict(micro_batch_size=1, grad_accum=2, activation_checkpointing=True, offload_to_cpu=True, loss="plain",
                   frozen_params="shard", checkpoint_every=3)
    result = train(models, "elo", str(tmp_path), str(out), reader=StoppingReader(inner, stop_at=5), **smaller)
    assert result.resumed_from_step == 4 and result.steps == STEPS
    assert result.metrics["resumed"] == [{
        "from_step": 4, "old_world": 2, "new_world": 2, "micro_batch_size": 1, "grad_accum": 2,
        "was": {"micro_batch_size": 2, "grad_accum": 1}, "max_sequences_repeated_or_skipped": 0,
    }]
    assert_trained_as_uninterrupted(result, out, elo_run)


def test_resume_with_another_model_names_the_mismatch(elo_run, models, tmp_path):
    config = tiny_config(num_hidden_layers=2, vocab_size=VOCAB, intermediate_size=48)
    config.elo_layers = [0, 2]
    tiny_model(config).save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointMismatchError) as e:
        run_training(
            name="elo", model_uri=str(tmp_path / "other"), output_uri=str(tmp_path / "out"),
            storage_uri=str(elo_run["runs"]), train=TrainConfig(**ELO_TRAIN), resources=WORKERS,
            plan=rows_plan(learnable_rows(STEPS * 2 * 2, SEQ, VOCAB)), seq_len=SEQ,
        )
    message = str(e.value)
    assert f"checkpoint_{STEPS:08d}" in message and "does not match the model" in message
    assert "elo_layers: checkpoint [0, 3], model [0, 2]" in message
    assert "model.layers.0.mlp.gate_proj.weight: checkpoint shape [64, 32], model shape [48, 32]" in message
    assert not (tmp_path / "out").exists()
    assert len(open(elo_run["result"].metrics_uri).readlines()) == STEPS // 2  # the run's record is kept


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(ray_local, models, tmp_path):
    with pytest.raises(DivergedError) as e:
        train(models, "nan", str(tmp_path), str(tmp_path / "out"), model="base", method="full", lr=1e30,
              warmup_steps=0, checkpoint_every=1, log_every=1)
    assert e.value.step == 2
    assert "training diverged at step 2: loss nan" in str(e.value)
    assert "the last good checkpoint is step 1" in str(e.value)
    assert sorted(n for n in os.listdir(tmp_path / "nan") if n.startswith("checkpoint_0")) == ["checkpoint_00000001"]
    assert [json.loads(line)["step"] for line in open(tmp_path / "nan" / "metrics.jsonl")] == [1]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- baselines


def test_full_fine_tuning_trains_every_parameter(ray_local, models, tmp_path):
    result = train(models, "full", str(tmp_path), str(tmp_path / "out"), model="base", method="full", lr=3e-3,
                   max_steps=4, grad_accum=2, activation_checkpointing=True)
    before, after = tensors(models["base"]), tensors(str(tmp_path / "out"))
    assert sorted(after) == sorted(before)
    assert [n for n in before if torch.equal(after[n], before[n])] == []
    assert result.steps == 4 and result.metrics["tokens_total"] == 4 * 2 * 2 * 2 * SEQ


def test_lora_trains_adapters_and_exports_them_merged(ray_local, models, tmp_path):
    result = train(models, "lora", str(tmp_path), str(tmp_path / "out"), model="base", method="lora", lr=1e-2,
                   max_steps=4)
    before, after = tensors(models["base"]), tensors(str(tmp_path / "out"))
    assert sorted(after) == sorted(before)  # merged: no adapter tensors left
    linear = ("_proj.weight",)
    for name in before:
        changed = not torch.equal(after[name], before[name])
        assert changed == name.endswith(linear), name
    keys = checkpoint_keys(str(tmp_path / "lora" / "checkpoint_00000004"))
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys if k.startswith(("model.", "optim.state.")))
    assert result.steps == 4


# --------------------------------------------------------------------------- with the data plane


def test_elo_trains_on_the_data_planes_mixed_stream(ray_local, models, tiny_tokenizer, tmp_path):
    from elo_ray import data
    from elo_ray.config import DataConfig, SourceConfig

    words = {"en": "The quick brown fox jumps over the lazy dog .".split(),
             "ko": "빠른 갈색 여우가 게으른 개를 뛰어넘는다 .".split()}
    sources = []
    for lang, n in (("en", 30), ("ko", 300)):
        path = tmp_path / f"{lang}.jsonl"
        path.write_text("".join(json.dumps({"text": " ".join(words[lang][i % 5:] + words[lang])}, ensure_ascii=False)
                                + "\n" for i in range(n)), encoding="utf-8")
        sources.append(SourceConfig(uri=str(path), language=lang))
    cfg = DataConfig(sources=sources, seq_len=SEQ, heldout_docs=2, max_tokens=SEQ * 2 * 2 * 10)
    plan = data.plan_pretrain_stream(cfg, tiny_tokenizer, world_size=2)
    result = run_training(
        name="data-plane", model_uri=models["elo"], output_uri=str(tmp_path / "out"), storage_uri=str(tmp_path),
        train=TrainConfig(**{**ELO_TRAIN, "max_steps": None, "log_every": 5, "checkpoint_every": 5}),
        resources=WORKERS, plan=plan, seq_len=SEQ,
    )
    m = result.metrics
    assert result.steps == plan.reader.totals()["sequences"] // (2 * 2) == 10  # the schedule comes from the plan
    assert m["tokens_total"] == result.steps * 2 * 2 * SEQ
    assert 0.05 < m["tokens_en"] / (m["tokens_en"] + m["tokens_ko"]) < 0.15  # English:target 1:9
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.elo_layers == [0, 3]
