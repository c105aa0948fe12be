"""Planning a stream: validate, count, budget, and build one Ray dataset per language.

`plan_pretrain_stream` runs on the driver before training:
1. validate the sources (no Ray), choose the held-out documents, cut the files into units;
2. *count*: one Ray Data pass tokenizes every unit and returns only its numbers (documents,
   skipped records, tokens, full sequences, tail). This costs one extra tokenization of the
   corpus (see benchmarks/ingest.py) and buys: a language with zero tokens fails before any
   GPU starts, epoch budgets are exact, and the schedule length is known to the trainer;
3. budget: sequences per language per worker (`quotas`) from the shares and the budget;
4. build one dataset per language whose read tasks tokenize and pack their unit in order.
The training pass re-tokenizes the same units with the same code, so it makes exactly the
sequences the count saw.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np

from elo_ray.config import ChatDataConfig, DataConfig, resolve_weights
from elo_ray.data.reader import StreamReader
from elo_ray.data.sources import Counts, DataError, Unit, list_files, make_units, read_documents, validate_source
from elo_ray.data.tokens import ChatEncoder, DocEncoder, Packer, cached_encoder, doc_key, load_tokenizer

log = logging.getLogger(__name__)
BLOCK_ROWS = 256  # sequences per Ray Data block
MAX_UNIT_BYTES = 64 << 20
UNITS_PER_LANGUAGE = 256  # enough read tasks to keep a large cluster busy
_DOC_BATCH_CHARS = 1 << 20  # text per tokenizer call
_COUNT_FIELDS = ("docs", "no_text", "bad_records", "non_utf8", "heldout", "tokens", "sequences", "dropped",
                 "truncated", "no_assistant")


def unit_bytes(language_bytes: int, seq_len: int) -> int:
    """Bytes per read unit: large enough that one tail (< seq_len tokens) per unit stays a small
    fraction (about 1000 sequences' worth of text at >= 1 byte per token), small enough for
    parallelism. Depends on the corpus and seq_len only, so units are the same on any cluster."""
    low = 1000 * seq_len
    return int(min(MAX_UNIT_BYTES, max(low, language_bytes // UNITS_PER_LANGUAGE)))


# --------------------------------------------------------------------------- Ray Data read


@dataclass(frozen=True)
class _Job:
    """What every read task needs besides its unit (small: the encoder goes by object ref)."""

    kind: str  # "pretrain" | "chat"
    encoder: object  # ray.ObjectRef of a DocEncoder or ChatEncoder
    seq_len: int
    on_bad_record: str
    heldout: frozenset  # doc_key of every held-out document


def _doc_batches(unit: Unit, job: _Job, counts: Counts):
    """Documents of the unit minus the held-out ones, in batches for the tokenizer."""
    batch, size = [], 0
    for doc in read_documents(unit, counts, job.on_bad_record, chat=job.kind == "chat"):
        if job.heldout and doc_key(doc) in job.heldout:
            counts["heldout"] += 1
            counts["docs"] -= 1
            continue
        batch.append(doc)
        size += len(doc) if isinstance(doc, str) else sum(len(m["content"]) for m in doc)
        if size >= _DOC_BATCH_CHARS or len(batch) >= 4096:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _table(columns: dict):
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    return pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim == 2 else pa.array(v) for k, v in columns.items()})


def _read_unit(index: int, unit: Unit, job: _Job, count_only: bool):
    """A read task: tokenize and pack (or chat-encode) one unit; count_only: one row of numbers."""
    counts = Counts()
    enc = cached_encoder(job.encoder)
    pending: list[dict] = []  # blocks not yet yielded; the last row waits for the unit's tail

    def ready(rows: int):
        while pending and sum(len(p["input_ids"]) for p in pending) > rows:
            merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            out = {k: v[:BLOCK_ROWS] for k, v in merged.items()}
            rest = {k: v[BLOCK_ROWS:] for k, v in merged.items()}
            pending[:] = [rest] if len(rest["input_ids"]) else []
            yield _table(out)

    packer = Packer(job.seq_len) if job.kind == "pretrain" else None
    for docs in _doc_batches(unit, job, counts):
        if packer is not None:
            ids = enc(docs)
            counts["tokens"] += sum(len(d) for d in ids)
            seqs = packer.add(ids)
            counts["sequences"] += len(seqs)
            if not count_only and len(seqs):
                pending.append({"input_ids": seqs, "dropped": np.zeros(len(seqs), dtype=np.int32)})
        else:
            ids, labels, tokens, truncated, empty = enc(docs)
            counts["tokens"] += int(tokens.sum())
            counts["sequences"] += len(ids)
            counts["truncated"] += truncated
            counts["no_assistant"] += empty
            counts["docs"] -= empty
            if not count_only and len(ids):
                pending.append({"input_ids": ids, "labels": labels, "tokens": tokens})
        if not count_only:
            yield from ready(BLOCK_ROWS)  # keeps >= 1 row back while more may come
    if packer is not None:
        counts["dropped"] = packer.tail
    if count_only:
        import pyarrow as pa

        yield pa.table({"unit": [index], **{k: [int(counts[k])] for k in _COUNT_FIELDS}})
        return
    if pending and packer is not None:
        pending[-1]["dropped"][-1] = packer.tail  # the tail is accounted on the unit's last row
    yield from ready(0)


@functools.cache
def _datasource_class():
    """Defined on first use, so that validating sources and reading held-out sets need no Ray."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class CorpusDatasource(Datasource):
        """One read task per unit, in unit order; rows: packed sequences (or one row of counts)."""

        def __init__(self, units: list[Unit], job: _Job, count_only: bool, rows: list[int] | None):
            super().__init__()
            self.units, self.job, self.count_only, self.rows = units, job, count_only, rows

        def get_name(self) -> str:
            return f"elo_ray_{'count' if self.count_only else self.job.kind}"

        def estimate_inmemory_data_size(self) -> int:
            return sum(u.est_bytes for u in self.units) * 2

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            rows = self.rows
            return [
                ReadTask(
                    functools.partial(_read_unit, i, u, self.job, self.count_only),
                    BlockMetadata(num_rows=1 if self.count_only else (rows[i] if rows else None),
                                  size_bytes=int(u.est_bytes * 2), exec_stats=None, input_files=[u.uri]),
                    per_task_row_limit=per_task_row_limit,
                )
                for i, u in enumerate(self.units)
            ]

    return CorpusDatasource


def _dataset(units: list[Unit], job: _Job, *, count_only: bool, rows: list[int] | None = None):
    import ray.data

    source = _datasource_class()(units, job, count_only, rows)
    # A fixed block count keeps Ray from splitting blocks by cluster size: the blocks, and so the
    # rows each worker's split receives, must not depend on how many CPUs the cluster has.
    return ray.data.read_datasource(source, override_num_blocks=max(1, len(units)))


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


def _count(units: list[Unit], job: _Job) -> list[Counts]:
    start = time.monotonic()
    try:
        rows = _dataset(units, job, count_only=True).take_all()
    except Exception as e:
        err = _unwrap(e)
        if err is not None:
            raise err from None
        raise
    out = [Counts() for _ in units]
    for r in rows:
        out[r["unit"]].update({k: r[k] for k in _COUNT_FIELDS})
    tokens = sum(c["tokens"] for c in out)
    took = time.monotonic() - start
    log.info(f"data: counted {tokens:,} tokens in {len(units)} units in {took:.1f}s "
             f"({tokens / max(took, 1e-9) / 1e3:.1f}k tokens/s)")
    return out


# --------------------------------------------------------------------------- budget


def apportion(total: int, shares: dict[str, float]) -> dict[str, int]:
    """`total` split by `shares` (largest remainder): integers that sum to `total`."""
    exact = {lang: total * s for lang, s in shares.items()}
    out = {lang: math.floor(x) for lang, x in exact.items()}
    left = total - sum(out.values())
    for lang in sorted(exact, key=lambda lang: (-(exact[lang] - out[lang]), lang))[:left]:
        out[lang] += 1
    return out


def quotas(available: dict[str, int], shares: dict[str, float], *, total: int | None, repeat: bool) -> tuple[dict[str, int], str | None]:
    """Sequences per language per worker.

    `available`: sequences each worker's shard holds; `total`: sequences per worker asked
    (None: one pass over the scarcest language); `repeat`: a language may be read more than once.
    Returns (quotas, note), the note saying when the budget was cut to what the data holds.
    """
    used = {lang: s for lang, s in shares.items() if s > 0}
    fits = min(available[lang] / s for lang, s in used.items())  # the scarcest language decides
    asked = math.floor(fits + 1e-9) if total is None else total
    n = asked if repeat else min(asked, math.floor(fits + 1e-9))
    while True:
        q = apportion(n, used)
        if repeat or all(q[lang] <= available[lang] for lang in used):
            break
        n -= 1
    note = None
    if n < asked:
        short = min(used, key=lambda lang: available[lang] / used[lang])
        note = (f"the budget of {asked} sequences per worker was cut to {n}: {short} holds only "
                f"{available[short]} per worker (on_exhausted: stop); add {short} data, lower max_tokens, "
                f"or set on_exhausted: repeat")
    return {lang: q.get(lang, 0) for lang in shares}, note


# --------------------------------------------------------------------------- the plan


@dataclass
class StreamPlan:
    """What the trainer needs: `TorchTrainer(datasets=plan.datasets, dataset_config=plan.dataset_config)`
    and `plan.reader` in `train_loop_config`; plus the accounting of the whole corpus."""

    datasets: dict  # name -> ray.data.Dataset, one per language
    dataset_config: object  # ray.train.DataConfig: split every dataset, in order, no locality
    reader: StreamReader
    languages: list[str]
    weights: dict[str, float]  # asked shares
    quotas: dict[str, int]  # sequences per language per worker
    world_size: int
    seq_len: int
    report: dict[str, dict[str, int]]  # per language: docs, skipped, tokens read/dropped, sequences, planned
    notes: list[str] = field(default_factory=list)
    units: dict[str, list[Unit]] = field(default_factory=dict, repr=False)

    @property
    def planned_shares(self) -> dict[str, float]:
        total = sum(self.quotas.values())
        return {lang: q / total for lang, q in self.quotas.items()}

    def micro_batches(self, micro_batch_size: int) -> int:
        return self.reader.micro_batches(micro_batch_size)

    def summary(self) -> str:
        lines = [f"stream: {self.world_size} worker(s) x {sum(self.quotas.values())} sequences of {self.seq_len} tokens"]
        for lang in self.languages:
            r = self.report[lang]
            if r["planned_tokens"] is None:  # chat: examples, not packed tokens
                lines.append(
                    f"  {lang}: asked {100 * self.weights[lang]:.1f}%, planned {100 * self.planned_shares[lang]:.2f}%; "
                    f"{r['docs']} examples ({r['truncated']} truncated), {r['planned_sequences']} to train; skipped: "
                    f"{r['no_text']} without messages, {r['no_assistant']} without assistant tokens, "
                    f"{r['bad_records']} bad records, {r['heldout']} held out"
                )
                continue
            lines.append(
                f"  {lang}: asked {100 * self.weights[lang]:.1f}%, planned {100 * self.planned_shares[lang]:.2f}%; "
                f"{r['docs']} docs, {r['tokens']:,} tokens read, {r['dropped']:,} dropped "
                f"({100 * r['dropped'] / max(r['tokens'], 1):.2f}%), {r['planned_tokens']:,} to train; skipped: "
                f"{r['no_text']} without text, {r['bad_records']} bad records, {r['non_utf8']} non-UTF-8 (kept), "
                f"{r['heldout']} held out"
            )
        return "\n".join(lines + self.notes)

    def local_readers(self) -> list[StreamReader]:
        """One reader per rank over the very splits Ray Train would hand the workers; for runs
        outside Ray Train (tests, benchmarks). Consume them concurrently (one thread per rank)."""
        shards = self.dataset_config.configure(self.datasets, world_size=self.world_size,
                                               worker_handles=None, worker_node_ids=None)
        by_name = {name: lang for lang, name in self.reader.datasets.items()}
        readers = []
        for rank_shards in shards:
            r = StreamReader(**{k: v for k, v in self.reader.__dict__.items() if not k.startswith("_")})
            r._shards = {by_name[name]: it for name, it in rank_shards.items()}
            readers.append(r)
        return readers


def _ray_put(obj):
    import ray

    if not ray.is_initialized():
        ray.init()
    return ray.put(obj)


def _check(cfg, chat: bool) -> tuple[list[str], dict[str, float]]:
    problems = validate_sources(cfg)
    if problems:
        raise DataError("data sources have problems:\n" + "\n".join(f"  {p}" for p in problems))
    languages = sorted({s.language for s in cfg.sources})
    return languages, _shares(cfg, languages, chat)


def _shares(cfg, languages: list[str], chat: bool) -> dict[str, float]:
    weights = cfg.weights
    if chat and weights is None:
        weights = dict.fromkeys(languages, 1.0)  # chat default: equal (paper: target:English 1:1)
    try:
        return resolve_weights(weights, languages)
    except ValueError as e:
        raise DataError(f"weights: {e}") from None


def _units(cfg, seq_len: int) -> dict[str, list[Unit]]:
    files = [(src, list_files(src)) for src in cfg.sources]
    out: dict[str, list[Unit]] = {}
    for lang in sorted({s.language for s in cfg.sources}):
        mine = [(src, fs) for src, fs in files if src.language == lang]
        size = unit_bytes(sum(f.size for _, fs in mine for f in fs), seq_len)
        out[lang] = [u for src, fs in mine for u in make_units(lang, src, fs, size)]
    return out


def _heldout_docs(cfg, units: dict[str, list[Unit]], chat: bool) -> dict[str, list]:
    """The first `heldout_docs` documents of each language in source/file/line order."""
    out = {}
    for lang, lang_units in units.items():
        docs = []
        for u in lang_units:
            if len(docs) >= cfg.heldout_docs:
                break
            for doc in read_documents(u, Counts(), getattr(cfg, "on_bad_record", "error"), chat=chat):
                docs.append(doc)
                if len(docs) >= cfg.heldout_docs:
                    break
        out[lang] = docs
    return out


def _plan(cfg, tokenizer, world_size: int, chat: bool) -> StreamPlan:
    import ray.train
    from ray.data import DataContext

    if world_size < 1:
        raise DataError(f"world_size must be at least 1, got {world_size}")
    tok = load_tokenizer(tokenizer)
    # ChatEncoder fails early on a template without generation marks.
    encoder = ChatEncoder(tok, cfg.seq_len) if chat else DocEncoder(tok)
    languages, shares = _check(cfg, chat)
    units = _units(cfg, cfg.seq_len)
    held = _heldout_docs(cfg, units, chat)
    kind = "chat" if chat else "pretrain"
    job = _Job(kind, _ray_put(encoder), cfg.seq_len, getattr(cfg, "on_bad_record", "error"),
               frozenset(doc_key(d) for docs in held.values() for d in docs))
    flat = [u for lang in languages if shares[lang] > 0 for u in units[lang]]  # weight 0: not even counted
    counted = _count(flat, job) if flat else []
    counts = {id(u): c for u, c in zip(flat, counted)}  # units hold configs, which do not hash

    report = {}
    for lang in languages:
        total = Counts()
        for u in units[lang]:
            total.update({k: total[k] + counts.get(id(u), Counts())[k] for k in _COUNT_FIELDS})
        report[lang] = {k: int(total[k]) for k in _COUNT_FIELDS}
        if total["sequences"] == 0 and shares[lang] > 0:
            uris = sorted({s.uri for s in cfg.sources if s.language == lang})
            what = "examples" if chat else f"tokens for one sequence of {cfg.seq_len}"
            raise DataError(
                f"language {lang!r} has no {what} (sources: {', '.join(uris)}): {total['docs']} documents "
                f"kept, {total['no_text']} without text, {total['bad_records']} bad records, "
                f"{total['heldout']} held out, {total['no_assistant']} without assistant tokens; add data "
                f"or give {lang} weight 0"
            )
    available = {lang: report[lang]["sequences"] // world_size for lang in languages}
    if chat:
        total_per_worker, repeat = None, False
    elif cfg.max_tokens is not None:
        total_per_worker, repeat = cfg.max_tokens // (cfg.seq_len * world_size), cfg.on_exhausted == "repeat"
    else:  # epochs: passes over the scarcest language; more than one pass means repeating
        fits = min(available[lang] / s for lang, s in shares.items() if s > 0)
        total_per_worker = math.floor(cfg.epochs * fits + 1e-9)
        repeat = cfg.epochs > 1 or cfg.on_exhausted == "repeat"
    q, note = quotas(available, shares, total=total_per_worker, repeat=repeat)
    if sum(q.values()) == 0:
        raise DataError(f"the stream is empty: {available} sequences per worker for {world_size} workers; "
                        f"add data, lower seq_len or use fewer workers")
    for lang in languages:
        report[lang]["available_per_worker"] = available[lang]
        report[lang]["planned_sequences"] = q[lang] * world_size
        report[lang]["planned_tokens"] = q[lang] * world_size * cfg.seq_len if not chat else None

    datasets, names = {}, {}
    for lang in languages:
        if q[lang] == 0:
            continue
        mine = [u for u in units[lang] if counts[id(u)]["sequences"] > 0]
        random.Random(f"{cfg.seed}:{lang}").shuffle(mine)  # unit order: seeded, the same on every run
        names[lang] = f"{kind}_{lang}"
        datasets[names[lang]] = _dataset(mine, job, count_only=False, rows=[counts[id(u)]["sequences"] for u in mine])
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True  # blocks reach the splitter in read-task order: same rows, same rank
    dataset_config = ray.train.DataConfig(datasets_to_split=list(datasets), execution_options=options,
                                          enable_shard_locality=False)
    reader = StreamReader(
        kind=kind, datasets=names, quotas={lang: q[lang] for lang in names}, shares=shares, seq_len=cfg.seq_len,
        world_size=world_size, seed=cfg.seed,
        repeat=tuple(lang for lang in names if repeat and q[lang] > available[lang]),
    )
    plan = StreamPlan(datasets, dataset_config, reader, languages, shares, q, world_size, cfg.seq_len, report,
                      [note] if note else [], units)
    log.info("data: " + plan.summary())
    return plan


def plan_pretrain_stream(cfg: DataConfig, tokenizer, *, world_size: int) -> StreamPlan:
    """The packed, ratio-mixed causal-LM stream of `cfg` for `world_size` Ray Train workers.

    `tokenizer`: a fast HF tokenizer object, or its location (local directory or URI).
    Raises `DataError` naming what to fix: bad sources, a malformed record (unless
    on_bad_record: skip), a language without tokens, bad weights, a tokenizer without EOS.
    """
    return _plan(cfg, tokenizer, world_size, chat=False)


def plan_chat_stream(cfg: ChatDataConfig, tokenizer, *, world_size: int) -> StreamPlan:
    """The instruction-tuning stream of `cfg`: one conversation per sequence, padded to seq_len,
    labels only on assistant tokens, languages mixed by example shares (default equal); it ends
    when the scarcest language (relative to its share) has been used once."""
    return _plan(cfg, tokenizer, world_size, chat=True)


def heldout(cfg: DataConfig | ChatDataConfig, tokenizer) -> dict[str, list[list[int]]]:
    """Token ids of each held-out document per language (EOS-terminated), never in training.

    The held-out documents are the first `heldout_docs` valid documents of each language, in
    source order, files sorted, lines in order: deterministic, cheap (only the head is read).
    A corpus sorted by topic should be shuffled once before use. Training skips every document
    whose text equals a held-out one, duplicates included. No Ray needed.
    """
    chat = isinstance(cfg, ChatDataConfig)
    tok = load_tokenizer(tokenizer)
    problems = validate_sources(cfg)
    if problems:
        raise DataError("data sources have problems:\n" + "\n".join(f"  {p}" for p in problems))
    held = _heldout_docs(cfg, _units(cfg, cfg.seq_len), chat)
    if chat:
        enc = ChatEncoder(tok, cfg.seq_len)
        return {lang: [list(ids) for ids in enc.encode(docs)[0]] if docs else [] for lang, docs in held.items()}
    enc = DocEncoder(tok)
    return {lang: enc(docs) if docs else [] for lang, docs in held.items()}


def validate_sources(cfg: DataConfig | ChatDataConfig) -> list[str]:
    """One actionable line per problem (naming the URI); [] when every source reads. No Ray."""
    chat = isinstance(cfg, ChatDataConfig)
    problems = [p for src in cfg.sources for p in validate_source(src, chat=chat)]
    languages = sorted({s.language for s in cfg.sources})
    if not languages:
        problems.append("sources: no sources given; add at least one {uri, language}")
        return problems
    try:
        _shares(cfg, languages, chat)
    except DataError as e:
        problems.append(str(e))
    return problems
