"""Hugging Face checkpoint I/O, as a specification: the reader's ranged reads, and the writer's
staging - what a reader of the output sees during an object-store overwrite, and staging left by
a killed writer swept by the next writer of the same output (but never a live writer's).

Checkpoints are tiny models built from configs; the S3 tests use the real moto server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file

from elo_ray import processes, storage
from elo_ray.hf_checkpoint import CheckpointReader, CheckpointWriter, writer
from elo_ray.hf_checkpoint.writer import STAGING_MARKER
from elo_ray.surgery import detach, merge
from elo_ray.tiny import tiny_config, tiny_model


def files_at(uri: str) -> dict[str, bytes]:
    """Every file directly under `uri` with its bytes; a writer's marker is left out."""
    return {n: storage.read_bytes(storage.join(uri, n)) for n in storage.listdir(uri, files_only=True) if n != STAGING_MARKER}


def tensors_of(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


# ---------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("where", ["local", "s3"])
def test_reader_reads_tensors_whole_by_rows_and_in_chunks_as_stored(tmp_path, request, where):
    path = str(tmp_path / "bf16")
    tiny_model(tiny_config("llama"), seed=0).to(torch.bfloat16).save_pretrained(path, max_shard_size="20KB")
    expected = tensors_of(path)
    uri = path
    if where == "s3":
        uri = request.getfixturevalue("s3_bucket") + "/bf16"
        storage.upload(path, uri)
    with CheckpointReader(uri) as reader:
        assert len(reader.shard_names) > 2 and reader.index is not None
        assert sorted(reader.names()) == sorted(expected)
        for key, tensor in expected.items():
            assert reader.dtype(key) == torch.bfloat16 and reader.shape(key) == list(tensor.shape), key
            assert torch.equal(reader.read(key), tensor), key
            assert torch.equal(reader.rows(key, 1, 3), tensor[1:3]), key
            assert torch.equal(reader.read_chunk(reader.info(key), 5, 11), tensor.reshape(-1)[5:11]), key


# ---------------------------------------------------------------------------------------------
# Object-store overwrite: a complete checkpoint is readable at every instant


@pytest.fixture(scope="module")
def old_and_new(tmp_path_factory):
    """Inputs of two merges into one output: the old result (base's 20KB shards with an index)
    and a new one laid out differently (one file, no index) with other weights."""
    root = tmp_path_factory.mktemp("overwrite")
    model = tiny_model(tiny_config("llama"), seed=4)
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    model.save_pretrained(root / "single")
    elo = detach(str(root / "sharded"))
    elo.save_pretrained(root / "elo-a")
    with torch.no_grad():
        for p in elo.model.layers.parameters():
            p.add_(1.0)
    elo.save_pretrained(root / "elo-b")
    new = merge(str(root / "single"), str(root / "elo-b"), str(root / "new"))
    return {
        "old": (str(root / "sharded"), str(root / "elo-a")),
        "new": (str(root / "single"), str(root / "elo-b")),
        "old_files": files_at(str(root / "sharded")),  # an untrained ELO model merges to base itself
        "new_files": files_at(new),
        "new_dir": new,
    }


def staged(parent: str) -> list[str]:
    return [storage.join(parent, n) for n in storage.listdir(parent) if n.startswith(".merged.tmp-")]


def readable(out: str, old: dict, new: dict) -> list[str]:
    """Which complete checkpoints a reader finds now, and where (at `out` or in a staging
    prefix beside it); fails on a mix at `out` holding config.json (it would look complete)."""
    at_out = files_at(out)
    if "config.json" in at_out:
        assert at_out in (old, new), f"{out} holds config.json and a mix of old and new: {sorted(at_out)}"
    places = [("out", at_out)] + [("staging", files_at(p)) for p in staged(out.rsplit("/", 1)[0])]
    return [f"{'old' if files == old else 'new'} at {name}" for name, files in places if files in (old, new)]


def intercept(monkeypatch, out: str, before) -> list[tuple[str, str]]:
    """Calls `before(change, index)` ahead of every change the S3 client makes under `out` or its
    staging (copy to, or delete); returns the changes made as [(action, what)], what being a
    file name under `out`, `out` itself ("*") or "staging"."""
    fs, out_path = storage.filesystem(out)  # the client the writer uses (fsspec caches it)
    changes: list[tuple[str, str]] = []

    def what(path: str) -> str | None:
        path = path.rstrip("/")
        if path == out_path:
            return "*"
        if path.startswith(out_path + "/"):
            return path[len(out_path) + 1:]
        return "staging" if "/.merged.tmp-" in path and path.count("/") == out_path.count("/") else None

    def wrap(action: str, real, target_arg: int):
        def call(*args, **kwargs):
            target = what(args[target_arg])
            if target is not None:
                before((action, target), len(changes))
                changes.append((action, target))
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(fs, "copy", wrap("copy", fs.copy, 1))
    monkeypatch.setattr(fs, "rm", wrap("delete", fs.rm, 0))
    return changes


def test_s3_overwrite_keeps_a_complete_checkpoint_readable_at_every_step(old_and_new, s3_bucket, monkeypatch):
    out = f"{s3_bucket}/runs/merged"
    old, new = old_and_new["old_files"], old_and_new["new_files"]
    merge(*old_and_new["old"], out)
    assert files_at(out) == old
    states = []
    changes = intercept(monkeypatch, out, lambda change, i: states.append((change, readable(out, old, new))))
    merge(*old_and_new["new"], out, overwrite=True)
    states.append(("done", readable(out, old, new)))
    assert files_at(out) == new
    assert storage.listdir(f"{s3_bucket}/runs") == ["merged"]
    assert all(found for _, found in states), f"an instant with no complete checkpoint readable: {states}"
    assert states[0][1] == ["old at out", "new at staging"]  # the new one is complete before out changes
    # out stops being a checkpoint first and becomes one again last; the old files the new one
    # does not hold go after the new ones came; only then is staging removed
    assert changes[0] == ("delete", "config.json")
    assert changes[-2:] == [("copy", "config.json"), ("delete", "staging")]
    copied = [i for i, (action, _) in enumerate(changes) if action == "copy"]
    dropped = [i for i, (action, name) in enumerate(changes) if action == "delete" and name in set(old) - set(new)]
    assert {changes[i][1] for i in dropped} == set(old) - set(new)
    assert max(copied[:-1]) < min(dropped) and max(dropped) < copied[-1]


FAILURES = {  # which change of the overwrite fails, as if the credentials expired midway
    "first-change": lambda change, i: i == 0,
    "second-change": lambda change, i: i == 1,
    "old-file-delete": lambda change, i: change[0] == "delete" and change[1].startswith("model-"),
    "config-copy": lambda change, i: change == ("copy", "config.json"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_s3_overwrite_failing_midway_keeps_the_new_checkpoint_complete_until_the_next_write(
    old_and_new, s3_bucket, monkeypatch, tmp_path, failure
):
    out = f"{s3_bucket}/runs/merged"
    old, new = old_and_new["old_files"], old_and_new["new_files"]
    merge(*old_and_new["old"], out)

    def fail(change, i):
        if FAILURES[failure](change, i):
            raise PermissionError("Access Denied")

    with monkeypatch.context() as patch:
        intercept(patch, out, fail)
        with pytest.raises(storage.StorageError, match=r"replacing .*/runs/merged failed midway \(PermissionError: Access "
                           r"Denied\).* The new checkpoint is complete at s3://.*/runs/\.merged\.tmp-"):
            merge(*old_and_new["new"], out, overwrite=True)
    (staging,) = staged(f"{s3_bucket}/runs")
    assert files_at(staging) == new  # complete, and loadable:
    local = storage.download(staging, str(tmp_path / "staged"), names=list(new))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(local).state_dict()
    expected = tensors_of(old_and_new["new_dir"])
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    if failure == "first-change":
        assert files_at(out) == old  # out untouched
    else:
        assert "config.json" not in files_at(out)  # no checkpoint, rather than a mix

    merge(*old_and_new["new"], out, overwrite=True)  # the next write sweeps the kept staging
    assert files_at(out) == new
    assert storage.listdir(f"{s3_bucket}/runs") == ["merged"]


# ---------------------------------------------------------------------------------------------
# Staging of dead writers is swept by the next writer of the same output; a live writer's is not


STALL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from elo_ray import surgery

    real = surgery._stream_shard

    def stall_after_first_shard(*args):
        real(*args)
        print("staging", flush=True)
        time.sleep(600)

    surgery._stream_shard = stall_after_first_shard
    surgery.merge(*sys.argv[1:], overwrite=True)
    """
)


def stalled_merge(base: str, elo: str, out: str) -> subprocess.Popen:
    """A surgery process that has staged one shard of `out` and is still running."""
    proc = subprocess.Popen([sys.executable, "-c", STALL_SCRIPT, base, elo, out], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "staging"
    return proc


def stagings(parent) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n)


def test_staging_of_a_sigkilled_surgery_is_swept_by_the_next_run_and_a_live_ones_is_not(old_and_new, tmp_path):
    base, elo = old_and_new["old"]
    out = str(tmp_path / "merged")
    live = stalled_merge(base, elo, out)
    try:
        (theirs,) = stagings(tmp_path)
        assert theirs.startswith(".merged.tmp-")
        merge(base, elo, out)  # a concurrent writer of the same output
        assert stagings(tmp_path) == [theirs]  # the live writer's staging is left alone
    finally:
        live.kill()
        live.wait()

    assert stagings(tmp_path) == [theirs]  # killed: nobody has written `out` since
    killed = stalled_merge(base, elo, out)  # its writer sweeps `theirs` first
    (staging,) = stagings(tmp_path)
    assert staging != theirs
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert stagings(tmp_path) == [staging]
    assert merge(base, elo, out, overwrite=True) == out
    assert sorted(os.listdir(tmp_path)) == ["merged"]
    assert files_at(out) == old_and_new["old_files"]


def marker_of(holder: dict, out: str) -> bytes:
    return json.dumps({**holder, "out": out}).encode()


def dead_process() -> dict:
    """The identity of a process of this host that has ended."""
    run = subprocess.run(
        [sys.executable, "-c", "import json; from elo_ray import processes; print(json.dumps(processes.identity()))"],
        capture_output=True, text=True, check=True,
    )
    return json.loads(run.stdout)


def test_stale_staging_on_s3_is_swept_by_the_next_write_of_that_output_only(old_and_new, s3_bucket, monkeypatch):
    runs, out = f"{s3_bucket}/runs", f"{s3_bucket}/runs/merged"
    elsewhere = {**processes.identity(), "host": "another-host", "pid": 1}
    left = {
        ".merged.tmp-dead0001": marker_of(dead_process(), out),
        ".merged.tmp-live0001": marker_of(processes.identity(), out),  # this very process
        ".merged.tmp-away0001": marker_of(elsewhere, out),  # fresh, so maybe alive
        ".other.tmp-dead0002": marker_of(dead_process(), f"{runs}/other"),
    }
    for name, marker in left.items():
        storage.write_bytes(f"{runs}/{name}/{STAGING_MARKER}", marker)
        storage.write_bytes(f"{runs}/{name}/model-00001-of-00002.safetensors", b"half a shard")
    merge(*old_and_new["old"], out)
    assert storage.listdir(runs) == [".merged.tmp-away0001", ".merged.tmp-live0001", ".other.tmp-dead0002", "merged"]

    monkeypatch.setattr(writer, "STALE_AFTER_S", 1.0)
    time.sleep(2.5)  # nobody refreshes those markers: older than STALE_AFTER_S now
    merge(*old_and_new["old"], out, overwrite=True)
    assert storage.listdir(runs) == [".other.tmp-dead0002", "merged"]
    assert files_at(out) == old_and_new["old_files"]


def test_a_live_writer_refreshes_its_staging_marker(s3_bucket, monkeypatch):
    monkeypatch.setattr(writer, "HEARTBEAT_S", 0.3)
    output = CheckpointWriter(f"{s3_bucket}/runs/merged")
    fs, _ = storage.filesystem(output.staging)
    marker = output.uri(STAGING_MARKER)
    first = writer._mtime(fs, storage.filesystem(marker)[1])
    time.sleep(2.2)  # S3 keeps whole seconds
    assert writer._mtime(fs, storage.filesystem(marker)[1]) > first
    assert json.loads(storage.read_bytes(marker))["pid"] == os.getpid()
    output.abort()
    assert storage.listdir(f"{s3_bucket}/runs") == []
