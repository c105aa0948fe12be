"""Model surgery, as a specification: detach, merge and chat vector on Hugging Face checkpoints.

Checkpoints are tiny models built from configs (`elo_ray.tiny`) and written with
`save_pretrained`; the S3 tests use the real moto server from conftest.
"""

from __future__ import annotations

import inspect
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from elo_ray import storage
from elo_ray.surgery import (
    SurgeryError,
    chat_vector,
    check_skip_patterns,
    checkpoint_config,
    detach,
    merge,
    save_detached,
    validate_layers,
)
from elo_ray.tiny import ARCHITECTURES, tiny_config, tiny_model

SEQ = 12
WINDOW = 4  # below SEQ: a sliding layer sees a different mask from a full one

# Per-architecture settings that give each model a mix of sliding and full attention layers,
# so that a wrongly sliced `layer_types` changes the logits.
ARCH_EXTRA = {
    "llama": {},
    "llama-tied": {"tie_word_embeddings": True},
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
    "gemma2": {"sliding_window": WINDOW},
    "gemma3_text": {
        "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"],
    },
}
VARIANTS = [*ARCHITECTURES, "llama-tied"]
LAYER_SETS = [(0, -1), (1, 2), (0, 2, 3)]


def variant_config(variant: str, **kw) -> transformers.PretrainedConfig:
    return tiny_config(variant.split("-")[0], **{**ARCH_EXTRA[variant], **kw})


def files_of(path: str) -> dict[str, bytes]:
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


def tensors_of(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def shard_keys(path: str) -> dict[str, set[str]]:
    return {n: set(load_file(os.path.join(path, n))) for n in os.listdir(path) if n.endswith(".safetensors")}


def header(path: str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in h.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (model, path of its sharded checkpoint), built once per module."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for variant in VARIANTS:
        model = tiny_model(variant_config(variant), seed=1)
        path = str(root / variant)
        model.save_pretrained(path, max_shard_size="20KB")
        out[variant] = (model, path)
    return out


@pytest.fixture
def llama(saved):
    return saved["llama"]


# ---------------------------------------------------------------------------------------------
# The hand-written ELO forward: embedding -> chosen layers of the ORIGINAL model -> norm -> head


def layer_type(config, i: int) -> str:
    if getattr(config, "layer_types", None):
        return config.layer_types[i]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def reference_logits(model, layers, input_ids):
    config, inner = model.config, model.model
    positions = torch.arange(input_ids.shape[1])[None]
    x = inner.embed_tokens(input_ids)  # Gemma's scaled embedding multiplies by sqrt(hidden) itself
    mask_args = dict(config=config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=positions)
    masks = {"full_attention": create_causal_mask(**mask_args)}
    if getattr(config, "sliding_window", None):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)
    per_type_rope = "layer_type" in inspect.signature(inner.rotary_emb.forward).parameters
    for i in layers:
        kind = layer_type(config, i)
        rope = inner.rotary_emb(x, positions, kind) if per_type_rope else inner.rotary_emb(x, positions)
        x = inner.layers[i](x, attention_mask=masks[kind], position_embeddings=rope, position_ids=positions)
    logits = model.lm_head(inner.norm(x))
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def input_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_hand_written_forward_through_all_layers_is_the_models_forward(saved, variant):
    model, _ = saved[variant]
    with torch.no_grad():
        torch.testing.assert_close(
            reference_logits(model, range(4), input_ids()), model(input_ids()).logits
        )


@pytest.mark.parametrize("layers", LAYER_SETS, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_elo_logits_equal_original_layers_run_by_hand(saved, variant, layers):
    model, path = saved[variant]
    elo = detach(path, layers)
    chosen = validate_layers(4, layers)
    assert type(elo) is type(model)
    assert elo.config.num_hidden_layers == len(chosen) == len(elo.model.layers)
    assert elo.config.elo_layers == list(chosen)
    assert elo.config.elo_base_num_hidden_layers == 4
    if getattr(model.config, "layer_types", None):
        assert elo.config.layer_types == [model.config.layer_types[i] for i in chosen]
    with torch.no_grad():
        expected = reference_logits(model, chosen, input_ids())
        torch.testing.assert_close(elo(input_ids()).logits, expected)
        # The middle layers matter: running all of them gives something else.
        assert not torch.allclose(model(input_ids()).logits, expected, atol=1e-3)


def test_elo_model_holds_the_original_tensors(llama):
    model, path = llama
    elo = detach(path, (1, 3))
    ours = elo.state_dict()
    theirs = model.state_dict()
    for key, value in ours.items():
        parts = key.split(".")
        if key.startswith("model.layers."):
            parts[2] = str((1, 3)[int(parts[2])])
        assert torch.equal(value, theirs[".".join(parts)]), key
    assert len(ours) == len(theirs) - 2 * len(model.model.layers[0].state_dict())


def test_only_detached_layers_require_grad_by_default(llama):
    elo = detach(llama[1])
    trainable = {n for n, p in elo.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in elo.named_parameters() if n.startswith("model.layers.")}
    assert trainable  # both layers, every tensor
    assert {n.split(".")[2] for n in trainable} == {"0", "1"}


@pytest.mark.parametrize(
    "flag, prefix",
    [("train_embeddings", "model.embed_tokens."), ("train_norm", "model.norm."), ("train_head", "lm_head.")],
)
def test_flags_unfreeze_embedding_norm_and_head(llama, flag, prefix):
    elo = detach(llama[1], **{flag: True})
    trainable = {n for n, p in elo.named_parameters() if p.requires_grad}
    layers = {n for n, _ in elo.named_parameters() if n.startswith("model.layers.")}
    assert trainable - layers == {n for n, _ in elo.named_parameters() if n.startswith(prefix)}


def test_tied_embeddings_stay_tied(saved):
    model, path = saved["llama-tied"]
    elo = detach(path)
    assert elo.lm_head.weight is elo.model.embed_tokens.weight
    assert torch.equal(elo.lm_head.weight, model.model.embed_tokens.weight)
    both = detach(path, train_embeddings=True, train_head=True)
    assert both.lm_head.weight.requires_grad and both.lm_head.weight is both.model.embed_tokens.weight
    with pytest.raises(SurgeryError, match="tie_word_embeddings=True.*same value"):
        detach(path, train_head=True)


def test_untied_head_is_its_own_tensor(llama):
    elo = detach(llama[1])
    assert elo.lm_head.weight.data_ptr() != elo.model.embed_tokens.weight.data_ptr()
    assert torch.equal(elo.lm_head.weight, llama[0].lm_head.weight)


def test_detach_casts_to_dtype(llama):
    elo = detach(llama[1], dtype=torch.bfloat16)
    assert {p.dtype for p in elo.parameters()} == {torch.bfloat16}
    assert torch.equal(elo.model.layers[1].mlp.up_proj.weight, llama[0].model.layers[3].mlp.up_proj.weight.bfloat16())


def test_detaching_an_elo_model_again_keeps_original_indices(llama, tmp_path):
    elo = save_detached(llama[1], (0, 2, 3), str(tmp_path / "elo"))
    again = detach(elo, (0, 2))
    assert again.config.elo_layers == [0, 3]
    assert again.config.elo_base_num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids()).logits, reference_logits(llama[0], (0, 3), input_ids()))


def test_detach_reads_only_the_tensors_it_needs(tmp_path):
    model = tiny_model(tiny_config("llama", num_hidden_layers=6), seed=3)
    path = str(tmp_path / "base")
    model.save_pretrained(path, max_shard_size="20KB")
    intact = detach(path, (0, 5)).state_dict()
    needed = lambda key: not key.startswith("model.layers.") or key.split(".")[2] in ("0", "5")  # noqa: E731
    deleted = corrupted = 0
    for shard, keys in shard_keys(path).items():
        file = os.path.join(path, shard)
        if not any(needed(k) for k in keys):
            os.remove(file)  # a shard of middle layers only: gone
            deleted += 1
            continue
        offsets = header(file)
        with open(file, "r+b") as f:  # middle-layer tensors beside needed ones: garbage
            for key in keys:
                if not needed(key):
                    start, end = offsets[key]
                    f.seek(start)
                    f.write(b"\xff" * (end - start))
                    corrupted += 1
    assert deleted and corrupted
    elo = detach(path, (0, 5)).state_dict()
    assert elo.keys() == intact.keys()
    for key in elo:
        assert torch.equal(elo[key], intact[key]), key


# ---------------------------------------------------------------------------------------------
# Merge


def test_merge_of_an_untrained_elo_reproduces_base_bit_for_bit(llama, tiny_tokenizer, tmp_path):
    _, path = llama
    tiny_tokenizer.save_pretrained(path)
    elo = save_detached(path, (0, -1), str(tmp_path / "elo"))
    elo_files = set(os.listdir(elo))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= elo_files
    assert json.load(open(os.path.join(elo, "config.json")))["elo_layers"] == [0, 3]
    merged = merge(path, elo, str(tmp_path / "merged"))
    assert merged == str(tmp_path / "merged")
    assert files_of(merged) == files_of(path)  # every shard, the index, config and tokenizer
    assert shard_keys(merged) == shard_keys(path)
    base_tensors, merged_tensors = tensors_of(path), tensors_of(merged)
    assert base_tensors.keys() == merged_tensors.keys()
    for key in base_tensors:
        assert torch.equal(merged_tensors[key], base_tensors[key]), key


@pytest.mark.parametrize("variant, layers", [("llama", (1, 2)), ("gemma2", (0, 2, 3)), ("llama-tied", (0, -1))])
def test_merge_changes_exactly_the_chosen_layers(saved, tmp_path, variant, layers):
    _, path = saved[variant]
    elo = detach(path, layers)
    with torch.no_grad():
        for p in elo.model.layers.parameters():
            p.add_(torch.randn_like(p))
    elo.save_pretrained(str(tmp_path / "elo"))
    merged = merge(path, str(tmp_path / "elo"), str(tmp_path / "merged"))
    chosen = validate_layers(4, layers)
    base, after, trained = tensors_of(path), tensors_of(merged), elo.state_dict()
    assert after.keys() == base.keys()
    assert shard_keys(merged) == shard_keys(path)
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert changed == {k for k in base if k.startswith("model.layers.") and int(k.split(".")[2]) in chosen}
    for key in changed:
        i = chosen.index(int(key.split(".")[2]))
        assert torch.equal(after[key], trained[key.replace(f"layers.{chosen[i]}.", f"layers.{i}.", 1)])


def test_merge_casts_elo_tensors_to_base_dtype(llama, tmp_path):
    _, path = llama
    elo = detach(path, dtype=torch.bfloat16)
    elo.save_pretrained(str(tmp_path / "elo"))
    after = tensors_of(merge(path, str(tmp_path / "elo"), str(tmp_path / "merged")))
    assert {t.dtype for t in after.values()} == {torch.float32}
    key = "model.layers.3.mlp.down_proj.weight"
    assert torch.equal(after[key], tensors_of(path)[key].bfloat16().float())


# ---------------------------------------------------------------------------------------------
# Chat vector


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """target, base, instruct: same architecture, different weights, different shard layouts."""
    root = tmp_path_factory.mktemp("trio")
    paths = []
    for seed, (name, shard) in enumerate([("target", "20KB"), ("base", "30KB"), ("instruct", "50GB")]):
        path = str(root / name)
        tiny_model(tiny_config("llama"), seed=10 + seed).save_pretrained(path, max_shard_size=shard)
        paths.append(path)
    return paths


def test_chat_vector_is_target_plus_scaled_difference(trio, tmp_path):
    target, base, instruct = trio
    out = chat_vector(target, base, instruct, str(tmp_path / "out"), scale=0.7)
    t, b, i, o = (tensors_of(p) for p in (target, base, instruct, out))
    assert o.keys() == t.keys() and "lm_head.weight" in o and "model.embed_tokens.weight" in o
    for key in t:
        assert torch.equal(o[key], t[key] + 0.7 * (i[key] - b[key])), key
    assert shard_keys(out) == shard_keys(target)
    assert files_of(out)["model.safetensors.index.json"] == files_of(target)["model.safetensors.index.json"]


def test_chat_vector_computes_in_fp32_and_stores_target_dtype(trio, tmp_path):
    target, base, instruct = trio
    tiny_model(tiny_config("llama"), seed=10).to(torch.bfloat16).save_pretrained(str(tmp_path / "t16"))
    out = chat_vector(str(tmp_path / "t16"), base, instruct, str(tmp_path / "out"))
    t, b, i, o = (tensors_of(p) for p in (str(tmp_path / "t16"), base, instruct, out))
    for key in t:
        assert o[key].dtype == torch.bfloat16
        assert torch.equal(o[key], (t[key].float() + (i[key] - b[key])).bfloat16()), key


def test_chat_vector_skip_keeps_target_tensors(trio, tmp_path):
    target, base, instruct = trio
    skip = ["model.embed_tokens.*", "lm_head.weight", "model.layers.1.*"]
    out = tensors_of(chat_vector(target, base, instruct, str(tmp_path / "out"), skip=skip))
    t, b, i = (tensors_of(p) for p in trio)
    kept = {k for k in t if k.startswith(("model.embed_tokens.", "lm_head.", "model.layers.1."))}
    assert len(kept) > 2
    for key in t:
        expected = t[key] if key in kept else t[key] + (i[key] - b[key])
        assert torch.equal(out[key], expected), key


# ---------------------------------------------------------------------------------------------
# Memory: merge and chat vector stream; peak RSS stays near a shard, far below the model

PEAK_SCRIPT = textwrap.dedent(
    """
    import re, sys
    from elo_ray import surgery

    def status(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

    op, out, *inputs = sys.argv[1:]
    surgery.checkpoint_config(inputs[0])  # imports the config classes before measuring
    open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark
    before = status("VmRSS")
    getattr(surgery, op)(*inputs, out)
    print(status("VmHWM") - before)
    """
)


def peak_rss(op: str, out: str, *inputs: str) -> int:
    """Peak RSS growth of one surgery call in a fresh process (nothing cached from earlier)."""
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, op, out, *inputs], capture_output=True, text=True, check=True
    )
    return int(run.stdout.strip().splitlines()[-1])


def test_merge_and_chat_vector_peak_memory_is_about_one_shard(tmp_path):
    config = tiny_config(
        "llama", vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2,
    )
    paths = {}
    for seed, name in enumerate(("target", "base", "instruct")):
        paths[name] = str(tmp_path / name)
        tiny_model(config, seed=seed).save_pretrained(paths[name], max_shard_size="20MB")
    elo = save_detached(paths["base"], (0, -1), str(tmp_path / "elo"))
    sizes = [os.path.getsize(os.path.join(paths["base"], n)) for n in os.listdir(paths["base"]) if n.endswith(".safetensors")]
    assert len(sizes) >= 5
    peaks = {
        "merge": peak_rss("merge", str(tmp_path / "merged"), paths["base"], elo),
        "chat_vector": peak_rss("chat_vector", str(tmp_path / "cv"), paths["target"], paths["base"], paths["instruct"]),
    }
    print("peak RSS growth", peaks, "largest shard", max(sizes), "total", sum(sizes))
    for op, value in peaks.items():
        assert value < 2.5 * max(sizes), (op, value, max(sizes))
        assert value < 0.4 * sum(sizes), (op, value, sum(sizes))
    assert files_of(str(tmp_path / "merged")).keys() == files_of(paths["base"]).keys()
    assert tensors_of(str(tmp_path / "cv")).keys() == tensors_of(paths["target"]).keys()


# ---------------------------------------------------------------------------------------------
# Object storage


def test_detach_merge_and_chat_vector_from_and_to_s3(llama, s3_bucket, tmp_path):
    model, path = llama
    storage.upload(path, f"{s3_bucket}/base")
    remote = detach(f"{s3_bucket}/base", (1, 3)).state_dict()
    local = detach(path, (1, 3)).state_dict()
    assert remote.keys() == local.keys() and all(torch.equal(remote[k], local[k]) for k in local)

    elo = save_detached(f"{s3_bucket}/base", (1, 3), f"{s3_bucket}/elo")
    assert checkpoint_config(elo).elo_layers == [1, 3]
    merged = merge(f"{s3_bucket}/base", elo, f"{s3_bucket}/runs/merged")
    assert merged == f"{s3_bucket}/runs/merged"
    assert storage.listdir(f"{s3_bucket}/runs") == ["merged"]  # no staging prefix left behind
    assert files_of(storage.download(merged, str(tmp_path / "merged"))) == files_of(path)

    cv = chat_vector(f"{s3_bucket}/base", f"{s3_bucket}/base", merged, f"{s3_bucket}/cv", scale=2.0)
    assert files_of(storage.download(cv, str(tmp_path / "cv"))) == files_of(path)
    with pytest.raises(SurgeryError, match="already holds a checkpoint"):
        merge(f"{s3_bucket}/base", elo, merged)


# ---------------------------------------------------------------------------------------------
# Bad input: each error says what was wrong and what to do, and nothing is written


@pytest.mark.parametrize(
    "layers, message",
    [
        ((0, 4), r"layer index 4 is out of range for a model with 4 decoder layers; use 0..3 or -4..-1"),
        ((-5,), r"layer index -5 is out of range"),
        ((1, 1), r"layer 1 is listed twice"),
        ((3, -1), r"layer 3 is listed twice"),
        ((3, 0), r"increasing order .* use \(0, 3\)"),
        ((), r"layers is empty"),
        (3, r"sequence of layer indices"),
        ((0, 1.5), r"not an integer"),
    ],
)
def test_bad_layer_sets_are_refused(llama, layers, message):
    with pytest.raises(SurgeryError, match=message):
        validate_layers(4, layers)
    with pytest.raises(SurgeryError, match=message):
        detach(llama[1], layers)


def test_validate_layers_normalises_negative_indices():
    assert validate_layers(32, (0, -1)) == (0, 31)
    assert validate_layers(4, [-4, -2, 3]) == (0, 2, 3)


def test_architecture_without_model_layers_is_refused(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(SurgeryError, match=r"gpt2 model whose decoder layers are not at model.layers.*llama, mistral"):
        detach(str(tmp_path / "gpt2"))
    with pytest.raises(SurgeryError, match=r"not at model.layers"):
        merge(str(tmp_path / "gpt2"), str(tmp_path / "gpt2"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_or_pickled_weights_are_refused(llama, tmp_path):
    model, path = llama
    model.config.save_pretrained(str(tmp_path / "config-only"))
    with pytest.raises(SurgeryError, match=r"holds no weights .*save_pretrained"):
        detach(str(tmp_path / "config-only"))

    model.config.save_pretrained(str(tmp_path / "pickled"))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(SurgeryError, match=r"only pickle weights \(pytorch_model.bin\).*never"):
        detach(str(tmp_path / "pickled"))

    with pytest.raises(SurgeryError, match=r"does not exist"):
        detach(str(tmp_path / "nowhere"))
    (tmp_path / "no-config").mkdir()
    with pytest.raises(SurgeryError, match=r"no config.json"):
        detach(str(tmp_path / "no-config"))


def test_a_missing_shard_is_named(llama, tmp_path):
    import shutil

    shutil.copytree(llama[1], tmp_path / "base")
    shards = sorted(n for n in os.listdir(tmp_path / "base") if n.endswith(".safetensors"))
    os.remove(tmp_path / "base" / shards[1])
    with pytest.raises(SurgeryError, match=rf"{shards[1]}.*missing"):
        detach(str(tmp_path / "base"))


def test_merge_refuses_an_elo_model_of_another_base(saved, tmp_path):
    llama_path = saved["llama"][1]
    with pytest.raises(SurgeryError, match=r"no elo_layers.*save_detached"):
        merge(llama_path, llama_path.replace("llama", "llama-tied"), str(tmp_path / "out"))

    qwen_elo = save_detached(saved["qwen2"][1], (0, -1), str(tmp_path / "qwen-elo"))
    with pytest.raises(SurgeryError, match=r"is a qwen2 model but base .* is llama"):
        merge(llama_path, qwen_elo, str(tmp_path / "out"))

    wide = str(tmp_path / "wide")
    tiny_model(tiny_config("llama", hidden_size=64), seed=0).save_pretrained(wide)
    wide_elo = save_detached(wide, (0, -1), str(tmp_path / "wide-elo"))
    with pytest.raises(SurgeryError, match=r"hidden_size is 64 in the ELO model .* but 32 in base"):
        merge(llama_path, wide_elo, str(tmp_path / "out"))

    deep = str(tmp_path / "deep")
    tiny_model(tiny_config("llama", num_hidden_layers=6), seed=0).save_pretrained(deep)
    deep_elo = save_detached(deep, (0, 5), str(tmp_path / "deep-elo"))
    with pytest.raises(SurgeryError, match=r"detached from a 6-layer model but base .* has 4 layers"):
        merge(llama_path, deep_elo, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_chat_vector_refuses_shape_mismatch_and_names_the_tensor(trio, tmp_path):
    target, base, _ = trio
    bigger = str(tmp_path / "bigger-vocab")
    tiny_model(tiny_config("llama", vocab_size=300), seed=0).save_pretrained(bigger)
    with pytest.raises(SurgeryError) as err:
        chat_vector(target, base, bigger, str(tmp_path / "out"))
    message = str(err.value)
    assert "model.embed_tokens.weight has shape [256, 32] in target, [256, 32] in base and [300, 32] in instruct" in message
    assert "lm_head.weight has shape [256, 32] in target, [256, 32] in base and [300, 32] in instruct" in message
    assert "skip=['lm_head.weight', 'model.embed_tokens.weight']" in message
    assert not (tmp_path / "out").exists()
    out = chat_vector(target, base, bigger, str(tmp_path / "out"), skip=["model.embed_tokens.weight", "lm_head.weight"])
    assert torch.equal(tensors_of(out)["lm_head.weight"], tensors_of(target)["lm_head.weight"])


def test_skip_patterns_that_match_no_tensor_are_refused_with_the_names_meant(trio, tmp_path):
    target, base, instruct = trio
    with pytest.raises(SurgeryError) as err:
        chat_vector(target, base, instruct, str(tmp_path / "out"), skip=["lm_head.weight", "embed_tokens"])
    assert str(err.value) == (
        "skip pattern 'embed_tokens' matches no tensor of target, base or instruct: a pattern must match whole "
        "tensor names (fnmatch); tensors named like it: model.embed_tokens.weight; write 'model.embed_tokens.*'"
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(SurgeryError, match=(
        r"skip pattern 'q_proj' .* tensors named like it: model.layers.0.self_attn.q_proj.weight, "
        r"model.layers.1.self_attn.q_proj.weight, model.layers.2.self_attn.q_proj.weight \(and 1 more\); "
        r"write 'model.layers.0.self_attn.q_proj.\*' or '\*q_proj\*' \(all 4\)$"
    )):
        chat_vector(target, base, instruct, str(tmp_path / "out"), skip="q_proj")
    with pytest.raises(SurgeryError, match=rf"skip pattern 'decoder.\*' matches no tensor of {base}: .* the tensors are named like \S+"):
        check_skip_patterns(["decoder.*"], base)
    check_skip_patterns(["model.embed_tokens.*", "*q_proj*", "lm_head.weight"], base, instruct)  # all match


def test_chat_vector_refuses_missing_tensors(trio, saved, tmp_path):
    target, base, instruct = trio
    tied = saved["llama-tied"][1]  # stores no lm_head.weight
    with pytest.raises(SurgeryError, match=r"lm_head.weight is in target .* but missing from base .*skip=\['lm_head.weight'\]"):
        chat_vector(target, tied, instruct, str(tmp_path / "out"))
    with pytest.raises(SurgeryError, match=r"lm_head.weight is in base .* but missing from target"):
        chat_vector(tied, base, instruct, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_output_holding_a_checkpoint_is_refused_unless_overwrite(llama, tmp_path):
    _, path = llama
    elo = save_detached(path, (0, -1), str(tmp_path / "elo"))
    out = str(tmp_path / "merged")
    merge(path, elo, out)
    with open(os.path.join(out, "config.json")) as f:
        before = f.read()
    with pytest.raises(SurgeryError, match=r"already holds a checkpoint; pass overwrite=True"):
        merge(path, elo, out)
    with pytest.raises(SurgeryError, match=r"already holds a checkpoint"):
        save_detached(path, (0, 1), elo)
    with pytest.raises(SurgeryError, match=r"is also an input"):
        merge(path, elo, path, overwrite=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(SurgeryError, match=r"holds other files \(todo.txt\)"):
        merge(path, elo, str(tmp_path / "notes"), overwrite=True)
    (tmp_path / "nested" / "keep").mkdir(parents=True)
    with pytest.raises(SurgeryError, match=r"holds other files \(keep\)"):
        merge(path, elo, str(tmp_path / "nested"), overwrite=True)
    assert (tmp_path / "nested" / "keep").is_dir()
    assert merge(path, elo, out, overwrite=True) == out
    (tmp_path / "empty").mkdir()
    assert files_of(merge(path, elo, str(tmp_path / "empty"))) == files_of(path)
    assert open(os.path.join(out, "config.json")).read() == before
    assert files_of(out) == files_of(path)
    assert sorted(os.listdir(tmp_path)) == ["elo", "empty", "merged", "nested", "notes"]  # no staging left


def test_truncated_shard_is_refused_before_writing(llama, tmp_path):
    _, path = llama
    elo = save_detached(path, (0, -1), str(tmp_path / "elo"))
    weights = os.path.join(elo, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    with pytest.raises(SurgeryError, match=r"model.safetensors holds \d+ bytes but its header describes \d+: the file is truncated"):
        merge(path, elo, str(tmp_path / "merged"))
    assert sorted(os.listdir(tmp_path)) == ["elo"]


@pytest.mark.parametrize("remote", [False, True], ids=["local", "s3"])
def test_merge_failing_midway_leaves_nothing_at_out(llama, tmp_path, monkeypatch, request, remote):
    from elo_ray import surgery

    _, path = llama
    root = request.getfixturevalue("s3_bucket") if remote else str(tmp_path)
    elo = save_detached(path, (0, -1), storage.join(root, "elo"))
    real, calls = surgery._stream_shard, []

    def crash_on_third_shard(*args):  # as if the disk filled up or the network dropped
        calls.append(args[2])
        if len(calls) == 3:
            raise OSError("No space left on device")
        real(*args)

    monkeypatch.setattr(surgery, "_stream_shard", crash_on_third_shard)
    with pytest.raises(OSError, match="No space left"):
        merge(path, elo, storage.join(root, "merged"))
    assert len(calls) == 3
    assert storage.listdir(root) == ["elo"]  # neither out nor the staging directory
