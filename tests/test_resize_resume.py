"""Resume after the cluster changed size. The data plane's part: a stream resumed on another
number of workers starts each language after what all old workers trained, within the reader's
`resume_bound`, on a real Ray Data split. The whole stage, as a user meets it: pretraining
killed on 2 workers, rerun through the pipeline on 1 (the exact weights of such a resume:
tests/test_train.py's test_run_stopped_on_two_workers_resumes_on_one_to_the_same_weights)."""

from __future__ import annotations

import copy
import os
import signal
from importlib import resources

import numpy as np
import pytest

from elo_ray import manifest, pipeline
from elo_ray.config import load_spec
from elo_ray.data import StreamPlan, StreamReader
from elo_ray.data.documents import StreamKind
from elo_ray.stages import STAGES
from drivers import cli, wait_for_checkpoint
from ranks import each_rank

DEMO = str(resources.files("elo_ray") / "demo.yaml")

ROWS = {"en": 800, "ko": 2400}  # asked 1:3
SEQ, BLOCK_ROWS, WINDOW, MICRO = 8, 8, 4, 4


def row_plan(world: int) -> StreamPlan:
    """Rows that name themselves ([language, index, 0, ...]) in blocks of BLOCK_ROWS, split over
    `world` workers by Ray Train's own DataConfig, as the corpus stream is."""
    import ray.data
    import ray.train
    from ray.data import DataContext

    datasets, names = {}, {}
    for code, (lang, n) in enumerate(sorted(ROWS.items())):
        ids = np.zeros((n, SEQ), dtype=np.int64)
        ids[:, 0], ids[:, 1] = code, np.arange(n)
        names[lang] = f"pretrain_{lang}"
        datasets[names[lang]] = ray.data.from_items([{"input_ids": r} for r in ids], override_num_blocks=n // BLOCK_ROWS)
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    config = ray.train.DataConfig(datasets_to_split=list(datasets), execution_options=options,
                                  enable_shard_locality=False)
    shares = {lang: n / sum(ROWS.values()) for lang, n in ROWS.items()}
    quotas = {lang: n // world for lang, n in ROWS.items()}
    reader = StreamReader(kind=StreamKind.PRETRAIN, datasets=names, quotas=quotas, shares=shares, seq_len=SEQ,
                          world_size=world, window=WINDOW, block_rows=BLOCK_ROWS)
    return StreamPlan(datasets, config, reader, sorted(ROWS), shares, quotas, world, SEQ, report={})


def trained_rows(plan: StreamPlan, micro_batches: int | None = None, start: dict | None = None) -> list[list]:
    """Each rank's batches (the first `micro_batches`, or all), the ranks reading concurrently."""
    readers = plan.local_readers()

    def read(rank):
        batches = readers[rank].batches(MICRO, start=start)
        got = [b for _, b in zip(range(micro_batches or 10**9), batches)]
        batches.close()
        return got

    return each_rank(len(readers), read)


def row_ids(ranks: list[list]) -> dict[str, list[int]]:
    langs = sorted(ROWS)
    out = {lang: [] for lang in langs}
    for batches in ranks:
        for b in batches:
            for r in b["input_ids"]:
                out[langs[int(r[0])]].append(int(r[1]))
    return out


@pytest.mark.parametrize("new_world", [1, 3])
def test_a_stream_resumed_on_another_world_size_continues_after_what_was_trained(ray_local, new_world):
    old = trained_rows(row_plan(2), micro_batches=100)  # 2 workers, 800 of the 3200 rows
    before = row_ids(old)
    start = {lang: sum(b["sequences"].get(lang, 0) for batches in old for b in batches) for lang in ROWS}
    assert start == {lang: len(ids) for lang, ids in before.items()} == {"en": 200, "ko": 600}

    resumed = row_plan(new_world)
    after = row_ids(trained_rows(resumed, start=start))
    bound = resumed.reader.resume_bound(old_world=2)
    assert bound == 2 * WINDOW + 3 * (2 + new_world) * BLOCK_ROWS + new_world
    for lang, n in ROWS.items():
        assert len(set(before[lang])) == len(before[lang]) and len(set(after[lang])) == len(after[lang])
        repeated = set(before[lang]) & set(after[lang])
        never = set(range(n)) - set(before[lang]) - set(after[lang])
        print(f"{lang} {2}->{new_world} workers: {len(repeated)} repeated, {len(never)} never read, bound {bound}")
        assert len(repeated) <= bound and len(never) <= bound
        # the ratio holds and the resumed stream ends where the uninterrupted one would have
        assert n - new_world <= len(before[lang]) + len(after[lang]) <= n


# --------------------------------------------------------------------------- the whole stage


@pytest.mark.slow  # three pretraining runs; test_train's resize test proves the resume in one stage run
def test_pretraining_killed_on_two_workers_completes_on_one_with_the_same_tokens_per_language(
        ray_local, demo_base, tmp_path):
    """A spot node lost: the driver is SIGKILLed once pretraining on 2 workers has checkpointed;
    the rerun with resources.num_workers=1 resumes that checkpoint and trains the rest."""
    root = tmp_path / "runs"
    sets = [f"storage.root={root}", f"model.base={demo_base}", "pretrain.data.max_tokens=12288",
            "pretrain.train.checkpoint_every=2", "pretrain.train.log_every=2"]
    whole = pipeline.run_pipeline(load_spec(DEMO, sets), "whole", STAGES, stages=["pretrain"], overridden=True)
    whole = whole["pretrain"].metrics

    args = ["run", "jobs/demo.yaml", "--stages", "pretrain", "--run-id", "resized"]
    victim = cli([*args, *(a for s in sets for a in ("--set", s))],
                 {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address})
    wait_for_checkpoint(root / "resized" / "pretrain" / "ray", victim)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert manifest.read(str(root / "resized" / "pretrain")) is None

    spec = load_spec(DEMO, [*sets, "resources.num_workers=1"])
    resized = pipeline.run_pipeline(spec, "resized", STAGES, stages=["pretrain"], overridden=True)["pretrain"].metrics

    [record] = resized["resumed"]
    assert 2 <= record["from_step"] < whole["step"] == resized["step"] == 12  # 12288 tokens / (8 x 128)
    assert (record["old_world"], record["new_world"]) == (2, 1)
    assert (record["micro_batch_size"], record["grad_accum"]) == (4, 2)  # 8 sequences per step, as before
    assert sum(record["sequences_trained"].values()) == record["from_step"] * 8
    assert record["max_sequences_repeated_or_skipped"] > 0
    assert resized["resumed_from_step"] == record["from_step"] and whole["resumed"] == []
    got, want = resized["data"]["trained_tokens"], whole["data"]["trained_tokens"]
    print(f"trained tokens: uninterrupted {want} shares {whole['data']['trained_shares']}; "
          f"resized {got} shares {resized['data']['trained_shares']}; resumed {record}")
    assert got.keys() == want.keys() == {"en", "ko"}
    for lang in want:
        assert abs(got[lang] - want[lang]) <= 0.02 * want[lang]
        assert abs(resized["data"]["trained_shares"][lang] - whole["data"]["trained_shares"][lang]) <= 0.01
