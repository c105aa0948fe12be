"""Alignment on less memory: the whole-model methods `layers` and `lora_layers` and
`offload_to_cpu`. Which parameters train, frozen weights bit-identical after a step, offload
training to the weights that full fine-tuning without it reaches, the layers the stage table
fills in, FLOPs, validate's checks; one run through Ray Train for checkpoint and export."""

from __future__ import annotations

import re
import sys

import pytest
import ray.cloudpickle
import torch

from elo_ray import stage_table
from elo_ray.config import ResourcesConfig, TrainConfig, spec_from_dict
from elo_ray.tiny import tiny_config, tiny_model
from elo_ray.train import metrics, run_training
from elo_ray.train import model as model_lib
from elo_ray.train.optim import build_optimizer
from elo_ray.train.step import check_batches, train_step
from elo_ray.train.synthetic import learnable_rows, rows_plan
from elo_ray.train.trainer import backend
from elo_ray.validate import check_trained_layers

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("six")
    tiny_model(tiny_config(num_hidden_layers=6), seed=2).save_pretrained(path)
    return str(path)


def layer_of(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def full_state(module) -> dict[str, torch.Tensor]:
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
            for n, t in module.state_dict().items()}


def steps(stage: model_lib.StageModel, train: TrainConfig, n: int = 2) -> None:
    """`n` optimizer steps of the worker loop's own step on fixed batches."""
    optimizer = build_optimizer(stage.module, train, CPU)
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        ids = torch.randint(0, stage.config.vocab_size, (2, 16), generator=gen)
        micro = [{"input_ids": ids, "labels": ids}]
        stats = check_batches(micro, stage.config, i + 1, CPU)
        assert train_step(stage.module, optimizer, micro, stats, train.grad_clip, CPU, 1, stage.loss).finite


# --------------------------------------------------------------------------- which parameters train


def test_full_layers_are_the_layers_and_their_neighbours_in_order():
    assert TrainConfig(method="layers", layers=[0, -1]).full_layers(12) == [0, 1, 10, 11]
    assert TrainConfig(method="layers", layers=[5, 0], neighbours=2).full_layers(12) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert TrainConfig(method="layers", layers=[0, -1], neighbours=0).full_layers(4) == [0, 3]
    with pytest.raises(ValueError, match=r"\[12\] out of range for a model with 12 decoder layers; use 0..11"):
        TrainConfig(method="layers", layers=[0, 12]).full_layers(12)


@pytest.mark.parametrize("method, whole, adapted", [
    ("layers", {0, 1, 4, 5}, set()),
    ("lora_layers", {0, 1, 4, 5}, {2, 3}),
])
def test_layer_methods_train_the_detached_layers_their_neighbours_and_adapters(method, whole, adapted):
    model = model_lib.build_meta(tiny_config(num_hidden_layers=6), TrainConfig(method=method, layers=[0, -1]))
    trainable = model_lib.trainable_names(model)
    assert {layer_of(n) for n in trainable if ".lora_" not in n} == whole
    assert {layer_of(n) for n in trainable if ".lora_" in n} == adapted
    assert not [n for n in trainable if layer_of(n) is None]  # embedding, norm and head stay frozen
    # every parameter of a whole layer trains; no adapter sits on a layer that trains whole
    in_whole = [n for n, _ in model.named_parameters() if layer_of(n) in whole]
    assert set(in_whole) <= set(trainable) and not [n for n in in_whole if ".lora_" in n]
    assert len([n for n in trainable if ".lora_A." in n]) == 7 * len(adapted)


def test_lora_layers_over_every_layer_is_an_error_that_says_what_to_use():
    with pytest.raises(model_lib.TrainingError, match="nothing is left for LoRA; use method layers or full"):
        model_lib.build_meta(tiny_config(num_hidden_layers=4), TrainConfig(method="lora_layers", layers=[0, -1]))


@pytest.mark.parametrize("method", ["layers", "lora_layers"])
def test_a_step_changes_the_trained_weights_and_no_frozen_bit(one_rank, six_layers, method):
    train = TrainConfig(method=method, layers=[0, -1], lr=1e-2, neighbours=0)
    stage = model_lib.build(six_layers, train, CPU, one_rank)
    before = full_state(stage.module)
    steps(stage, train)
    after = full_state(stage.module)
    trained = set(stage.trainable)
    for name in before:
        if name in trained and ".lora_B." not in name:  # lora_B starts at 0 and moves; lora_A with it
            assert not torch.equal(after[name], before[name]), name
        elif name not in trained:
            assert torch.equal(after[name], before[name]), name
    assert {layer_of(n) for n in trained if ".lora_" not in n} == {0, 5}
    assert stage.full_layers == (0, 5)


@pytest.mark.parametrize("method", ["full", "layers"])
def test_offload_to_cpu_trains_to_the_weights_it_reaches_without(one_rank, six_layers, method):
    results = []
    for offload in (False, True):
        train = TrainConfig(method=method, layers=[0, -1], lr=1e-3, offload_to_cpu=offload)
        stage = model_lib.build(six_layers, train, CPU, one_rank)
        steps(stage, train, n=3)
        results.append(full_state(stage.module))
    plain, offloaded = results
    assert sorted(plain) == sorted(offloaded)
    for name in plain:
        torch.testing.assert_close(offloaded[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    start = tiny_model(tiny_config(num_hidden_layers=6), seed=2).state_dict()
    assert not torch.equal(plain["model.layers.5.mlp.up_proj.weight"], start["model.layers.5.mlp.up_proj.weight"])


def test_offload_on_gpus_adds_gloo_for_the_host_shards():
    gpu = ResourcesConfig(use_gpu=True)
    assert backend(gpu, TrainConfig(offload_to_cpu=True)) == "cpu:gloo,cuda:nccl"
    assert backend(gpu, TrainConfig()) == "nccl"
    assert backend(ResourcesConfig(), TrainConfig(offload_to_cpu=True)) == "gloo"


# --------------------------------------------------------------------------- FLOPs


def test_flops_count_weight_gradients_where_layers_train_and_backward_down_to_the_lowest():
    c = tiny_config(num_hidden_layers=6)
    p = metrics.layer_matmul_params(c)
    attention = 4 * 16 * c.num_attention_heads * (c.hidden_size // c.num_attention_heads)
    head = 2 * c.hidden_size * c.vocab_size
    trained, frozen, below = 6 * p + 3 * attention, 4 * p + 3 * attention, 2 * p + attention
    assert metrics.train_flops_per_token(c, "layers", 16, full_layers=(0, 1, 4, 5)) == 4 * trained + 2 * frozen + 2 * head
    assert metrics.train_flops_per_token(c, "layers", 16, full_layers=(2, 3)) == 2 * below + 2 * trained + 2 * frozen + 2 * head
    lora = 6 * metrics.lora_params_per_layer(c, 4)
    assert (metrics.train_flops_per_token(c, "lora_layers", 16, 4, full_layers=(0, 5))
            == 2 * trained + 4 * (frozen + lora) + 2 * head)
    # the general count gives the three original methods' formulas
    assert metrics.train_flops_per_token(c, "full", 16) == 6 * trained + 3 * head
    assert metrics.train_flops_per_token(c, "lora", 16, 4) == 6 * (frozen + lora) + 2 * head


# --------------------------------------------------------------------------- spec, stage table, validate


def spec(**align_train):
    return spec_from_dict({
        "storage": {"root": "/tmp/runs"},
        "model": {"base": "/tmp/base"},
        "pretrain": {"layers": [0, -1], "data": {"sources": [{"uri": "/tmp/ko", "language": "ko"}]}},
        "align": {"train": align_train},
    })


def test_align_layer_methods_train_the_detached_layers_and_read_pretrain_layers():
    s = spec(method="layers")
    assert stage_table.training(s, "align").train.layers == [0, -1]
    assert "pretrain.layers" in stage_table.settings(s, "align")
    explicit = spec(method="layers", layers=[2, 3])
    assert stage_table.training(explicit, "align").train.layers == [2, 3]
    assert "pretrain.layers" not in stage_table.settings(explicit, "align")
    assert "pretrain.layers" not in stage_table.settings(spec(method="full"), "align")


def test_pretrain_stays_elo_and_align_refuses_elo():
    with pytest.raises(Exception, match="method must be elo here"):
        spec_from_dict({**spec().model_dump(mode="json"), "pretrain": {
            "data": {"sources": [{"uri": "/tmp/ko", "language": "ko"}]}, "train": {"method": "layers"}}})
    with pytest.raises(Exception, match="use full, lora, layers or lora_layers here"):
        spec(method="elo")


def test_validate_names_layers_the_model_does_not_have_and_lora_layers_with_nothing_left():
    four = tiny_config(num_hidden_layers=4)
    assert check_trained_layers(spec(method="layers", layers=[0, 7]), four) == [
        "align.train.layers: train.layers [0, 7]: [7] out of range for a model with 4 decoder layers; use 0..3 or -4..-1"
    ]
    (line,) = check_trained_layers(spec(method="lora_layers"), four)
    assert line.startswith("align.train.method: lora_layers trains layers [0, 1, 2, 3] whole (pretrain.layers and "
                           "align.train.neighbours=1), every one of the model's 4")
    assert check_trained_layers(spec(method="lora_layers", neighbours=0), four) == []
    assert check_trained_layers(spec(method="full"), four) == []


# --------------------------------------------------------------------------- through Ray Train


def test_layers_method_checkpoints_and_exports_only_what_it_trains(ray_local, tmp_path):
    from safetensors.torch import load_file

    base = tmp_path / "base"
    tiny_model(tiny_config(num_hidden_layers=4, vocab_size=320), seed=1).save_pretrained(base)
    plan = rows_plan(learnable_rows(4 * 2 * 2, 32, 320))
    train = TrainConfig(method="layers", layers=[0, -1], neighbours=0, lr=1e-2, max_steps=4, micro_batch_size=2,
                        checkpoint_every=2, log_every=2)
    result = run_training(name="layers", model_uri=str(base), output_uri=str(tmp_path / "out"),
                          storage_uri=str(tmp_path / "runs"), train=train, plan=plan, seq_len=32,
                          resources=ResourcesConfig(num_workers=2, cpus_per_worker=0.5, max_failures=0))
    before = load_file(base / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(after) == sorted(before)
    assert sorted({layer_of(n) for n in before if not torch.equal(after[n], before[n])}) == [0, 3]
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(tmp_path / "runs" / "layers" / "checkpoint_00000004")).read_metadata().state_dict_metadata
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and {layer_of(k) for k in model_keys} == {0, 3}
    assert result.steps == 4
