"""The data plane: read -> tokenize -> pack -> mix by ratio -> shard to Ray Train workers.

Stream shape. Each language gets one Ray Data dataset whose read tasks each tokenize one
*unit* (a byte range, parquet row range or compressed file; `sources.py`) with the model's
fast tokenizer, append EOS to every document and pack the language's documents into
`seq_len` sequences (the tail of each unit, under `seq_len` tokens, is dropped and counted).
Every sequence is single-language, so per-language token accounting is exact, and the ratio is
mixed inside each worker (`reader.py`): a deficit rule picks which language fills each slot,
within one sequence of the asked shares at every point of the stream.

Sharding and determinism. The per-language datasets go to `TorchTrainer(datasets=...)` and are
split by Ray Train's own `streaming_split(world_size, equal=True)`. Ray Data 2.60's
OutputSplitter hands each block to the split with the fewest rows *dispatched so far* (not
consumed), so with blocks arriving in a fixed order the assignment is a pure function of the
block sequence, whatever the workers' speeds. We make the block sequence fixed: units are cut
from file sizes and seq_len only and shuffled with the seed; `preserve_order=True` releases
blocks in read-task order (and makes the splitter drop locality hints); a fixed block count
(`override_num_blocks`) stops Ray from splitting blocks by cluster size; each read task yields
blocks of `BLOCK_ROWS` sequences. `equal=True` gives every worker exactly
floor(sequences / world_size) rows of each language, and the mixing order depends only on the
per-worker quotas, so all workers switch languages in step and end on the same micro-batch.
Evidence: tests/test_data.py runs the stream twice (in threads with different speeds, and
inside a TorchTrainer) and gets bit-identical batches per rank. The alternative, unsplit
datasets with each rank keeping every world_size-th row, was rejected: every rank would
read and tokenize the whole corpus (world_size times the work, 8x on one 8-GPU node).

Budget. Quotas per worker come from `max_tokens` x share, or, with `epochs`, from the scarcest
language (tokens / share) times epochs; a counting pass before training makes them exact
(`budget.py`).

Modules, each importing only those above it:
  sources.py     URIs -> sorted files -> read units (DataError)
  documents.py   units -> documents; StreamKind (pretrain or chat); Counts of what was skipped
  budget.py      the asked shares; sequences per language per worker
  checks.py      before any GPU: every file is what its format says, a sample of each source parses
  tokens.py      the tokenizer: documents -> ids -> packed sequences; chat -> ids and labels
  datasource.py  the Ray Data read tasks: count a unit, or read its sequences in blocks
  reader.py      inside each Ray Train worker: mix the shards by ratio into micro-batches
  plan.py        the driver's steps: check, units, held-out, count, budget, datasets -> StreamPlan
"""

from elo_ray.data.checks import validate_sources
from elo_ray.data.documents import StreamKind
from elo_ray.data.plan import StreamPlan, heldout, plan_chat_stream, plan_pretrain_stream
from elo_ray.data.reader import StreamReader, mix_order
from elo_ray.data.sources import DataError

__all__ = [
    "DataError",
    "StreamKind",
    "StreamPlan",
    "StreamReader",
    "heldout",
    "mix_order",
    "plan_chat_stream",
    "plan_pretrain_stream",
    "validate_sources",
]
