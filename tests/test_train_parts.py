"""The training engine's parts without Ray: schedule, FLOP counts, model building on a one-rank
gloo group, the streamed safetensors export, LoRA merging, and the checks that run before training."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from elo_ray.config import ResourcesConfig, TrainConfig
from elo_ray.tiny import tiny_config, tiny_model
from elo_ray.train import TrainingError, run_training
from elo_ray.train import checkpoint, export, metrics
from elo_ray.train import model as model_lib
from elo_ray.train.optim import lr_factor
from elo_ray.train.state import DataPosition, TrainState
from elo_ray.train.step import check_batches
from elo_ray.train.synthetic import RowsReader


def elo_config(**kw):
    config = tiny_config(num_hidden_layers=2, **kw)
    config.elo_layers = [0, 3]
    return config


def saved(config, path, dtype=None) -> str:
    model = tiny_model(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return str(path)


def full_state(module) -> dict[str, torch.Tensor]:
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone() for n, t in module.state_dict().items()}


# --------------------------------------------------------------------------- schedule and FLOPs


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    f = [lr_factor(s, warmup_steps=4, total_steps=14, min_lr_ratio=0.1) for s in range(16)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[14] == pytest.approx(0.1) and f[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_flops_per_token_count_only_what_each_method_computes():
    c = elo_config()  # d=32, 4 heads of 8 (2 kv), ff=64, V=256, 2 layers
    p = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64  # q,o + k,v + gate,up,down
    assert metrics.layer_matmul_params(c) == p
    attention = 4 * 16 * 4 * 8
    head = 2 * 32 * 256
    assert metrics.train_flops_per_token(c, "elo", 16) == 2 * (6 * p + 3 * attention) + 2 * head
    assert metrics.train_flops_per_token(c, "full", 16) == 2 * (6 * p + 3 * attention) + 3 * head
    lora = 4 * (32 + 32) * 2 + 4 * (32 + 16) * 2 + 4 * (32 + 64) * 2 + 4 * (64 + 32)
    assert metrics.lora_params_per_layer(c, 4) == lora
    assert metrics.train_flops_per_token(c, "lora", 16, 4) == 2 * (4 * p + 3 * attention + 6 * lora) + 2 * head


def test_elo_costs_a_fraction_of_full_on_a_llama_8b_shape():
    llama8b = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256,
    )
    elo = transformers.LlamaConfig(**{**llama8b.to_dict(), "num_hidden_layers": 2})
    full = metrics.train_flops_per_token(llama8b, "full", 2048)
    # 6N over every matrix that is multiplied (layers 6.98B + head 0.525B) + 12 L S d attention
    assert full == pytest.approx(6 * (6.98e9 + 0.525e9) + 12 * 32 * 2048 * 4096, rel=0.01)
    ratio = full / metrics.train_flops_per_token(elo, "elo", 2048)
    assert 9 < ratio < 11


METRICS = {"step": 20, "loss": 2.5, "lr": 5e-6, "grad_norm": 0.8, "tokens_per_s": 12345.6, "tflops_per_worker": 412.0,
           "mfu": 0.4166, "peak_memory_gb": 61.2, "interval_s": 10.0, "data_wait_s": 0.3, "resumed_from_step": 0}


def test_progress_line_shows_steps_loss_throughput_and_time_left_at_the_measured_rate():
    progress = metrics.Progress(100)
    # 20 steps in the first 10 s: 80 left at 0.5 s each.
    assert progress.line(METRICS, now=1000.0) == "step 20/100 (20%) loss 2.5000 12,346 tok/s ETA 40s"
    # A checkpoint took 5 s since: 40 steps in 25 s, so 60 left take 37.5 s, not the 30 s of
    # the last interval's rate alone.
    assert progress.line({**METRICS, "step": 40}, now=1015.0) == "step 40/100 (40%) loss 2.5000 12,346 tok/s ETA 38s"
    assert progress.line({**METRICS, "step": 100}, now=1250.0) == "step 100/100 (100%) loss 2.5000 12,346 tok/s took 4m20s"


def test_progress_after_a_resume_counts_only_the_steps_of_this_attempt():
    progress = metrics.Progress(1000)
    line = progress.line({**METRICS, "step": 510, "resumed_from_step": 500, "interval_s": 5.0}, now=50.0)
    assert line.endswith("ETA 4m05s")  # 10 steps in 5 s: 490 left at 0.5 s


def test_durations_read_as_seconds_minutes_or_hours():
    assert [metrics.duration(s) for s in (0.4, 59, 61, 3599, 3600, 7620, 90061)] == [
        "0s", "59s", "1m01s", "59m59s", "1h00m", "2h07m", "25h01m"]


def test_progress_detail_shows_lr_grad_norm_flops_mfu_memory_and_data_wait():
    assert metrics.progress_detail(METRICS) == (
        "step 20 lr 5e-06 grad_norm 0.8 412 TFLOP/s/worker MFU 41.7% mem 61.20 GiB data wait 3%"
    )


# --------------------------------------------------------------------------- model building


@pytest.mark.parametrize("method, trainable", [
    ("elo", lambda n: n.startswith("model.layers.")),
    ("full", lambda n: True),
    ("lora", lambda n: ".lora_" in n),
])
def test_methods_choose_their_trainable_parameters(method, trainable):
    model = model_lib.build_meta(elo_config(), TrainConfig(method=method))
    names = [n for n, _ in model.named_parameters()]
    assert model_lib.trainable_names(model) == [n for n in names if trainable(n)]
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_model_holds_the_checkpoint_weights_and_buffers(one_rank, tmp_path, tied):
    config = tiny_config(num_hidden_layers=2, tie_word_embeddings=tied)
    reference = tiny_model(config)
    reference.save_pretrained(tmp_path)
    stage = model_lib.build(str(tmp_path), TrainConfig(method="full"), torch.device("cpu"), one_rank)
    got, want = full_state(stage.module), reference.state_dict()
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    for (name, buf), (_, ref) in zip(stage.module.named_buffers(), reference.named_buffers()):
        assert torch.equal(buf, ref), name
    ids = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(stage.module(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_lora_adapters_start_from_peft_init_reproducibly(one_rank, tmp_path):
    path = saved(elo_config(), tmp_path)
    a = model_lib.build(path, TrainConfig(method="lora", seed=3), torch.device("cpu"), one_rank).module
    b = model_lib.build(path, TrainConfig(method="lora", seed=3), torch.device("cpu"), one_rank).module
    sa, sb = full_state(a), full_state(b)
    lora_a = [n for n in sa if ".lora_A." in n]
    lora_b = [n for n in sa if ".lora_B." in n]
    assert len(lora_a) == len(lora_b) == 14
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert all(sa[n].abs().sum() > 0 for n in lora_a) and all(sa[n].abs().sum() == 0 for n in lora_b)


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_streams_shards_that_from_pretrained_loads(tmp_path, dtype):
    source = saved(elo_config(), tmp_path / "in", dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    (tmp_path / "in" / "tokenizer.json").write_text("{}")
    names = export.export(model, source, str(tmp_path / "out"), max_shard_bytes=20_000)
    assert len(names) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    original = transformers.AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    assert loaded.config.elo_layers == [0, 3]
    for name, tensor in original.state_dict().items():
        assert loaded.state_dict()[name].dtype == dtype
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_failed_export_leaves_the_earlier_output_as_it_was(tmp_path, monkeypatch):
    source = saved(elo_config(), tmp_path / "in")
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    out = tmp_path / "out"
    export.export(model, source, str(out), max_shard_bytes=20_000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    write = export._write_shards

    def fail_after_one_shard(output, names, groups):  # as if the disk filled up
        write(output, names[:1], groups[:1])
        raise OSError("No space left on device")

    monkeypatch.setattr(export, "_write_shards", fail_after_one_shard)
    with pytest.raises(OSError, match="No space left"):
        export.export(model, source, str(out), max_shard_bytes=20_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no staging left


def test_export_merges_lora_adapters_as_peft_does(tmp_path):
    import peft

    source = saved(elo_config(), tmp_path / "in")
    base = transformers.AutoModelForCausalLM.from_pretrained(source)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, p in lora.named_parameters():
        if ".lora_B." in name:
            p.data.normal_()
    export.export(lora, source, str(tmp_path / "out"))
    expected = lora.merge_and_unload().state_dict()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert sorted(loaded) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(loaded[name], expected[name], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- checks before and during training


class Plan:
    datasets, dataset_config = {}, None
    reader = RowsReader(num_rows=64, seq_len=32)


def run_rejected(tmp_path, config, train: TrainConfig, seq_len: int = 32):
    path = saved(config, tmp_path / "model")
    return run_training(
        name="rejected", model_uri=path, output_uri=str(tmp_path / "out"), storage_uri=str(tmp_path / "runs"),
        train=train, resources=ResourcesConfig(num_workers=2), plan=Plan(), seq_len=seq_len,
    )


def test_sequence_longer_than_the_position_table_is_rejected_before_training(tmp_path):
    with pytest.raises(TrainingError, match=r"^seq_len: 512 tokens is more than the model takes \(max_position_embeddings: 256\); "
                                            r"set seq_len to at most 256$"):
        run_rejected(tmp_path, elo_config(), TrainConfig(method="elo"), seq_len=512)
    assert not (tmp_path / "runs").exists()


def test_model_without_trainable_parameters_is_rejected(tmp_path):
    config = tiny_config(num_hidden_layers=0)
    config.elo_layers = []
    with pytest.raises(TrainingError, match="method 'elo' leaves no trainable parameters in this model"):
        run_rejected(tmp_path, config, TrainConfig(method="elo"))


def test_elo_method_needs_a_detached_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match="config has no elo_layers; detach the layers first"):
        run_rejected(tmp_path, tiny_config(num_hidden_layers=4), TrainConfig(method="elo"))


def test_export_over_the_input_checkpoint_is_rejected(tmp_path):
    path = saved(elo_config(), tmp_path / "model")
    with pytest.raises(TrainingError, match="is the input checkpoint; export the trained model elsewhere"):
        run_training(
            name="x", model_uri=path, output_uri=path + "/", storage_uri=str(tmp_path / "runs"),
            train=TrainConfig(method="elo"), resources=ResourcesConfig(), plan=Plan(), seq_len=32,
        )


def test_stream_shorter_than_one_step_is_rejected(tmp_path):
    with pytest.raises(TrainingError, match="64 sequences, fewer than one step needs \\(2 workers x micro_batch_size 8 x grad_accum 8\\)"):
        run_rejected(tmp_path, elo_config(), TrainConfig(method="elo", micro_batch_size=8, grad_accum=8))


def batch(ids):
    ids = torch.tensor(ids)
    return {"input_ids": ids, "labels": ids.clone(), "tokens": {"en": ids.numel()}}


@pytest.mark.parametrize("ids, message", [
    ([[1] * 300], "a batch of step 7 has sequences of 300 tokens, longer than the model's max_position_embeddings 256"),
    ([[1, 2, 256]], "a batch of step 7 has token id 256, outside the model's vocabulary of 256"),
    ([[1, -5, 2]], "a batch of step 7 has token id -5, outside the model's vocabulary of 256"),
])
def test_batches_that_do_not_fit_the_model_stop_training(one_rank, ids, message):
    with pytest.raises(TrainingError, match=message):
        check_batches([batch([[1, 2, 3]]), batch(ids)], elo_config(), 7, torch.device("cpu"))
    check_batches([batch([[1, 2, 255]])], elo_config(), 7, torch.device("cpu"))


def test_checkpoint_mismatch_names_every_difference():
    saved_fp = {"method": "elo", "world_size": 2, "num_hidden_layers": 2, "elo_layers": [0, 3],
                "params": {"model.layers.0.mlp.up_proj.weight": [64, 32], "model.layers.1.old.weight": [4]}}
    current = {"method": "elo", "world_size": 2, "num_hidden_layers": 2, "elo_layers": [0, 2],
               "params": {"model.layers.0.mlp.up_proj.weight": [48, 32], "model.layers.1.new.weight": [4]}}
    assert checkpoint.mismatches(saved_fp, current) == [
        "elo_layers: checkpoint [0, 3], model [0, 2]",
        "parameters not in the checkpoint: model.layers.1.new.weight",
        "checkpoint parameters not in the model: model.layers.1.old.weight",
        "model.layers.0.mlp.up_proj.weight: checkpoint shape [64, 32], model shape [48, 32]",
    ]
    assert checkpoint.mismatches(saved_fp, saved_fp) == []


# --------------------------------------------------------------------------- the train state


def train_state(world=2, micro_batch_size=2, grad_accum=1, total_steps=10) -> TrainState:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-2)
    return TrainState(data=DataPosition(world, micro_batch_size, grad_accum), total_steps=total_steps,
                      optimizer=optimizer, train=TrainConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1), fingerprint={"method": "elo"})


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no optimizer steps here
def test_train_state_round_trips_through_dcp_with_its_languages_and_resumes(one_rank, tmp_path):
    import torch.distributed.checkpoint as dcp

    saved = train_state()
    for _ in range(3):
        saved.count({"tokens": {"en": 64, "ko": 576}, "sequences": {"en": 1, "ko": 9}})
        saved.advance(640)
        saved.scheduler.step()
    saved.gather()
    saved.resumed.append({"from_step": 1, "old_world": 2, "new_world": 2})
    dcp.save({"train_state": saved}, checkpoint_id=str(tmp_path))

    loaded = train_state(total_steps=99)
    dcp.load({"train_state": loaded}, checkpoint_id=str(tmp_path))
    assert loaded.state_dict() == saved.state_dict()
    assert (loaded.step, loaded.total_steps, loaded.global_batch, loaded.tokens_total) == (3, 10, 4, 1920)
    assert loaded.tokens_per_language == {"en": 192, "ko": 1728}
    assert loaded.sequences_per_language == {"en": 3, "ko": 27}
    assert loaded.data == DataPosition(world=2, micro_batch_size=2, grad_accum=1, micro_batches=3)
    assert loaded.resumed == [{"from_step": 1, "old_world": 2, "new_world": 2}]
    # the schedule continues at step 3 of 10 steps (the loaded length, not the 99 it was built with)
    loaded.scheduler.step()
    assert loaded.scheduler.get_last_lr()[0] == pytest.approx(1e-2 * lr_factor(4, 2, 10, 0.1))


@pytest.mark.parametrize("old, new, limit, expected", [
    ((2, 2, 1), 1, 2, (2, 2)),  # a worker lost: the other accumulates twice as many micro-batches
    ((1, 4, 1), 2, 4, (2, 1)),  # a worker added: smaller micro-batches
    ((8, 4, 2), 4, 4, (4, 4)),
    ((3, 4, 2), 2, 4, (4, 3)),  # 24 sequences per step: 12 per worker
    ((2, 3, 1), 1, 4, (3, 2)),  # the largest micro-batch that divides a worker's share
])
def test_reshard_keeps_the_global_batch_within_the_micro_batch_limit(old, new, limit, expected):
    state = train_state(*old)
    state.sequences_per_language.update({"en": 10, "ko": 90})
    state.step = 5
    record = state.reshard(new, limit)
    assert (state.data.micro_batch_size, state.data.grad_accum) == expected
    assert new * state.data.micro_batch_size * state.data.grad_accum == state.global_batch == old[0] * old[1] * old[2]
    assert state.data == DataPosition(new, *expected, micro_batches=0, start={"en": 10, "ko": 90})
    assert record == {"from_step": 5, "old_world": old[0], "new_world": new, "micro_batch_size": expected[0],
                      "grad_accum": expected[1], "sequences_trained": {"en": 10, "ko": 90}}


@pytest.mark.parametrize("old, new", [((4, 1), (1, 4)), ((2, 3), (3, 2)), ((1, 6), (6, 1))])
def test_resplit_replays_the_same_stream_to_where_it_stopped(old, new):
    """Another split of the same sequences per step on the same workers: the stream position is
    the same sequence, counted in micro-batches of the new size; nothing is skipped or repeated."""
    state = train_state(2, *old)
    state.data.micro_batches = 7 * old[1]  # after 7 steps
    state.step = 7
    record = state.resplit(*new)
    assert state.data == DataPosition(2, *new, micro_batches=7 * new[1])
    assert state.data.micro_batches * new[0] == 7 * old[0] * old[1]
    assert state.global_batch == 2 * old[0] * old[1]
    assert record == {"from_step": 7, "old_world": 2, "new_world": 2, "micro_batch_size": new[0], "grad_accum": new[1],
                      "was": {"micro_batch_size": old[0], "grad_accum": old[1]}}


def test_resplit_into_another_number_of_sequences_per_step_is_refused_with_the_counts():
    state = train_state(world=2, micro_batch_size=4, grad_accum=1)
    state.step = 3
    with pytest.raises(TrainingError) as e:
        state.resplit(1, 2)
    assert str(e.value) == (
        "cannot resume step 3 with micro_batch_size 1 x grad_accum 2: the run trains 4 sequences per worker per "
        "step (micro_batch_size 4 x grad_accum 1); keep that product, or start a new run name")
    assert state.data == DataPosition(2, 4, 1)


def test_reshard_onto_a_world_that_does_not_divide_the_batch_names_the_counts_that_do():
    state = train_state(world=2, micro_batch_size=2, grad_accum=1)
    with pytest.raises(TrainingError) as e:
        state.reshard(3, 2)
    assert str(e.value) == (
        "cannot resume step 0 on 3 workers: the run's global batch of 4 sequences (2 workers x micro_batch_size 2 "
        "x grad_accum 1) does not split evenly over 3; set resources.num_workers to one of 1, 2, 4"
    )
