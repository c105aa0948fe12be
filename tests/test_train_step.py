"""The faster training step computes what the plain one does: the chunked linear cross-entropy
(loss and gradients), frozen parameters kept outside FSDP (two gloo ranks, same losses and
trained weights as when FSDP shards them), their export as stored, and compiled layers."""

from __future__ import annotations


import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import transformers

from elo_ray.config import TrainConfig
from elo_ray.tiny import tiny_config, tiny_model
from elo_ray.train import TrainingError, export
from elo_ray.train import loss as loss_lib
from elo_ray.train import model as model_lib
from elo_ray.train.optim import build_optimizer
from elo_ray.train.step import check_batches, train_step

VOCAB, SEQ, STEPS = 96, 24, 3


def plain_reference(hidden, weight, targets, softcap=None):
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


def grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    (out * 0.37).backward()  # a scale other than 1: backward must use the incoming gradient
    return out.detach(), [t.grad.clone() if t.grad is not None else None for t in tensors]


# --------------------------------------------------------------------------- the chunked loss


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("head_trains", [True, False])
def test_chunked_loss_and_gradients_equal_the_plain_path(softcap, head_trains):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(53, 16, generator=gen).requires_grad_()
    weight = torch.randn(VOCAB, 16, generator=gen).requires_grad_(head_trains)
    targets = torch.randint(0, VOCAB, (53,), generator=gen)
    targets[::4] = -100  # ignored labels carry no loss and no gradient
    want, (gh_want, gw_want) = grads(lambda: plain_reference(hidden, weight, targets, softcap), hidden, weight)
    # 53 tokens in chunks of 8: the last chunk is short
    got, (gh, gw) = grads(lambda: loss_lib.linear_cross_entropy(hidden, weight, targets, 8, softcap), hidden, weight)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(gh, gh_want, rtol=1e-5, atol=1e-6)
    assert gh[::4].abs().sum() == 0 and gh[1::4].abs().min() > 0  # ignored rows: no gradient
    if head_trains:
        torch.testing.assert_close(gw, gw_want, rtol=1e-5, atol=1e-6)
    else:
        assert gw is None and gw_want is None


def test_chunked_loss_of_only_ignored_labels_is_zero_with_zero_gradients():
    hidden = torch.randn(10, 8).requires_grad_()
    weight = torch.randn(VOCAB, 8).requires_grad_()
    loss, (gh, gw) = grads(lambda: loss_lib.linear_cross_entropy(hidden, weight, torch.full((10,), -100), 4),
                           hidden, weight)
    assert loss.item() == 0.0 and gh.abs().sum() == 0 and gw.abs().sum() == 0


@pytest.mark.parametrize("method", ["full", "elo"])
def test_model_loss_by_chunks_equals_the_logits_path_for_every_gradient(method):
    config = tiny_config(num_hidden_layers=2, vocab_size=VOCAB, tie_word_embeddings=True)
    model = tiny_model(config).train()
    if method == "elo":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("model.layers."))
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(2))
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    params = [p for p in model.parameters() if p.requires_grad]
    want, want_grads = grads(lambda: loss_lib.summed_loss(model, ids, targets, "plain"), *params)
    got, got_grads = grads(lambda: loss_lib.summed_loss(model, ids, targets, "chunked", chunk_tokens=10), *params)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)
    for p, g, w in zip(params, got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert len(model._forward_hooks) == 0 and len(model.model._forward_hooks) == 0  # the hook is gone


def test_loss_auto_is_chunked_on_cpu_and_liger_there_is_an_error():
    assert loss_lib.resolve("auto", torch.device("cpu")) == "chunked"
    assert loss_lib.resolve("plain", torch.device("cpu")) == "plain"
    with pytest.raises(ValueError, match="train.loss is liger, but .*use loss: chunked"):
        loss_lib.resolve("liger", torch.device("cpu"))


# --------------------------------------------------------------------------- frozen parameters outside FSDP


def _two_ranks(rank: int, store: str, models: dict, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(10 + rank)  # each rank its own batches
    batches = [torch.randint(0, VOCAB, (2, SEQ), generator=gen) for _ in range(STEPS)]
    results = {}
    for variant, (model_key, settings) in VARIANTS.items():
        train = TrainConfig(lr=1e-2, seed=0, **settings)
        stage = model_lib.build(models[model_key], train, torch.device("cpu"), mesh)
        optimizer = build_optimizer(stage.module, train, torch.device("cpu"))
        losses = []
        for ids in batches:
            micro = [{"input_ids": ids, "labels": ids}]
            stats = check_batches(micro, stage.config, 1, torch.device("cpu"))
            losses.append(train_step(stage.module, optimizer, micro, stats, 1.0, torch.device("cpu"), 2, stage.loss).loss)
        state = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                 for n, p in stage.module.named_parameters()}
        replicated = sorted(n for n, p in stage.module.named_parameters() if not isinstance(p, DTensor))
        results[variant] = {"losses": losses, "state": state, "replicated": replicated}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


VARIANTS = {
    "elo sharded": ("elo", dict(method="elo", frozen_params="shard", loss="plain")),
    "elo replicated": ("elo", dict(method="elo", frozen_params="replicate", loss="plain")),
    "elo replicated chunked": ("elo", dict(method="elo", loss="chunked", loss_chunk_tokens=16)),
    "lora sharded": ("base", dict(method="lora", frozen_params="shard", loss="plain")),
    "lora replicated chunked": ("base", dict(method="lora", loss="chunked", loss_chunk_tokens=16)),
    "full": ("base", dict(method="full", loss="plain")),
    "full chunked": ("base", dict(method="full", loss="chunked", loss_chunk_tokens=16)),
}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Three steps of each variant on two gloo ranks (one process each), rank 0's results."""
    root = tmp_path_factory.mktemp("two-ranks")
    elo = tiny_config(num_hidden_layers=2, vocab_size=VOCAB)
    elo.elo_layers = [0, 3]
    tiny_model(elo, seed=3).save_pretrained(root / "elo")
    # tied: the head is the embedding, trained (full) or frozen (lora) through both uses
    tiny_model(tiny_config(num_hidden_layers=2, vocab_size=VOCAB, tie_word_embeddings=True), seed=4).save_pretrained(root / "base")
    models = {"elo": str(root / "elo"), "base": str(root / "base")}
    mp.spawn(_two_ranks, args=(str(root / "store"), models, str(root / "out.pt")), nprocs=2, join=True)
    return torch.load(root / "out.pt")


def assert_same_training(a: dict, b: dict, weights_atol: float = 1e-6) -> None:
    assert len(a["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-6, atol=1e-6)
    assert sorted(a["state"]) == sorted(b["state"])
    for name, t in a["state"].items():
        torch.testing.assert_close(b["state"][name], t, rtol=0, atol=weights_atol, msg=name)


def test_frozen_embedding_norm_and_head_outside_fsdp_train_as_when_sharded(two_rank_runs):
    sharded, replicated = two_rank_runs["elo sharded"], two_rank_runs["elo replicated"]
    assert sharded["replicated"] == []
    assert replicated["replicated"] == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert_same_training(sharded, replicated)
    assert sharded["losses"][-1] < sharded["losses"][0]  # it trained


def test_chunked_loss_trains_as_the_plain_loss_on_two_ranks(two_rank_runs):
    # Summing in another order moves the last bits of a gradient, and AdamW's first steps turn
    # the sign of a near-zero gradient into a whole lr-sized step (lr 1e-2): weights within 1% of lr.
    assert_same_training(two_rank_runs["elo sharded"], two_rank_runs["elo replicated chunked"], weights_atol=1e-4)
    # full: the (tied) head is trained and sharded; its gradient comes through the chunked loss
    assert_same_training(two_rank_runs["full"], two_rank_runs["full chunked"], weights_atol=1e-4)
    lora = two_rank_runs["lora replicated chunked"]
    assert lora["replicated"] == ["base_model.model.model.embed_tokens.weight", "base_model.model.model.norm.weight"]
    assert_same_training(two_rank_runs["lora sharded"], lora, weights_atol=1e-4)


# --------------------------------------------------------------------------- bf16 copies and export


def test_bf16_run_holds_frozen_params_in_bf16_and_exports_them_as_stored(one_rank, tmp_path):
    config = tiny_config(num_hidden_layers=2, vocab_size=VOCAB)
    config.elo_layers = [0, 3]
    original = tiny_model(config, seed=5)
    original.save_pretrained(tmp_path / "in")  # fp32
    stage = model_lib.build(str(tmp_path / "in"), TrainConfig(method="elo", precision="bf16"), torch.device("cpu"), one_rank)
    frozen = dict(stage.module.named_parameters())
    assert frozen["model.embed_tokens.weight"].dtype == torch.bfloat16 == frozen["lm_head.weight"].dtype
    assert frozen["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32  # the trained layers' master copy
    export.export(stage.module, str(tmp_path / "in"), str(tmp_path / "out"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto").state_dict()
    for name, tensor in original.state_dict().items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor), name  # not rounded through bf16


def test_liger_on_a_cpu_worker_is_a_training_error(one_rank, tmp_path):
    tiny_model(tiny_config(num_hidden_layers=1)).save_pretrained(tmp_path)
    with pytest.raises(TrainingError, match="train.loss is liger"):
        model_lib.build(str(tmp_path), TrainConfig(loss="liger"), torch.device("cpu"), one_rank)


# --------------------------------------------------------------------------- compiled layers


def test_compiled_layers_keep_parameter_names_and_give_the_same_loss_and_gradients(one_rank, tmp_path):
    # aot_eager traces forward and backward as inductor does, without generating C++ (minutes here);
    # benchmarks/gpu_check.py runs the inductor default on the GPU.
    tiny_model(tiny_config(num_hidden_layers=2, vocab_size=VOCAB)).save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(6))
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    out = {}
    for compiled in (False, True):
        config = model_lib.read_config(str(tmp_path))
        model = model_lib.build_meta(config, TrainConfig())
        if compiled:
            model_lib.compile_layers(model, backend="aot_eager")
        model_lib.shard(model, one_rank, None)
        model_lib.materialise(model, str(tmp_path), torch.device("cpu"), 0)
        loss = loss_lib.summed_loss(model, ids, targets, "chunked")
        loss.backward()
        out[compiled] = (loss.detach(), [p.grad.full_tensor() for p in model.parameters()],
                         [n for n, _ in model.named_parameters()])
    assert out[True][2] == out[False][2]
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=1e-6)
    for got, want in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["plain", "chunked"])
def test_the_training_forward_builds_no_kv_cache(impl):
    # A cache made every compiled decoder layer recompile for its layer index on the GPU.
    model = tiny_model(tiny_config(num_hidden_layers=2, vocab_size=VOCAB))
    assert model.config.use_cache  # the checkpoint's own setting, kept for inference
    caches = []
    model.model.register_forward_hook(lambda module, args, output: caches.append(output.past_key_values))
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))
    loss = loss_lib.summed_loss(model, ids, ids, impl)
    assert caches == [None] and torch.isfinite(loss)
