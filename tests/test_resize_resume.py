"""Resume after the cluster changed size, the data plane's part: a stream resumed on another
number of workers starts each language after what all old workers trained, within the reader's
`resume_bound`, on a real Ray Data split (the training side: tests/test_train.py's
test_run_stopped_on_two_workers_resumes_on_one_to_the_same_weights)."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest

from elo_ray.data import StreamPlan, StreamReader
from elo_ray.data.documents import StreamKind

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
    out, errors = [None] * len(readers), []

    def run(rank):
        try:
            batches = readers[rank].batches(MICRO, start=start)
            out[rank] = [b for _, b in zip(range(micro_batches or 10**9), batches)]
            batches.close()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(readers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


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
