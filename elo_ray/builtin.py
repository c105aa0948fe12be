"""`builtin:` locations: what ships inside elo-ray, so the demo needs no downloads.

- `builtin:corpus/<file>`: a file of the bundled bilingual corpus (`elo_ray/corpus/`).
- `builtin:tasks`: the bundled lm-evaluation-harness tasks (`elo_ray/tasks/`: elo_mc_en,
  elo_mc_ko, a bilingual multiple-choice set), for `eval.task_dirs`.
- `builtin:tiny-llama`: a small Llama built from a config with a fixed seed, with a tokenizer
  trained on the bundled corpus, then briefly pretrained on the bundled English documents so
  that, like the models users adapt, it knows English and not the target language. It is
  built once under `{storage_root}/_builtin/tiny-llama/` (about ten seconds) and reused.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from elo_ray import storage

PREFIX = "builtin:"
CORPUS_DIR = Path(__file__).parent / "corpus"
TASKS_DIR = Path(__file__).parent / "tasks"
MODELS = ("tiny-llama",)
BUILT_MARKER = ".built"  # written last: a model without it was interrupted and is rebuilt


def is_builtin(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(PREFIX)


def resolve(uri: str, storage_root: str) -> str:
    """The real location of `uri`; non-builtin locations are returned unchanged."""
    if not is_builtin(uri):
        return uri
    name = uri[len(PREFIX):]
    if name.startswith("corpus/"):
        path = CORPUS_DIR / name[len("corpus/"):]
        if not any(CORPUS_DIR.glob(name[len("corpus/"):])):
            known = ", ".join(sorted(p.name for p in CORPUS_DIR.glob("*.jsonl")))
            raise ValueError(f"{uri}: no such bundled corpus file; bundled: {known}")
        return str(path)
    if name == "tasks":
        return str(TASKS_DIR)
    if name in MODELS:
        out = storage.join(storage_root, "_builtin", name)
        if not storage.exists(storage.join(out, BUILT_MARKER)):
            _build_tiny_llama(out)
        return out
    raise ValueError(f"{uri}: unknown builtin; use builtin:corpus/<file>, builtin:tasks or one of {MODELS}")


def resolve_sources(cfg, storage_root: str):
    """A copy of a data config (DataConfig or ChatDataConfig) with `builtin:` source URIs resolved."""
    sources = [s.model_copy(update={"uri": resolve(s.uri, storage_root)}) for s in cfg.sources]
    return cfg.model_copy(update={"sources": sources})


def corpus_texts(pattern: str = "*.jsonl") -> list[str]:
    """Every text of the bundled corpus files matching `pattern` (chat files: every message)."""
    texts = []
    for path in sorted(CORPUS_DIR.glob(pattern)):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "text" in row:
                texts.append(row["text"])
            texts.extend(m["content"] for m in row.get("messages", []))
    return texts


def _build_tiny_llama(out: str) -> None:
    from elo_ray.tiny import tiny_config, tiny_model, train_tokenizer

    tokenizer = train_tokenizer(corpus_texts(), vocab_size=2048)
    config = tiny_config(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = tiny_model(config, seed=0)
    _pretrain_on_english(model, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        storage.remove(out)
        storage.upload(tmp, out)
    storage.write_text(storage.join(out, BUILT_MARKER), "")


# The demo holds out the first documents of each language for perplexity; the base model
# never sees them (64 is DataConfig.heldout_docs' default and above the demo's setting).
BASE_SKIPS_DOCS = 64


def _pretrain_on_english(model, tokenizer, steps: int = 200, seq_len: int = 128, batch: int = 8) -> None:
    """A few hundred AdamW steps of causal-LM training on English, single-threaded and seeded."""
    import torch

    ids: list[int] = []
    for text in corpus_texts("en.jsonl")[BASE_SKIPS_DOCS:]:
        ids += tokenizer(text).input_ids + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    seqs = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same floating-point sums, the same weights
    try:
        gen = torch.Generator().manual_seed(0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        model.train()
        for _ in range(steps):
            batch_ids = seqs[torch.randint(0, n, (batch,), generator=gen)]
            model(input_ids=batch_ids, labels=batch_ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
    finally:
        torch.set_num_threads(threads)
