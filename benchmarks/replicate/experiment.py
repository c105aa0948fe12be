"""The experiment's machinery: size presets, the corpus, tokenizer and base model (each built once
per settings and reused), a training stage through elo-ray's engine, perplexity.

A base model that knows English is continually pretrained on the target language by each method
of `methods.py` at the same token budget. Every training stage goes through elo-ray's own engine
(`elo_ray.train.run_training` on a local Ray, streams from `elo_ray.data`), ELO through
`elo_ray.surgery` (detach, merge), perplexity through `elo_ray.evaluate`.

Stage wall times include what the stage really costs end to end (Ray Train start-up, loading
the model, checkpoint and export); "loop" times are the training loop alone, from the engine's
metrics. The stream plan (counting the corpus' tokens) is timed apart, since every method pays
the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from replicate import corpus as corpus_lib
from replicate.corpus import log

# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Size:
    """One scale of the experiment; `SIZES` holds the presets (`--size`)."""

    hidden_size: int  # model width
    intermediate_size: int  # gated-MLP width
    num_layers: int  # decoder layers of the base model
    num_heads: int  # attention heads (head size = hidden_size / num_heads)
    num_kv_heads: int  # key/value heads (grouped-query attention, as Llama 3)
    vocab_size: int  # tokenizer vocabulary, trained on English and the target
    seq_len: int  # tokens per packed training sequence (and per perplexity window)
    micro_batch_size: int  # sequences per forward
    base_tokens: int  # tokens of the base model's pretraining from scratch (English, but base_target_share)
    cp_tokens: int  # tokens of continual pretraining per method (English:target en_share : 1 - en_share)
    align_share: float  # share of cp_tokens that ELO spends on alignment (paper: 1 GB of 10 GB)
    eval_tokens: int  # held-out tokens scored per language
    max_pages: int | None  # manual pages per language (None: all of them)
    heldout_pct: float  # percent of pages held out for perplexity
    base_lr: float  # peak lr of the base pretraining
    cp_lr: float  # peak lr of full fine-tuning (and of ELO's layer training unless elo_lr is set)
    lora_lr: float  # peak lr of LoRA (adapters train from zero; the usual practice is a higher lr)
    align_lr: float  # peak lr of the alignment after ELO
    lora_rank: int = 16
    base_target_share: float = 0.0  # target-language share of the base pretraining (0: English only, issue #7)
    log_every: int = 10  # optimizer steps between metric records (the loss curves' resolution)
    en_share: float = 0.1  # English share of continual-pretraining tokens (paper: English:target 1:9)
    align_en_share: float | None = None  # English share of ELO's alignment tokens (None: en_share)
    elo_lr: float | None = None  # peak lr of ELO's layer training (None: cp_lr, the same as full fine-tuning)

    @property
    def elo_train_lr(self) -> float:
        """The peak lr ELO's detached layers train with."""
        return self.cp_lr if self.elo_lr is None else self.elo_lr

    @property
    def align_mix(self) -> float:
        """The English share of ELO's alignment tokens."""
        return self.en_share if self.align_en_share is None else self.align_en_share

    @property
    def middle_pair(self) -> tuple[int, int]:
        """The two middle layers, the paper's (16, 17) of 32 in 0-based indices."""
        return (self.num_layers // 2 - 1, self.num_layers // 2)


# Alignment methods (`align.train` in a job spec) the `elo-align` rows compare: full fine-tuning
# (the paper's), only the detached layers and their neighbours, those layers whole plus LoRA on
# the rest, and full fine-tuning with optimizer state and parameters offloaded to CPU.
ALIGN_VARIANTS = ("full", "layers", "lora_layers", "offload")


def align_settings(variant: str, layers: tuple[int, ...]) -> dict:
    """The TrainConfig fields of alignment method `variant` after ELO on `layers`."""
    if variant not in ALIGN_VARIANTS:
        raise ValueError(f"unknown alignment method {variant!r}; choose from {ALIGN_VARIANTS}")
    if variant in ("layers", "lora_layers"):
        return {"method": variant, "layers": list(layers)}
    return {"method": "full", "offload_to_cpu": variant == "offload"}


# The fields the base model depends on: a rerun that changes only others reuses it.
BASE_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size", "seq_len",
               "micro_batch_size", "base_tokens", "max_pages", "heldout_pct", "base_lr", "base_target_share", "log_every")
# The fields the corpus depends on (with the target language).
CORPUS_FIELDS = ("max_pages", "heldout_pct")

SIZES = {
    # The test's setting: a handful of pages, a 4-layer model, a few steps of everything.
    "smoke": Size(hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  vocab_size=512, seq_len=64, micro_batch_size=4, base_tokens=64 * 4 * 6, cp_tokens=64 * 4 * 10,
                  align_share=0.2, eval_tokens=1024, max_pages=12, heldout_pct=25, base_lr=3e-3, cp_lr=1e-3, lora_lr=3e-3,
                  align_lr=3e-4, lora_rank=4, log_every=2),
    # The default: under an hour on 2 CPU cores.
    "small": Size(hidden_size=256, intermediate_size=688, num_layers=12, num_heads=4, num_kv_heads=2,
                  vocab_size=8192, seq_len=256, micro_batch_size=8, base_tokens=800_000, cp_tokens=240_000,
                  align_share=0.1, eval_tokens=16_384, max_pages=None, heldout_pct=5, base_lr=1e-3, cp_lr=3e-4,
                  lora_lr=1e-3, align_lr=1e-4),
    # GPUs (--device cuda): a wider, deeper model, the whole corpus several times over.
    "medium": Size(hidden_size=512, intermediate_size=1376, num_layers=16, num_heads=8, num_kv_heads=2,
                   vocab_size=16384, seq_len=512, micro_batch_size=32, base_tokens=12_000_000,
                   cp_tokens=3_000_000, align_share=0.1, eval_tokens=65_536, max_pages=None, heldout_pct=5, base_lr=1e-3,
                   cp_lr=3e-4, lora_lr=1e-3, align_lr=1e-4, log_every=20),
    "large": Size(hidden_size=1024, intermediate_size=2816, num_layers=16, num_heads=16, num_kv_heads=4,
                  vocab_size=16384, seq_len=512, micro_batch_size=32, base_tokens=40_000_000,
                  cp_tokens=10_000_000, align_share=0.1, eval_tokens=131_072, max_pages=None, heldout_pct=5, base_lr=6e-4,
                  cp_lr=2e-4, lora_lr=8e-4, align_lr=6e-5, log_every=50),
}


# --------------------------------------------------------------------------- results


@dataclass
class StageRun:
    """One timed stage of one method."""

    stage: str  # base, cp, detach, pretrain, merge, align
    wall_s: float  # end to end, as the user waits for it
    loop_s: float | None = None  # the training loop alone (engine metrics)
    cpu_s: float | None = None  # CPU seconds of the worker in the loop: what the work costs, contention aside
    data_wait_s: float | None = None  # of loop_s, waiting for the data stream
    tokens: int = 0  # trained tokens
    steps: int = 0
    resumed_from_step: int = 0  # > 0: an interrupted run resumed there (wall_s is the last invocation's)
    tokens_per_s: float | None = None  # tokens / loop_s
    peak_memory_gb: float | None = None  # worker peak RSS on CPU, peak allocated on GPU
    final_loss: float | None = None
    plan_s: float | None = None  # counting and planning the stream (not in wall_s)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens so far, loss)
    tokens_by_language: dict[str, int] = field(default_factory=dict)
    load_average: list[float] = field(default_factory=list)  # 1/5/15-minute load at the stage's end (shared machines)


@dataclass
class MethodResult:
    """A method's stages and the perplexity of each model it produced."""

    name: str  # e.g. "elo (0, 11)"
    kind: str  # full, lora, elo
    layers: list[int] | None
    stages: list[StageRun] = field(default_factory=list)
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)  # model label -> lang -> ppl
    trainable_params: int | None = None
    # elo-align: each aligned model's alignment stage and the parameters that stage trains
    align_stage: dict[str, str] = field(default_factory=dict)
    align_trainable: dict[str, int] = field(default_factory=dict)
    align_failed: dict[str, str] = field(default_factory=dict)  # alignment method -> why it did not run

    def wall_s(self, upto: str | None = None) -> float:
        """Wall seconds of the stages, through stage `upto` if given."""
        total = 0.0
        for s in self.stages:
            total += s.wall_s
            if s.stage == upto:
                break
        return total


# --------------------------------------------------------------------------- the runner


def _read_metrics(uri: str) -> list[dict]:
    from elo_ray import storage

    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def _loop_summary(records: list[dict]) -> dict:
    """Over the engine's metric intervals: loop seconds, worker CPU and data-wait seconds (None
    where the engine does not record them) and the loss curve [(tokens so far, loss)]."""
    loop_s, prev, curve = 0.0, 0, []
    cpu_s = wait_s = 0.0
    has_cpu = bool(records) and all("worker_cpu_s" in r for r in records)
    has_wait = bool(records) and all("data_wait_s" in r for r in records)
    for r in records:
        tokens = int(r.get("tokens_total", 0))
        if r.get("interval_s") is not None:
            loop_s += r["interval_s"]
        elif r.get("tokens_per_s"):
            loop_s += (tokens - prev) / r["tokens_per_s"]
        cpu_s += r.get("worker_cpu_s") or 0.0
        wait_s += r.get("data_wait_s") or 0.0
        prev = tokens
        if r.get("loss") is not None:
            curve.append((tokens, float(r["loss"])))
    return {"loop_s": loop_s if records else None, "cpu_s": cpu_s if has_cpu else None,
            "data_wait_s": wait_s if has_wait else None, "curve": curve}


class Experiment:
    """The shared parts of every row run with one `size`: corpus, tokenizer, base model (each
    reused when an earlier run built it with the same settings), training stages, perplexity."""

    def __init__(self, out_dir: Path, size: Size, *, target: str = "ja", size_name: str, device: str = "cpu",
                 seed: int = 0):
        self.out = out_dir
        self.size = size
        self.target = target
        self.languages = ("en", target)
        self.size_name = size_name
        self.device = device
        self.seed = seed
        self.corpus: dict[str, corpus_lib.LanguageCorpus] = {}
        self.corpus_dir = out_dir / "corpus" / target
        self.split_dir = self.corpus_dir / f"align-{size.align_share:g}"  # cp and align parts of the training text
        self.tokenizer_dir = out_dir / "tokenizer" / f"{target}-{size.vocab_size}"
        base_settings = {"size": {k: v for k, v in asdict(size).items() if k in BASE_FIELDS}, "seed": seed,
                         "target": target}
        self.base_key = hashlib.sha1(json.dumps(base_settings, sort_keys=True).encode()).hexdigest()[:10]
        self.base_dir = out_dir / "bases" / self.base_key
        self.runs = out_dir / "runs"
        self.heldout: dict[str, list[list[int]]] = {}
        self.info: dict = {}

    # ------------------------------------------------------------------ data

    def prepare(self) -> None:
        """Corpus, tokenizer, token counts and held-out documents (no Ray needed)."""
        self.prepare_corpus()
        self.train_tokenizer()
        self.count_tokens()
        self.load_heldout()

    def prepare_corpus(self) -> None:
        began = time.perf_counter()
        self.corpus = corpus_lib.build(self.corpus_dir, self.target, max_pages=self.size.max_pages,
                                        heldout_pct=self.size.heldout_pct)
        self._split_alignment()
        self.info["corpus_s"] = round(time.perf_counter() - began, 1)

    def _split_alignment(self) -> None:
        """Per language, a disjoint alignment part of the training documents (`align_share` of them, by hash)
        for ELO's alignment stage; full and LoRA stream from both parts."""
        for lang, c in self.corpus.items():
            self.split_dir.mkdir(parents=True, exist_ok=True)
            cp, align = self.split_dir / f"{lang}.cp.jsonl", self.split_dir / f"{lang}.align.jsonl"
            parts = {cp: [], align: []}
            for t in corpus_lib.read_texts(c.train):
                parts[align if corpus_lib.is_heldout(t, 100 * self.size.align_share) else cp].append(t)
            for path, docs in parts.items():
                # Written aside and moved into place: a run streaming the old file reads it whole.
                tmp = path.with_name(path.name + ".tmp")
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
                os.replace(tmp, path)

    def sources(self, part: str, languages=None):
        """Source configs of `part`: train (all training text: the base, full and LoRA), cp (ELO's
        layer training), align (ELO's alignment) or heldout."""
        from elo_ray.config import SourceConfig

        folder = self.split_dir if part in ("cp", "align") else self.corpus_dir
        return [SourceConfig(uri=str(folder / f"{lang}.{part}.jsonl"), language=lang)
                for lang in (languages or self.languages)]

    def data_config(self, part: str, tokens: int, en_share: float, seed_offset: int = 0):
        """`tokens` of `part`, English:target mixed `en_share` : 1 - en_share (one language alone at 0 or 1)."""
        from elo_ray.config import DataConfig

        if en_share <= 0 or en_share >= 1:
            languages, weights = ((self.target,) if en_share <= 0 else ("en",)), None
        else:
            languages, weights = self.languages, {"en": en_share, self.target: 1 - en_share}
        return DataConfig(sources=self.sources(part, languages), seq_len=self.size.seq_len, max_tokens=tokens,
                          weights=weights, heldout_docs=0, seed=self.seed + seed_offset)

    def train_tokenizer(self) -> None:
        """A byte-level BPE tokenizer trained on both languages' training text (no held-out text)."""
        from elo_ray.tiny import train_tokenizer

        marker = self.tokenizer_dir / "settings.json"
        settings = {"vocab_size": self.size.vocab_size, "corpus": {k: v.stats for k, v in self.corpus.items()}}
        if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(settings)):
            log(f"tokenizer: reusing {self.tokenizer_dir}")
            return
        began = time.perf_counter()
        texts = [t for c in self.corpus.values() for t in corpus_lib.read_texts(c.train)]
        tok = train_tokenizer(texts, vocab_size=self.size.vocab_size)
        shutil.rmtree(self.tokenizer_dir, ignore_errors=True)
        tok.save_pretrained(self.tokenizer_dir)
        marker.write_text(json.dumps(settings))
        log(f"tokenizer: {len(tok)} tokens, trained on {len(texts)} documents in {time.perf_counter() - began:.0f}s")

    def count_tokens(self) -> dict[str, dict[str, int]]:
        """Tokens of every corpus part per language (the sizes the README reports), counted once
        per tokenizer and alignment split."""
        from transformers import AutoTokenizer

        from elo_ray.data.tokens import DocEncoder

        cache = self.tokenizer_dir / f"counts-align{self.size.align_share:g}.json"
        if cache.is_file():
            self.info["corpus_tokens"] = json.loads(cache.read_text())
            return self.info["corpus_tokens"]
        enc = DocEncoder(AutoTokenizer.from_pretrained(self.tokenizer_dir))
        sizes = {}
        for lang in self.corpus:
            sizes[lang] = {}
            for part in ("cp", "align", "heldout"):
                texts = corpus_lib.read_texts((self.corpus_dir if part == "heldout" else self.split_dir)
                                              / f"{lang}.{part}.jsonl")
                sizes[lang][part] = sum(len(ids) for ids in enc(texts)) if texts else 0
                sizes[lang][f"{part}_docs"] = len(texts)
        cache.write_text(json.dumps(sizes))
        self.info["corpus_tokens"] = sizes
        return sizes

    def load_heldout(self) -> None:
        """Held-out token documents per language, `eval_tokens` of them (a seeded sample of pages)."""
        from elo_ray import data
        from elo_ray.config import DataConfig

        for lang in self.corpus:
            cfg = DataConfig(sources=self.sources("heldout", (lang,)), seq_len=self.size.seq_len,
                             heldout_docs=10**9)
            docs = data.heldout(cfg, str(self.tokenizer_dir))[lang]
            random.Random(self.seed).shuffle(docs)
            chosen, total = [], 0
            for d in docs:
                if total >= self.size.eval_tokens:
                    break
                d = d[: self.size.eval_tokens - total + 1]
                chosen.append(d)
                total += len(d) - 1
            self.heldout[lang] = chosen
        self.info["eval_tokens"] = {lang: sum(len(d) - 1 for d in docs) for lang, docs in self.heldout.items()}

    # ------------------------------------------------------------------ training

    def resources(self):
        from elo_ray.config import ResourcesConfig

        return ResourcesConfig(num_workers=1, use_gpu=self.device == "cuda", cpus_per_worker=1.0, max_failures=0)

    def train_config(self, method: str, lr: float, tokens: int, checkpoints: int = 0, **extra):
        """The TrainConfig of a stage; `extra`: more of its fields (an alignment method's layers, offload)."""
        from elo_ray.config import TrainConfig

        steps = max(1, tokens // (self.size.seq_len * self.size.micro_batch_size))
        return TrainConfig(
            method=method, lr=lr, min_lr_ratio=0.1, warmup_steps=max(1, steps // 20), weight_decay=0.0,
            micro_batch_size=self.size.micro_batch_size, grad_accum=1,
            checkpoint_every=max(50, steps // checkpoints) if checkpoints else 10**9,  # none in a short run
            log_every=max(1, min(self.size.log_every, steps // 4)), lora_rank=self.size.lora_rank,
            lora_alpha=2.0 * self.size.lora_rank, seed=self.seed, **extra,
        )

    def train(self, stage: str, run_dir: Path, model_dir: Path, out_dir: Path, *, method: str, lr: float,
              data_cfg, checkpoints: int = 0, **extra) -> StageRun:
        """One training stage through elo-ray's engine, from scratch (earlier runs are removed), or,
        with `checkpoints` > 0, saving at most that many checkpoints and resuming an interrupted run of the
        same `run_dir` from its last one. `extra`: more TrainConfig fields."""
        from elo_ray import data
        from elo_ray.train import run_training

        storage_dir = run_dir / "ray"
        if not checkpoints:
            shutil.rmtree(storage_dir / stage, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        began = time.perf_counter()
        plan = data.plan_pretrain_stream(data_cfg, str(self.tokenizer_dir), world_size=1)
        plan_s = time.perf_counter() - began
        began = time.perf_counter()
        result = run_training(
            name=stage, model_uri=str(model_dir), output_uri=str(out_dir), storage_uri=str(storage_dir),
            train=self.train_config(method, lr, data_cfg.max_tokens, checkpoints, **extra), resources=self.resources(),
            plan=plan,
            seq_len=self.size.seq_len,
        )
        wall = time.perf_counter() - began
        loop = _loop_summary(_read_metrics(result.metrics_uri))
        loop_s, curve = loop["loop_s"], loop["curve"]
        m = result.metrics
        tokens = int(m.get("tokens_total", 0))
        run = StageRun(
            stage=stage, wall_s=wall, loop_s=loop_s, cpu_s=loop["cpu_s"], data_wait_s=loop["data_wait_s"],
            tokens=tokens, steps=result.steps, resumed_from_step=result.resumed_from_step,
            tokens_per_s=tokens / loop_s if loop_s else None, peak_memory_gb=m.get("peak_memory_gb"),
            final_loss=curve[-1][1] if curve else None, plan_s=plan_s, curve=curve,
            tokens_by_language={k.removeprefix("tokens_"): int(v) for k, v in m.items()
                                if k.startswith("tokens_") and k not in ("tokens_total", "tokens_per_s")},
            load_average=list(os.getloadavg()),
        )
        cpu = f", {run.cpu_s:.0f} CPU-s" if run.cpu_s is not None else ""
        log(f"{run_dir.name}/{stage}: {tokens:,} tokens in {wall:.0f}s wall ({loop_s or 0:.0f}s loop{cpu}, "
            f"{run.tokens_per_s or 0:,.0f} tok/s), loss {run.final_loss or float('nan'):.3f}, peak {run.peak_memory_gb or 0:.2f} GiB")
        return run

    def pretrain_base(self) -> dict:
        """A Llama-shaped model trained from scratch on English (and `base_target_share` of the
        target): the experiment's base model, built once per base settings and then reused.
        Returns {"key", "settings", "params", "run", "perplexity", "commit"}."""
        from elo_ray.tiny import tiny_config, tiny_model
        from transformers import AutoTokenizer

        s = self.size
        settings = {"size": {k: v for k, v in asdict(s).items() if k in BASE_FIELDS}, "seed": self.seed,
                    "target": self.target, "tokenizer": json.loads((self.tokenizer_dir / "settings.json").read_text())}
        marker = self.base_dir / "replicate-base.json"
        if marker.is_file():
            saved = json.loads(marker.read_text())
            if saved["settings"] == json.loads(json.dumps(settings)) and "perplexity" in saved:
                log(f"base: reusing {self.base_dir.relative_to(self.out)} (pretrained in {saved['run']['wall_s']:.0f}s; "
                    "--fresh to redo)")
                return saved
        tok = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        config = tiny_config(
            "llama", vocab_size=len(tok), hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
            num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
            max_position_embeddings=s.seq_len, bos_token_id=None, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
        )
        # A base takes the longest of any stage: it saves checkpoints, and a rerun after a crash
        # resumes it (its folder is its settings' key, so nothing else resumes into it).
        run_dir = self.runs / f"base-{self.base_key}"
        init = run_dir / "init"
        shutil.rmtree(init, ignore_errors=True)
        model = tiny_model(config, seed=self.seed)
        model.save_pretrained(init)
        tok.save_pretrained(init)
        params = sum(p.numel() for p in model.parameters())
        log(f"base {self.base_key}: pretraining a {s.num_layers}-layer Llama of {params / 1e6:.1f}M parameters "
            f"from scratch on {s.base_tokens:,} tokens, {100 * (1 - s.base_target_share):.0f}% English")
        data_cfg = self.data_config("train", s.base_tokens, en_share=1 - s.base_target_share)
        run = self.train("base", run_dir, init, self.base_dir, method="full", lr=s.base_lr, data_cfg=data_cfg,
                         checkpoints=10)
        saved = {"key": self.base_key, "settings": settings, "params": params, "run": asdict(run),
                 "perplexity": self.perplexity(self.base_dir), "commit": self.info.get("elo_ray_commit")}
        marker.write_text(json.dumps(saved))
        return json.loads(json.dumps(saved))

    def elo_data_config(self, heldout_docs: int = 0):
        """ELO's layer-training stream: `(1 - align_share)` of cp_tokens from the cp part."""
        tokens = round(self.size.cp_tokens * (1 - self.size.align_share))
        return self.data_config("cp", tokens, self.size.en_share).model_copy(update={"heldout_docs": heldout_docs})

    def search_spec(self, storage_root: Path, heldout_docs: int = 32) -> dict:
        """A job spec of this setting for `elo-ray search`: each candidate trains as `detach_merge`
        trains the first and last layers (the base, tokenizer, stream, token budget, lr and
        schedule) and is scored on the first `heldout_docs` documents per language of the cp
        part, which its training then skips (the search's held-out text, not the harness's)."""
        data_cfg = self.elo_data_config(heldout_docs)
        return {
            "run_id": f"layers-{self.size_name}-{self.target}",
            "storage": {"root": str(storage_root)},
            "model": {"base": str(self.base_dir), "tokenizer": str(self.tokenizer_dir)},
            "resources": self.resources().model_dump(mode="json", exclude_defaults=True),
            "pretrain": {"data": data_cfg.model_dump(mode="json", exclude_defaults=True),
                         "train": self.train_config("elo", self.size.elo_train_lr, data_cfg.max_tokens)
                         .model_dump(mode="json", exclude_defaults=True)},
            "align": {"enabled": False},
            "eval": {"max_docs": heldout_docs, "tasks": []},
            "search": {"max_tokens": data_cfg.max_tokens},
        }

    def detach_merge(self, layers: tuple[int, ...], run_dir: Path) -> tuple[list[StageRun], Path]:
        """surgery.save_detached -> ELO training of the detached model -> surgery.merge; returns the
        stages and the merged model's folder."""
        from elo_ray import surgery

        s = self.size
        elo_init, elo_out, merged = (run_dir / n for n in ("elo-init", "elo-trained", "merged"))
        stages = []
        began = time.perf_counter()
        surgery.save_detached(str(self.base_dir), layers, str(elo_init), overwrite=True)
        stages.append(StageRun(stage="detach", wall_s=time.perf_counter() - began))
        stages.append(self.train("pretrain", run_dir, elo_init, elo_out, method="elo", lr=s.elo_train_lr,
                                 data_cfg=self.elo_data_config()))
        began = time.perf_counter()
        surgery.merge(str(self.base_dir), str(elo_out), str(merged), overwrite=True)
        stages.append(StageRun(stage="merge", wall_s=time.perf_counter() - began))
        return stages, merged

    def align(self, merged: Path, run_dir: Path, variant: str = "full",
              layers: tuple[int, ...] = ()) -> tuple[StageRun, Path]:
        """Alignment of the merged model on the alignment text: the tokens ELO's layer training
        left of cp_tokens, English share `align_mix`. `variant` is one of ALIGN_VARIANTS (full
        fine-tuning, the paper's, by default); `layers` are the detached ones, which `layers` and
        `lora_layers` train whole. The stage is `align` for full, `align-VARIANT` otherwise."""
        s = self.size
        name = "align" if variant == "full" else f"align-{variant}"
        aligned = run_dir / ("aligned" if variant == "full" else f"aligned-{variant}")
        tokens = s.cp_tokens - round(s.cp_tokens * (1 - s.align_share))
        run = self.train(name, run_dir, merged, aligned, lr=s.align_lr,
                         data_cfg=self.data_config("align", tokens, s.align_mix, seed_offset=1),
                         **align_settings(variant, layers))
        return run, aligned

    def trainable_params(self, model_dir: Path, kind: str, **extra) -> int:
        """Parameters the method's main stage trains (counted on a meta-device model); `extra`:
        more TrainConfig fields (an alignment method's layers)."""
        from elo_ray.config import TrainConfig
        from elo_ray.train import model as model_lib

        config = model_lib.read_config(str(model_dir))
        m = model_lib.build_meta(config, TrainConfig(method=kind, lora_rank=self.size.lora_rank, **extra))
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ evaluation

    def perplexity(self, model_dir: Path) -> dict[str, float]:
        import torch
        import transformers

        from elo_ray import evaluate

        began = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ppl = evaluate.perplexity(model, self.heldout, max_len=self.size.seq_len, device=self.device)
        del model
        log(f"perplexity of {model_dir.relative_to(self.out)}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()) + f" ({time.perf_counter() - began:.0f}s)")
        return ppl


def machine_info(device: str) -> dict:
    """What the numbers were measured on."""
    import platform

    import torch

    info = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "torch": torch.__version__, "load_average_at_start": os.getloadavg()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import subprocess

        info["elo_ray_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    # A run from an exported copy of the tree (git archive) has no .git: the caller names the commit.
    info["elo_ray_commit"] = info.get("elo_ray_commit") or os.environ.get("ELO_RAY_COMMIT", "unknown")
    return info
