"""Models by Hub id (`hf://ORG/NAME[@REVISION]`), offline: a Hugging Face cache built by hand
and HF_HUB_OFFLINE=1. Names resolve once per run to plain locations (the local cache, or a copy
under the storage root on object storage), commits are pinned for the run, `validate` reads no
weights, and a missing repo or revision is an error naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elo_ray import hub, locations, pipeline, storage, surgery
from elo_ray.config import spec_from_dict
from elo_ray.pipeline import StageResult
from elo_ray.tiny import tiny_config, tiny_model
from elo_ray.validate import validate
from hubcache import add_snapshot

REPO = "elo-test/tiny-llama"
C1, C2 = "1" * 40, "2" * 40


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """A 4-layer model sharded with an index (as 7-8B models are) and its tokenizer; a
    retrained one (the next commit); and a repository holding only pickle weights."""
    root = tmp_path_factory.mktemp("hub-src")
    for name, seed in (("v1", 1), ("v2", 2)):
        model = tiny_model(tiny_config(num_hidden_layers=4, vocab_size=len(tiny_tokenizer)), seed=seed)
        model.save_pretrained(root / name, max_shard_size="40KB")
        tiny_tokenizer.save_pretrained(root / name)
    (root / "v1" / "pytorch_model.bin").write_bytes(b"pickle weights elo-ray must never copy")
    (root / "bin-only").mkdir()
    (root / "bin-only" / "config.json").write_text((root / "v1" / "config.json").read_text())
    (root / "bin-only" / "pytorch_model.bin").write_bytes(b"pickle")
    return {"root": root, "v1": root / "v1", "v2": root / "v2", "bin-only": root / "bin-only"}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_dirs) -> Path:
    """An offline Hugging Face cache holding REPO at C1 (main) and the pickle-only repo."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    add_snapshot(cache, REPO, tiny_dirs["v1"], C1)
    add_snapshot(cache, "elo-test/bin-only", tiny_dirs["bin-only"], "3" * 40)
    return cache


def spec(root: str, base: str = f"hf://{REPO}", **extra):
    raw = {"storage": {"root": root}, "model": {"base": base, **extra},
           "pretrain": {"data": {"seq_len": 128, "sources": [{"uri": "builtin:corpus/en.jsonl", "language": "en"}]}}}
    return spec_from_dict(raw)


def test_hub_ids_parse_with_and_without_a_revision():
    assert hub.parse("hf://meta-llama/Llama-3.1-8B") == hub.HubRef("meta-llama/Llama-3.1-8B", "main")
    assert hub.parse("hf://Qwen/Qwen2-7B@v1.0") == hub.HubRef("Qwen/Qwen2-7B", "v1.0")
    assert str(hub.parse("hf://gpt2")) == "hf://gpt2@main"
    for bad in ("hf://", "hf://a/b/c", "hf://a b/c", "hf://a/b@"):
        with pytest.raises(ValueError, match="hf://ORG/NAME|empty revision"):
            hub.parse(bad)


def test_local_root_resolves_to_the_cached_snapshot_and_pins_the_commit(hub_cache, tmp_path):
    run = str(tmp_path / "runs" / "r1")
    resolved = locations.resolve(spec(str(tmp_path / "runs")), run)
    snapshot = str(hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / C1)
    assert resolved.model.base == snapshot and resolved.model.tokenizer == snapshot
    assert resolved.pretrain.data.sources[0].uri.endswith("elo_ray/corpus/en.jsonl")  # builtin data, too
    pins = json.loads(storage.read_text(f"{run}/resolved.json"))
    assert pins["model.base"] == {"name": f"hf://{REPO}", "commit": C1, "location": snapshot}


def test_a_rerun_keeps_the_runs_commit_after_main_moved(hub_cache, tiny_dirs, tmp_path):
    root = str(tmp_path / "runs")
    first = locations.resolve(spec(root), f"{root}/r1")
    add_snapshot(hub_cache, REPO, tiny_dirs["v2"], C2)  # main now points at a retrained model
    again = locations.resolve(spec(root), f"{root}/r1")
    fresh = locations.resolve(spec(root), f"{root}/r2")
    assert again.model.base == first.model.base and first.model.base.endswith(C1)
    assert fresh.model.base.endswith(C2)


def test_object_storage_root_gets_one_copy_of_the_model_without_pickle_weights(hub_cache, tiny_dirs, s3_bucket):
    root = f"{s3_bucket}/elo"
    resolved = locations.resolve(spec(root, instruct=f"hf://{REPO}@main"), f"{root}/r1")
    copy = f"{root}/_hub/elo-test--tiny-llama/{C1}"
    assert resolved.model.base == resolved.model.instruct == resolved.model.tokenizer == copy
    names = storage.listdir(copy)
    expected = sorted(p.name for p in tiny_dirs["v1"].iterdir() if p.suffix != ".bin") + [".complete-model"]
    assert sorted(names) == sorted(expected) and "model.safetensors.index.json" in names
    for name in names:
        if name.endswith(".safetensors"):
            assert storage.read_bytes(f"{copy}/{name}") == (tiny_dirs["v1"] / name).read_bytes()
    # every node reads it like any checkpoint: surgery detaches layers from the copy
    elo = surgery.detach(copy, (0, -1))
    base = {}
    for f in tiny_dirs["v1"].glob("*.safetensors"):
        base.update(load_file(f))
    assert torch.equal(elo.state_dict()["model.layers.1.mlp.up_proj.weight"], base["model.layers.3.mlp.up_proj.weight"])


def test_missing_repo_and_revision_are_errors_naming_them(hub_cache, tmp_path):
    root = str(tmp_path / "runs")
    with pytest.raises(hub.HubError) as e:
        locations.resolve(spec(root, base="hf://elo-test/no-such-model"), f"{root}/r")
    assert "hf://elo-test/no-such-model@main: not in the Hugging Face cache and HF_HUB_OFFLINE=1" in str(e.value)
    assert "hf download elo-test/no-such-model --revision main" in str(e.value)
    with pytest.raises(hub.HubError) as e:
        locations.resolve(spec(root, base=f"hf://{REPO}@v9"), f"{root}/r")
    assert f"hf://{REPO}@v9: not in the Hugging Face cache" in str(e.value)
    assert f"the cache holds {REPO} at main, {C1}" in str(e.value)


def test_validate_reads_a_hub_model_without_its_weights(hub_cache, tmp_path):
    snapshot = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / C1
    shards = sorted(snapshot.glob("*.safetensors"))
    assert len(shards) > 1
    for shard in shards:  # weights that cannot be read: validate must not need them
        shard.unlink()
        shard.symlink_to("../../blobs/not-downloaded")
    assert validate(spec(str(tmp_path / "runs"))).problems == []
    bad = validate(spec(str(tmp_path / "runs"), base="hf://elo-test/bin-only")).problems
    assert bad == ["model.base: hf://elo-test/bin-only: the cached snapshot at commit 3333333333333333333333333333333333333333 "
                   "holds no *.safetensors weights; elo-ray never loads pickle weights (*.bin): pick a repository "
                   "or revision with safetensors"]
    missing = validate(spec(str(tmp_path / "runs"), base="hf://elo-test/absent")).problems
    assert missing[0].startswith("model.base: hf://elo-test/absent@main: not in the Hugging Face cache")


def test_stages_see_only_locations(hub_cache, tmp_path):
    """The pipeline resolves names once, before the first stage; stage functions get locations."""
    seen = []

    def pretrain(ctx):
        seen.append((ctx.spec.model.base, ctx.spec.model.tokenizer, ctx.spec.pretrain.data.sources[0].uri))
        return StageResult()

    s = spec(str(tmp_path / "runs"))
    s.merge.enabled = s.align.enabled = s.eval.enabled = False
    pipeline.run_pipeline(s, "r1", {"pretrain": pretrain})
    [(base, tokenizer, source)] = seen
    assert base == tokenizer and base.endswith(f"snapshots/{C1}")
    assert not source.startswith("builtin:") and source.endswith("en.jsonl")
