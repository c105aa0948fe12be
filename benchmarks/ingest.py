"""Ingest throughput: the Ray Data path (read -> tokenize -> pack -> mix) next to a plain loop.

    .venv/bin/python benchmarks/ingest.py [--mb 8] [--seq-len 1024]

Generates a synthetic two-language corpus (English-like and Korean-like words, Zipf-distributed,
long and short documents), trains a byte-level BPE tokenizer on it, then measures in one run:
- a plain single-process loop: read jsonl, tokenize with the same fast tokenizer (batched), pack;
- the plan's counting pass and the training stream (`plan_pretrain_stream` + one reader that
  mixes 1:9) under `ray.init(num_cpus=1)` and `num_cpus=2`, each in its own subprocess;
- what determinism costs (`preserve_order` off) and what resuming costs (skip half the stream).
Tokenizer threads are off everywhere (TOKENIZERS_PARALLELISM=false): parallelism is Ray's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

LATIN = "bcdfghjklmnprstvwz"
VOWELS = "aeiou"


def _words(rng: random.Random, n: int, korean: bool) -> list[str]:
    out = set()
    while len(out) < n:
        k = rng.choice((1, 2, 2, 3, 3, 4))
        if korean:  # Hangul syllables, 3 bytes each in UTF-8
            out.add("".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(k)))
        else:
            out.add("".join(rng.choice(LATIN) + rng.choice(VOWELS) for _ in range(k)))
    return sorted(out)


def write_corpus(root: str, megabytes: float, seed: int = 0) -> dict[str, int]:
    """English ~10% of the bytes in long documents, Korean ~90% in short ones (1:9 in tokens, roughly)."""
    rng = random.Random(seed)
    sizes = {}
    for lang, share, mean_words in (("en", 0.12, 600), ("ko", 0.88, 120)):
        vocab = _words(rng, 20000, korean=lang == "ko")
        weights = [1 / (r + 1) ** 1.05 for r in range(len(vocab))]  # Zipf
        cum, acc = [], 0.0
        for w in weights:
            acc += w
            cum.append(acc)
        target, written, part = megabytes * share * 1e6, 0, 0
        os.makedirs(os.path.join(root, lang), exist_ok=True)
        f = open(os.path.join(root, lang, f"part-{part}.jsonl"), "w", encoding="utf-8")
        while written < target:
            n = max(5, int(rng.lognormvariate(math.log(mean_words), 0.6)))
            words = rng.choices(vocab, cum_weights=cum, k=n)
            text = " ".join(words[i] + ("." if i % 17 == 16 else "") for i in range(n))
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            if f.tell() > 2e6:  # several files per language, as corpora come
                f.close()
                part += 1
                f = open(os.path.join(root, lang, f"part-{part}.jsonl"), "w", encoding="utf-8")
        f.close()
        sizes[lang] = written
    return sizes


def baseline(root: str, tokenizer_dir: str, seq_len: int) -> dict:
    """The same tokenizer and packing as the Ray path, one process, no Ray."""
    from transformers import AutoTokenizer

    from elo_ray.data.tokens import DocEncoder, Packer

    enc = DocEncoder(AutoTokenizer.from_pretrained(tokenizer_dir))
    start, tokens, sequences = time.perf_counter(), 0, 0
    for lang in ("en", "ko"):
        packer = Packer(seq_len)
        for name in sorted(os.listdir(os.path.join(root, lang))):
            with open(os.path.join(root, lang, name), "rb") as f:
                batch, size = [], 0
                for line in f:
                    batch.append(json.loads(line)["text"])
                    size += len(line)
                    if size >= 1 << 20:
                        ids = enc(batch)
                        tokens += sum(map(len, ids))
                        sequences += len(packer.add(ids))
                        batch, size = [], 0
                if batch:
                    ids = enc(batch)
                    tokens += sum(map(len, ids))
                    sequences += len(packer.add(ids))
    return {"tokens": tokens, "sequences": sequences, "seconds": time.perf_counter() - start}


def ray_run(root: str, tokenizer_dir: str, seq_len: int, cpus: int, preserve_order: bool, resume: bool) -> dict:
    """In a fresh process: ray.init(num_cpus=cpus), plan (count pass), then read the whole stream."""
    import ray

    from elo_ray import data
    from elo_ray.config import DataConfig, SourceConfig

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    cfg = DataConfig(sources=[SourceConfig(uri=os.path.join(root, "en"), language="en"),
                              SourceConfig(uri=os.path.join(root, "ko"), language="ko")],
                     seq_len=seq_len, heldout_docs=16)
    t0 = time.perf_counter()
    plan = data.plan_pretrain_stream(cfg, tokenizer_dir, world_size=1)
    t1 = time.perf_counter()
    if not preserve_order:  # what determinism costs: the same plan with blocks released as they finish
        import copy

        import ray.train
        from ray.data import DataContext

        options = copy.deepcopy(DataContext.get_current().execution_options)
        options.preserve_order = False
        plan.dataset_config = ray.train.DataConfig(datasets_to_split=list(plan.datasets), execution_options=options,
                                                   enable_shard_locality=False)
    [reader] = plan.local_readers()
    out = {"count_tokens": sum(r["tokens"] for r in plan.report.values()), "count_s": t1 - t0,
           "units": sum(len(u) for u in plan.units.values())}
    t2 = time.perf_counter()
    n = 0
    for b in reader.batches(8):
        n += sum(b["tokens"].values())
    t3 = time.perf_counter()
    totals = reader.totals()
    out.update(stream_tokens=n, stream_s=t3 - t2, shares=totals["shares"],
               read=sum(v["read"] for v in totals["languages"].values()),
               dropped=sum(r["dropped"] for r in plan.report.values()))
    [reader] = plan.local_readers()  # again, with every worker process and actor already started
    t2 = time.perf_counter()
    n2 = sum(sum(b["tokens"].values()) for b in reader.batches(8))
    out.update(warm_tokens=n2, warm_s=time.perf_counter() - t2)
    if resume:
        [reader] = plan.local_readers()
        half = reader.micro_batches(8) // 2
        t4 = time.perf_counter()
        next(iter(reader.batches(8, skip=half)))
        out.update(resume_s=time.perf_counter() - t4, resume_skipped_tokens=half * 8 * seq_len)
    ray.shutdown()
    return out


def _subprocess(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"benchmark subprocess failed: {args}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=8.0, help="corpus size in MB")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--_ray", nargs=5, metavar=("ROOT", "TOK", "CPUS", "ORDER", "RESUME"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._ray:
        root, tok, cpus, order, resume = args._ray
        print(json.dumps(ray_run(root, tok, args.seq_len, int(cpus), order == "1", resume == "1")))
        return

    from elo_ray.tiny import train_tokenizer

    work = tempfile.mkdtemp(prefix="elo-ray-ingest-")
    root, tok_dir = os.path.join(work, "corpus"), os.path.join(work, "tokenizer")
    sizes = write_corpus(root, args.mb)
    sample = []
    for lang in ("en", "ko"):
        with open(os.path.join(root, lang, "part-0.jsonl"), encoding="utf-8") as f:
            sample += [json.loads(line)["text"] for _, line in zip(range(400), f)]
    train_tokenizer(sample, vocab_size=args.vocab).save_pretrained(tok_dir)
    print(f"corpus: {sum(sizes.values()) / 1e6:.1f} MB (en {sizes['en'] / 1e6:.1f}, ko {sizes['ko'] / 1e6:.1f}) "
          f"in {work}; BPE vocab {args.vocab}; seq_len {args.seq_len}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs", flush=True)

    base = baseline(root, tok_dir, args.seq_len)
    common = [f"--seq-len={args.seq_len}", "--_ray", root, tok_dir]
    runs = {
        1: _subprocess(common + ["1", "1", "0"]),
        2: _subprocess(common + ["2", "1", "1"]),
    }
    unordered = _subprocess(common + ["2", "0", "0"])

    ref = base["tokens"] / base["seconds"]
    rows = [("plain loop: read + tokenize + pack", 1, base["tokens"], base["seconds"])]
    for cpus, r in runs.items():
        rows.append((f"Ray count pass (plan), {r['units']} units", cpus, r["count_tokens"], r["count_s"]))
        rows.append(("Ray stream: read, tokenize, pack, mix 1:9", cpus, r["stream_tokens"], r["stream_s"]))
        rows.append(("  the same stream again (warm actors)", cpus, r["warm_tokens"], r["warm_s"]))
    rows.append(("Ray stream, preserve_order off", 2, unordered["stream_tokens"], unordered["stream_s"]))
    print()
    print(f"| {'path':<44} | CPUs | {'tokens':>10} | {'seconds':>7} | {'tokens/s':>10} | vs loop |")
    print(f"|{'-' * 46}|------|{'-' * 12}|{'-' * 9}|{'-' * 12}|---------|")
    for name, cpus, tokens, secs in rows:
        rate = tokens / secs
        print(f"| {name:<44} | {cpus:>4} | {tokens:>10,} | {secs:>7.2f} | {rate:>10,.0f} | {rate / ref:>6.2f}x |")
    r1, r2 = runs[1], runs[2]
    print()
    print(f"scaling 1 -> 2 CPUs: count pass {r1['count_s'] / r2['count_s']:.2f}x, "
          f"stream {r1['stream_s'] / r2['stream_s']:.2f}x, warm stream {r1['warm_s'] / r2['warm_s']:.2f}x")
    print(f"whole Ray path (count + stream) on 2 CPUs: {(r2['count_s'] + r2['stream_s']):.2f}s for "
          f"{r2['stream_tokens']:,} trained tokens ({r2['stream_tokens'] / (r2['count_s'] + r2['stream_s']):,.0f} tokens/s)")
    print(f"preserve_order cost on 2 CPUs: stream {r2['stream_s']:.2f}s ordered vs {unordered['stream_s']:.2f}s unordered")
    print(f"resume: skipping half the stream ({r2['resume_skipped_tokens']:,} tokens) took {r2['resume_s']:.2f}s "
          f"to the first batch")
    print("achieved shares (2 CPUs): " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in r2["shares"].items())
          + f"; dropped {100 * r2['dropped'] / r2['count_tokens']:.2f}% of tokens read")


if __name__ == "__main__":
    main()
