"""The Ray Data side of a stream: one read task per unit, which tokenizes that unit's documents.

Two tasks share one way of turning a unit into rows (`_SEQUENCES`, per stream kind):
- the *count* task (`count_units`) keeps only the unit's `Counts`, one row per unit;
- the *read* task (`sequence_dataset`) yields the rows in blocks of `BLOCK_ROWS`:
  pretrain {input_ids [seq_len], dropped}: documents packed in order, the unit's tail
  (< seq_len tokens, not trained) accounted on its last row as `dropped`;
  chat {input_ids [seq_len], labels [seq_len], tokens}: one conversation per row, padded.
The training pass re-tokenizes the same units with the same code, so it makes exactly the
sequences the count saw.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from elo_ray.data.documents import Counts, StreamKind, read_documents
from elo_ray.data.sources import DataError, Unit
from elo_ray.data.tokens import Packer, cached_encoder, doc_key

log = logging.getLogger(__name__)
BLOCK_ROWS = 256  # sequences per Ray Data block
_DOC_BATCH_CHARS = 1 << 20  # text per tokenizer call

@dataclass(frozen=True)
class ReadJob:
    """What every read task needs besides its unit (small: the encoder goes by object ref)."""

    kind: StreamKind
    encoder: object  # ray.ObjectRef of a DocEncoder (pretrain) or ChatEncoder (chat)
    seq_len: int
    on_bad_record: str
    heldout: frozenset  # doc_key of every held-out document


def _doc_batches(unit: Unit, job: ReadJob, counts: Counts) -> Iterator[list]:
    """Documents of the unit minus the held-out ones, in batches for the tokenizer."""
    batch, size = [], 0
    for doc in read_documents(unit, counts, job.on_bad_record, job.kind):
        if job.heldout and doc_key(doc) in job.heldout:
            counts.heldout += 1
            counts.docs -= 1
            continue
        batch.append(doc)
        size += len(doc) if job.kind is StreamKind.PRETRAIN else sum(len(m["content"]) for m in doc)
        if size >= _DOC_BATCH_CHARS or len(batch) >= 4096:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _packed(unit: Unit, job: ReadJob, counts: Counts) -> Iterator[dict[str, np.ndarray]]:
    """Pretrain rows {input_ids [n, seq_len], dropped [n]}; the tail is counted on the last row."""
    encode = cached_encoder(job.encoder)
    packer = Packer(job.seq_len)
    last = None  # held back until the next one comes: the unit's last rows carry its tail
    for docs in _doc_batches(unit, job, counts):
        ids = encode(docs)
        counts.tokens += sum(len(d) for d in ids)
        seqs = packer.add(ids)
        counts.sequences += len(seqs)
        if len(seqs):
            if last is not None:
                yield last
            last = {"input_ids": seqs, "dropped": np.zeros(len(seqs), dtype=np.int32)}
    counts.dropped = packer.tail
    if last is not None:
        last["dropped"][-1] = packer.tail
        yield last


def _conversations(unit: Unit, job: ReadJob, counts: Counts) -> Iterator[dict[str, np.ndarray]]:
    """Chat rows {input_ids [n, seq_len], labels [n, seq_len], tokens [n]}, one conversation each."""
    encode = cached_encoder(job.encoder)
    for conversations in _doc_batches(unit, job, counts):
        ids, labels, tokens, truncated, empty = encode(conversations)
        counts.tokens += int(tokens.sum())
        counts.sequences += len(ids)
        counts.truncated += truncated
        counts.no_assistant += empty
        counts.docs -= empty
        if len(ids):
            yield {"input_ids": ids, "labels": labels, "tokens": tokens}


_SEQUENCES: dict[StreamKind, Callable[[Unit, ReadJob, Counts], Iterator[dict[str, np.ndarray]]]] = {
    StreamKind.PRETRAIN: _packed,
    StreamKind.CHAT: _conversations,
}


def _table(columns: dict[str, np.ndarray]):
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    return pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim == 2 else pa.array(v) for k, v in columns.items()})


def _blocks(batches: Iterator[dict[str, np.ndarray]]):
    """The rows of `batches`, in order, as tables of BLOCK_ROWS rows (the last one shorter)."""
    pending, rows = [], 0
    for batch in batches:
        pending.append(batch)
        rows += len(batch["input_ids"])
        while rows >= BLOCK_ROWS:
            merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            rest = {k: v[BLOCK_ROWS:] for k, v in merged.items()}
            pending, rows = ([rest] if rows > BLOCK_ROWS else []), rows - BLOCK_ROWS
            yield _table({k: v[:BLOCK_ROWS] for k, v in merged.items()})
    if rows:
        yield _table({k: np.concatenate([p[k] for p in pending]) for k in pending[0]})


def _read_unit(unit: Unit, job: ReadJob):
    """A read task: the unit's sequences, in blocks."""
    yield from _blocks(_SEQUENCES[job.kind](unit, job, Counts()))


def _count_unit(index: int, unit: Unit, job: ReadJob):
    """A count task: one row, the unit's index and its `Counts` (the sequences are made and dropped)."""
    import pyarrow as pa

    counts = Counts()
    for _ in _SEQUENCES[job.kind](unit, job, counts):
        pass
    yield pa.table({"unit": [index], **{k: [v] for k, v in counts.as_dict().items()}})


@functools.cache
def _datasource_class():
    """Defined on first use, so that validating sources and reading held-out sets need no Ray."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class UnitsDatasource(Datasource):
        """One read task per unit, in unit order."""

        def __init__(self, name: str, units: list[Unit], tasks: list[Callable], rows: list[int | None]):
            super().__init__()
            self.name, self.units, self.tasks, self.rows = name, units, tasks, rows

        def get_name(self) -> str:
            return self.name

        def estimate_inmemory_data_size(self) -> int:
            return sum(u.est_bytes for u in self.units) * 2

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [
                ReadTask(task, BlockMetadata(num_rows=rows, size_bytes=int(u.est_bytes * 2), exec_stats=None,
                                             input_files=[u.uri]),
                         per_task_row_limit=per_task_row_limit)
                for u, task, rows in zip(self.units, self.tasks, self.rows)
            ]

    return UnitsDatasource


def _dataset(name: str, units: list[Unit], tasks: list[Callable], rows: list[int | None]):
    import ray.data

    source = _datasource_class()(name, units, tasks, rows)
    # A fixed block count keeps Ray from splitting blocks by cluster size: the blocks, and so the
    # rows each worker's split receives, must not depend on how many CPUs the cluster has.
    return ray.data.read_datasource(source, override_num_blocks=max(1, len(units)))


def sequence_dataset(name: str, units: list[Unit], job: ReadJob, rows: list[int]):
    """The dataset of `units`' sequences in unit order; `rows`: sequences per unit (from the count)."""
    return _dataset(f"elo_ray_{name}", units, [functools.partial(_read_unit, u, job) for u in units], rows)


def count_units(units: list[Unit], job: ReadJob) -> list[Counts]:
    """Every unit's `Counts`, in unit order, from one Ray Data pass (DataErrors come out as raised)."""
    start = time.monotonic()
    tasks = [functools.partial(_count_unit, i, u, job) for i, u in enumerate(units)]
    try:
        rows = _dataset("elo_ray_count", units, tasks, [1] * len(units)).take_all()
    except Exception as e:
        err = _unwrap(e)
        if err is not None:
            raise err from None
        raise
    out = [Counts() for _ in units]
    for r in rows:
        out[r["unit"]] = Counts(**{k: int(r[k]) for k in Counts().as_dict()})
    tokens = sum(c.tokens for c in out)
    took = time.monotonic() - start
    log.info(f"data: counted {tokens:,} tokens in {len(units)} units in {took:.1f}s "
             f"({tokens / max(took, 1e-9) / 1e3:.1f}k tokens/s)")
    return out


def _unwrap(e: BaseException) -> DataError | None:
    """The DataError raised inside a Ray task, if that is what `e` carries."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e) is DataError:
            return e
        cause = getattr(e, "cause", None)
        if isinstance(cause, DataError):
            return DataError(*cause.args)
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None
