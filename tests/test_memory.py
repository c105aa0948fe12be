"""Memory estimates: parameter counts against real models, activation bytes against the tensors a
real bf16 forward saves, Llama-3.1-8B numbers, and the warnings `elo-ray validate` prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers

from elo_ray.memory import (
    GIB,
    estimate_memory,
    frozen_layer_savings,
    head_activation_bytes,
    layer_activation_bytes,
    memory_warnings,
)
from elo_ray.model_size import lora_params_per_layer, param_counts
from elo_ray.config import load_spec, spec_from_dict
from elo_ray.tiny import ARCHITECTURES, tiny_config, tiny_model

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def llama31_8b(num_hidden_layers: int = 32) -> transformers.PretrainedConfig:
    """The published Llama-3.1-8B config, the parts memory depends on."""
    return transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=num_hidden_layers,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    )


def qwen2_7b() -> transformers.PretrainedConfig:
    return transformers.Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
    )


def mistral_7b_v03() -> transformers.PretrainedConfig:
    return transformers.MistralConfig(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    )


def make_spec(num_workers=8, use_gpu=True, seq_len=8192, align_ckpt=False, align_mb=1, pretrain_mb=1, **extra):
    raw = {
        "storage": {"root": "s3://bucket/runs"},
        "model": {"base": "s3://bucket/models/base"},
        "resources": {"num_workers": num_workers, "use_gpu": use_gpu},
        "pretrain": {
            "data": {"sources": [{"uri": "s3://bucket/ko/*.jsonl", "language": "ko"}], "seq_len": seq_len},
            "train": {"method": "elo", "micro_batch_size": pretrain_mb},
        },
        "align": {"train": {"activation_checkpointing": align_ckpt, "micro_batch_size": align_mb}},
        **extra,
    }
    return spec_from_dict(raw)


def by_stage(spec, config, gpu=80.0):
    return {m.stage: m for m in estimate_memory(spec, config, gpu)}


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_param_count_equals_numel_of_the_real_model(arch, tied):
    config = tiny_config(arch, tie_word_embeddings=tied)
    model = tiny_model(config)
    assert param_counts(config).total == sum(p.numel() for p in model.parameters())


def test_param_count_includes_llama_attention_and_mlp_biases():
    config = tiny_config("llama", attention_bias=True, mlp_bias=True)
    assert param_counts(config).total == sum(p.numel() for p in tiny_model(config).parameters())


def test_llama31_8b_has_8_03b_parameters():
    counts = param_counts(llama31_8b())
    assert counts.embedding == counts.head == 128256 * 4096 == 525_336_576
    assert counts.layer == 218_112_000
    assert counts.total == 8_030_261_248


def test_qwen2_7b_and_mistral_7b_match_their_published_sizes():
    assert param_counts(qwen2_7b()).total == 7_615_616_512
    assert param_counts(mistral_7b_v03()).total == 7_248_023_552


def test_elo_model_has_embedding_two_layers_and_head():
    counts = param_counts(llama31_8b())
    assert counts.with_layers(2) == 2 * 525_336_576 + 2 * 218_112_000 + 4096


# --------------------------------------------------------------------------- activations


def saved_bytes(config, seq: int = 256, checkpointing: bool = False, frozen: tuple[int, ...] = ()) -> int:
    """Bytes of the tensors autograd saves in a bf16 forward with labels (parameters excluded),
    with the decoder layers `frozen` frozen."""
    model = tiny_model(config).to(torch.bfloat16).train()
    for i in frozen:
        model.model.layers[i].requires_grad_(False)
    if checkpointing:
        model.config.use_cache = False
        # transformers 5.x renamed gradient_checkpointing_enable; the train loop uses either.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(n for ptr, n in storages.items() if ptr not in params)


def bench_config(arch: str, layers: int):
    return tiny_config(
        arch, vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_activation_bytes_equal_what_a_bf16_layer_saves(arch):
    seq = 256
    per_layer = (saved_bytes(bench_config(arch, 4), seq) - saved_bytes(bench_config(arch, 2), seq)) / 2 / seq
    expected = layer_activation_bytes(bench_config(arch, 2), compute_bytes=2, seq_len=seq)
    # Llama, Mistral and the Qwens to the byte; Gemma within its per-model masks' few bytes.
    assert per_layer == pytest.approx(expected, rel=2e-3)


def test_checkpointed_layer_keeps_only_its_bf16_input():
    seq = 256
    two, four = (saved_bytes(bench_config("llama", n), seq, checkpointing=True) for n in (2, 4))
    assert (four - two) / 2 / seq == 2 * 256  # one bf16 hidden state (hidden 256) per token


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_frozen_layer_saves_less_by_what_only_weight_gradients_need(arch):
    seq, config = 256, bench_config(arch, 4)
    fewer = (saved_bytes(config, seq) - saved_bytes(config, seq, frozen=(2,))) / seq
    assert fewer == frozen_layer_savings(config, compute_bytes=2)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_head_activation_bytes_cover_what_the_head_and_loss_save(arch):
    seq, config = 256, bench_config(arch, 2)
    head = saved_bytes(config, seq) / seq - 2 * layer_activation_bytes(config, 2, seq)
    # What forward saves; the rest of the estimate is the logits' backward peak: bf16 logits
    # held by the caller and the fp32 gradients of log-probs and logits, (2 + 4 + 4) bytes each.
    assert head == pytest.approx(head_activation_bytes(config, 2) - 10 * config.vocab_size, rel=1e-2)


# --------------------------------------------------------------------------- stages


def test_llama31_8b_on_8_gpus_is_in_the_expected_range():
    m = by_stage(make_spec(pretrain_mb=1), llama31_8b())
    # ELO pretraining: 1.5B parameters of which 0.44B train; the 128K-vocabulary logits dominate.
    pretrain = m["pretrain"]
    assert pretrain.params == 1_486_901_248 and pretrain.trainable == 2 * 218_112_000
    assert pretrain.grads_gib == 0  # the frozen head makes no gradient at the start of backward
    assert 15 < pretrain.total_gib < 30
    # Full fine-tuning: fp32 shards of weights and AdamW's moments over 8 GPUs.
    align = m["align"]
    assert align.optimizer_gib == pytest.approx(8_030_261_248 * 8 / 8 / GIB)
    assert align.grads_gib == pytest.approx(128256 * 4096 * 2 / GIB)  # the head's, in bf16
    # 8192 tokens through 32 layers without checkpointing: more than an 80 GB GPU holds.
    assert 55 < align.activations_gib < 75
    assert align.total_gib > 80


def test_gradients_set_the_peak_when_they_outweigh_activations():
    align = by_stage(make_spec(num_workers=1, seq_len=64), llama31_8b())["align"]
    assert align.activations_gib == 0
    gathered = (2 * 525_336_576 + 4096 + 2 * 218_112_000) * 2
    assert align.grads_gib == pytest.approx((8_030_261_248 * 4 + gathered) / GIB)


def test_activation_checkpointing_brings_full_fine_tuning_under_80_gib():
    off = by_stage(make_spec(align_ckpt=False), llama31_8b())["align"]
    on = by_stage(make_spec(align_ckpt=True), llama31_8b())["align"]
    assert on.activations_gib < off.activations_gib / 3
    assert 30 < on.total_gib < 50


def test_activations_grow_linearly_with_micro_batch():
    one = by_stage(make_spec(align_mb=1), llama31_8b())["align"]
    two = by_stage(make_spec(align_mb=2), llama31_8b())["align"]
    assert two.activations_gib == pytest.approx(2 * one.activations_gib)


def test_elo_pretraining_memory_depends_on_detached_layers_not_on_depth():
    shallow = by_stage(make_spec(), llama31_8b())
    deep = by_stage(make_spec(), llama31_8b(num_hidden_layers=80))
    assert deep["pretrain"].total_gib == pytest.approx(shallow["pretrain"].total_gib)
    assert deep["align"].total_gib > 2 * shallow["align"].total_gib


def test_twice_the_gpus_halves_the_sharded_optimizer_state():
    eight = by_stage(make_spec(num_workers=8), llama31_8b())["align"]
    sixteen = by_stage(make_spec(num_workers=16), llama31_8b())["align"]
    assert sixteen.optimizer_gib == pytest.approx(eight.optimizer_gib / 2)
    assert sixteen.activations_gib == pytest.approx(eight.activations_gib)


def test_only_enabled_training_stages_are_estimated():
    assert [m.stage for m in estimate_memory(make_spec(), llama31_8b(), 80)] == ["pretrain", "align"]
    no_align = make_spec(align={"enabled": False})
    assert [m.stage for m in estimate_memory(no_align, llama31_8b(), 80)] == ["pretrain"]


# --------------------------------------------------------------------------- warnings


def test_warning_names_the_stage_the_numbers_and_the_fix():
    spec = make_spec(align_ckpt=False)
    m = by_stage(spec, llama31_8b())["align"]
    fixed = by_stage(make_spec(align_ckpt=True), llama31_8b())["align"]
    (line,) = memory_warnings(spec, llama31_8b(), 80.0, "A100-80GB")
    assert line.startswith(
        f"align: estimated {m.total_gib:.1f} GiB per GPU (weights {m.weights_gib:.1f}, grads "
        f"{m.grads_gib:.1f}, optimizer {m.optimizer_gib:.1f}, activations {m.activations_gib:.1f}, "
        f"other {m.other_gib:.1f}) exceeds the 80 GiB of an A100-80GB; "
        f"turn on align.train.activation_checkpointing (~{fixed.total_gib:.1f} GiB)"
    )
    assert m.total_gib == pytest.approx(87.7, abs=0.1)


def test_no_warning_when_every_stage_fits():
    assert memory_warnings(make_spec(align_ckpt=True), llama31_8b(), 80.0, "H100-80GB") == []


def test_cpu_runs_get_no_gpu_memory_warnings():
    assert memory_warnings(make_spec(use_gpu=False, num_workers=1), llama31_8b(), 80.0) == []


def test_with_checkpointing_on_the_warning_points_at_micro_batch_or_seq_len():
    spec = make_spec(align_ckpt=True, align_mb=2)
    (line,) = memory_warnings(spec, llama31_8b(), 40.0, "A100-40GB")
    assert line.startswith("align: estimated ")
    assert "exceeds the 40 GiB of an A100-40GB" in line
    assert "lower align.train.micro_batch_size to 1 and raise grad_accum 2x, to 2 (~" in line
    assert "activation_checkpointing" not in line  # already on
    lines = memory_warnings(make_spec(align_ckpt=True, seq_len=16384), llama31_8b(), 40.0, "A100-40GB")
    (line,) = [w for w in lines if w.startswith("align:")]
    assert "lower pretrain.data.seq_len to 8192 (~" in line  # align reuses the pretrain data


def test_every_suggested_change_fits_when_any_single_change_does():
    spec = make_spec(pretrain_mb=2, align_ckpt=True)
    (line,) = memory_warnings(spec, llama31_8b(), 40.0, "A100-40GB")
    assert line.startswith("pretrain: ")
    remedies = line.split("; ", 1)[1].split(" or ")
    for remedy in remedies:
        gib = float(re.search(r"\(~([\d.]+) GiB\)", remedy).group(1))
        assert gib <= 40.0, remedy


def test_when_no_single_change_fits_the_warning_says_to_combine():
    spec = make_spec(align_ckpt=False, align_mb=4)
    (line,) = [w for w in memory_warnings(spec, llama31_8b(), 40.0, "A100-40GB") if w.startswith("align:")]
    assert "no single change is enough; combine: turn on align.train.activation_checkpointing (~" in line


@pytest.mark.parametrize(
    "name, config",
    [
        ("llama3.1-8b-korean", llama31_8b()),
        ("llama3.1-8b-japanese", llama31_8b()),
        ("qwen2-7b-korean", qwen2_7b()),
        ("mistral-7b-v0.3-korean", mistral_7b_v03()),
    ],
)
def test_paper_recipes_fit_80gb_gpus(name, config):
    spec = load_spec(JOBS / f"{name}.yaml")
    assert [m.stage for m in estimate_memory(spec, config, 80)] == ["pretrain", "align", "instruct"]
    assert memory_warnings(spec, config, 80.0, "H100-80GB") == []


def test_lora_trainable_parameters_equal_what_peft_adds():
    import peft

    config = tiny_config("qwen2")
    spec = make_spec(align={"train": {"method": "lora", "lora_rank": 4}})
    model = peft.get_peft_model(
        tiny_model(config), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    align = by_stage(spec, config)["align"]
    assert align.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert align.params == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- align methods


def align_with(**train):
    spec = make_spec(align={"train": {"activation_checkpointing": True, **train}})
    return by_stage(spec, llama31_8b())["align"]


def test_layer_methods_train_the_detached_layers_and_neighbours_of_llama_8b():
    layer = 218_112_000
    full, layers, lora_layers = align_with(), align_with(method="layers"), align_with(method="lora_layers")
    assert layers.trainable == 4 * layer  # layers 0, 1, 30, 31
    assert lora_layers.trainable == 4 * layer + 28 * lora_params_per_layer(llama31_8b(), 16)
    assert layers.optimizer_gib == pytest.approx(4 * layer * 8 / 8 / GIB)
    assert layers.weights_gib == pytest.approx(full.weights_gib)  # frozen layers stay sharded in fp32
    assert layers.total_gib < full.total_gib - 7


def test_offload_leaves_the_gpu_the_gathered_copies_and_activations():
    full, offload = align_with(), align_with(offload_to_cpu=True)
    p, layer, root = 8_030_261_248, 218_112_000, 2 * 525_336_576 + 4096
    assert offload.optimizer_gib == 0
    assert offload.weights_gib == pytest.approx(((root + 2 * layer) * 2 + root * 4 / 8) / GIB)
    assert offload.host_gib == pytest.approx(p * (4 + 4 + 8) / 8 / GIB)
    assert offload.activations_gib == full.activations_gib
    assert offload.total_gib < full.total_gib - 10
    assert "15.0 more in host memory (offload_to_cpu)" in offload.breakdown()


def test_layers_below_the_lowest_trained_layer_save_no_activations():
    config = llama31_8b()
    spec = make_spec(align={"train": {"method": "layers", "layers": [20], "neighbours": 0}})
    m = by_stage(spec, config)["align"]
    per_layer, tokens = layer_activation_bytes(config, 2, 8192), 8192
    frozen = per_layer - frozen_layer_savings(config, 2)
    expected = tokens * (per_layer + 11 * frozen) + tokens * head_activation_bytes(config, 2)
    assert m.activations_gib == pytest.approx(expected / GIB)


def test_the_warning_offers_offload_and_the_layer_methods_with_their_estimates():
    spec = make_spec(num_workers=4, align_ckpt=True)
    (line,) = [w for w in memory_warnings(spec, llama31_8b(), 40.0, "A100-40GB") if w.startswith("align:")]
    offload = by_stage(make_spec(num_workers=4, align={"train": {"activation_checkpointing": True,
                                                                   "offload_to_cpu": True}}), llama31_8b())["align"]
    assert (f"keep align's weight shards, gradients and optimizer state in host memory "
            f"(align.train.offload_to_cpu: true; the same result, slower) (~{offload.total_gib:.1f} GiB)") in line
    assert "train only the detached layers and their neighbours (align.train.method: layers) (~34.3 GiB)" in line
    assert "(align.train.method: lora_layers) (~34.4 GiB)" in line
