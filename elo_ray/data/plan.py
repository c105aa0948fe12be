"""Planning a stream: the steps the driver runs before training, one function each.

`plan_pretrain_stream` / `plan_chat_stream` (the config's class decides the `StreamKind`):
1. `_encoder`: the model's tokenizer as the kind's encoder (fails early: no EOS, a chat
   template without generation marks);
2. `require_valid_sources` (`checks.py`): every source lists, opens, and a sample of it parses
   with the text field; the weights resolve to shares;
3. `units_by_language` (`sources.py`): the files cut into read units;
4. `heldout_documents`: the first documents of each language, kept out of training;
5. `_count`: one Ray Data pass tokenizes every unit and keeps only its `Counts`. This costs
   one extra tokenization of the corpus (see benchmarks/ingest.py) and buys: a language with
   no sequences fails before any GPU starts, epoch budgets are exact, and the schedule length
   is known to the trainer (`_report` then checks and totals the counts);
6. `budget_for` (`budget.py`): sequences per language per worker;
7. `_datasets`: one dataset per language whose read tasks tokenize and pack their units, in a
   seeded unit order, and the Ray Train config that splits them.
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass, field

from elo_ray.config import ChatDataConfig, DataConfig
from elo_ray.data.budget import Budget, budget_for
from elo_ray.data.checks import require_valid_sources
from elo_ray.data.datasource import BLOCK_ROWS, ReadJob, count_units, sequence_dataset
from elo_ray.data.documents import Counts, StreamKind, read_documents
from elo_ray.data.reader import StreamReader
from elo_ray.data.sources import DataError, Unit, units_by_language
from elo_ray.data.tokens import ChatEncoder, DocEncoder, doc_key, load_tokenizer

log = logging.getLogger(__name__)


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
        return "\n".join(lines + [f"  {note}" for note in self.notes])  # the message's further lines, indented

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


@dataclass
class CountedUnits:
    """One language's read units and what the counting pass found in each."""

    units: list[Unit]
    counts: list[Counts]  # one per unit; all zero for a language of weight 0 (not counted)

    @property
    def total(self) -> Counts:
        return sum(self.counts, Counts())


# --------------------------------------------------------------------------- the steps


def _encoder(kind: StreamKind, tokenizer, seq_len: int) -> DocEncoder | ChatEncoder:
    tok = load_tokenizer(tokenizer)
    return ChatEncoder(tok, seq_len) if kind is StreamKind.CHAT else DocEncoder(tok)


def heldout_documents(cfg: DataConfig | ChatDataConfig, units: dict[str, list[Unit]],
                      kind: StreamKind) -> dict[str, list]:
    """The first `heldout_docs` documents of each language in source/file/line order."""
    out = {}
    for lang, lang_units in units.items():
        docs = []
        for u in lang_units:
            if len(docs) >= cfg.heldout_docs:
                break
            for doc in read_documents(u, Counts(), cfg.on_bad_record, kind):
                docs.append(doc)
                if len(docs) >= cfg.heldout_docs:
                    break
        out[lang] = docs
    return out


def _count(units: dict[str, list[Unit]], shares: dict[str, float], job: ReadJob) -> dict[str, CountedUnits]:
    counted = [u for lang, lang_units in units.items() if shares[lang] > 0 for u in lang_units]  # weight 0: not read
    found = iter(count_units(counted, job) if counted else [])
    return {lang: CountedUnits(lang_units, [next(found) if shares[lang] > 0 else Counts() for _ in lang_units])
            for lang, lang_units in units.items()}


def _report(cfg: DataConfig | ChatDataConfig, kind: StreamKind, corpus: dict[str, CountedUnits],
            shares: dict[str, float]) -> dict[str, dict[str, int]]:
    """Counts per language; a DataError for a language of positive weight without one sequence."""
    report = {}
    for lang, counted in corpus.items():
        total = counted.total
        if total.sequences == 0 and shares[lang] > 0:
            uris = sorted({s.uri for s in cfg.sources if s.language == lang})
            raise DataError(_no_sequences(cfg, kind, lang, total, uris))
        report[lang] = total.as_dict()
    return report


def _no_sequences(cfg, kind: StreamKind, lang: str, total: Counts, uris: list[str]) -> str:
    where = f"(sources: {', '.join(uris)})"
    if kind is StreamKind.PRETRAIN and 0 < total.tokens < cfg.seq_len:
        return (f"language {lang!r} has {total.tokens:,} tokens in {total.docs} documents {where}, fewer than one "
                f"sequence of seq_len {cfg.seq_len}; lower seq_len (at most the model's max_position_embeddings) "
                f"or add {lang} data")
    if kind is StreamKind.PRETRAIN and total.tokens:
        return (f"language {lang!r} has {total.tokens:,} tokens {where}, but no file (or read unit) holds one "
                f"sequence of seq_len {cfg.seq_len}: documents are packed within a file; lower seq_len or join "
                f"the small files")
    what = "examples" if kind is StreamKind.CHAT else f"tokens for one sequence of {cfg.seq_len}"
    return (f"language {lang!r} has no {what} {where}: {total.docs} documents kept, {total.no_text} without text, "
            f"{total.bad_records} bad records, {total.heldout} held out, {total.no_assistant} without assistant "
            f"tokens; add data or give {lang} weight 0")


def _datasets(kind: StreamKind, corpus: dict[str, CountedUnits], budget: Budget, job: ReadJob,
              seed: int) -> dict[str, tuple[str, object]]:
    """language -> (dataset name, dataset) for every language with a quota, units in seeded order."""
    out = {}
    for lang, counted in corpus.items():
        if budget.quotas[lang] == 0:
            continue
        mine = [(u, c.sequences) for u, c in zip(counted.units, counted.counts) if c.sequences > 0]
        random.Random(f"{seed}:{lang}").shuffle(mine)  # unit order: seeded, the same on every run
        units, rows = [u for u, _ in mine], [n for _, n in mine]
        out[lang] = (f"{kind.value}_{lang}", sequence_dataset(kind.value, units, job, rows))
    return out


def _split_config(names: list[str]):
    """Ray Train's config that splits every dataset across the workers, blocks in read-task order."""
    import ray.train
    from ray.data import DataContext

    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True  # blocks reach the splitter in read-task order: same rows, same rank
    return ray.train.DataConfig(datasets_to_split=names, execution_options=options, enable_shard_locality=False)


def _ray_put(obj):
    import ray

    if not ray.is_initialized():
        ray.init()
    return ray.put(obj)


# --------------------------------------------------------------------------- entry points


def _plan(cfg: DataConfig | ChatDataConfig, tokenizer, world_size: int) -> StreamPlan:
    if world_size < 1:
        raise DataError(f"world_size must be at least 1, got {world_size}")
    kind = StreamKind.of(cfg)
    encoder = _encoder(kind, tokenizer, cfg.seq_len)
    shares = require_valid_sources(cfg)
    units = units_by_language(cfg.sources, cfg.seq_len)
    held = heldout_documents(cfg, units, kind)
    job = ReadJob(kind=kind, encoder=_ray_put(encoder), seq_len=cfg.seq_len, on_bad_record=cfg.on_bad_record,
                  heldout=frozenset(doc_key(d) for docs in held.values() for d in docs))
    corpus = _count(units, shares, job)
    report = _report(cfg, kind, corpus, shares)
    available = {lang: report[lang]["sequences"] // world_size for lang in corpus}
    budget = budget_for(cfg, kind, available, shares, world_size)
    for lang, r in report.items():
        r["available_per_worker"] = available[lang]
        r["planned_sequences"] = budget.quotas[lang] * world_size
        r["planned_tokens"] = budget.quotas[lang] * world_size * cfg.seq_len if kind is StreamKind.PRETRAIN else None
    datasets = _datasets(kind, corpus, budget, job, cfg.seed)
    reader = StreamReader(
        kind=kind, datasets={lang: name for lang, (name, _) in datasets.items()},
        quotas={lang: budget.quotas[lang] for lang in datasets}, shares=shares, seq_len=cfg.seq_len,
        world_size=world_size, seed=cfg.seed, repeat=budget.repeat, block_rows=BLOCK_ROWS,
    )
    plan = StreamPlan(
        datasets=dict(datasets.values()), dataset_config=_split_config([name for name, _ in datasets.values()]),
        reader=reader, languages=sorted(corpus), weights=shares, quotas=budget.quotas, world_size=world_size,
        seq_len=cfg.seq_len, report=report, notes=[budget.note] if budget.note else [], units=units,
    )
    log.info("data: " + plan.summary())
    return plan


def plan_pretrain_stream(cfg: DataConfig, tokenizer, *, world_size: int) -> StreamPlan:
    """The packed, ratio-mixed causal-LM stream of `cfg` for `world_size` Ray Train workers.

    `tokenizer`: a fast HF tokenizer object, or its location (local directory or URI).
    Raises `DataError` naming what to fix: bad sources, a malformed record (unless
    on_bad_record: skip), a language without tokens, bad weights, a tokenizer without EOS.
    """
    return _plan(cfg, tokenizer, world_size)


def plan_chat_stream(cfg: ChatDataConfig, tokenizer, *, world_size: int) -> StreamPlan:
    """The instruction-tuning stream of `cfg`: one conversation per sequence, padded to seq_len,
    labels only on assistant tokens, languages mixed by example shares (default equal); it ends
    when the scarcest language (relative to its share) has been used once."""
    return _plan(cfg, tokenizer, world_size)


def heldout(cfg: DataConfig | ChatDataConfig, tokenizer) -> dict[str, list[list[int]]]:
    """Token ids of each held-out document per language (EOS-terminated), never in training.

    The held-out documents are the first `heldout_docs` valid documents of each language, in
    source order, files sorted, lines in order: deterministic, cheap (only the head is read).
    A corpus sorted by topic should be shuffled once before use. Training skips every document
    whose text equals a held-out one, duplicates included. No Ray needed.
    """
    kind = StreamKind.of(cfg)
    tok = load_tokenizer(tokenizer)
    require_valid_sources(cfg)
    held = heldout_documents(cfg, units_by_language(cfg.sources, cfg.seq_len), kind)
    if kind is StreamKind.CHAT:
        enc = ChatEncoder(tok, cfg.seq_len)
        return {lang: [list(ids) for ids in enc.encode(docs)[0]] if docs else [] for lang, docs in held.items()}
    enc = DocEncoder(tok)
    return {lang: enc(docs) if docs else [] for lang, docs in held.items()}
