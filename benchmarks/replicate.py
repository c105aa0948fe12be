"""The paper's claims in miniature, on real text nobody here wrote (issue #7).

    .venv/bin/python benchmarks/replicate.py                 # the default: under an hour on 2 CPU cores
    .venv/bin/python benchmarks/replicate.py --smoke         # a few pages, a tiny model, a few steps
    .venv/bin/python benchmarks/replicate.py --size medium --device cuda   # larger, on a GPU

1. Corpus: English and Japanese from Debian's manual pages (`manpages`, `manpages-dev`,
   `manpages-ja`; installed with apt-get when missing), rendered to text, cut into sections,
   deduplicated, written as JSONL with held-out pages per language.
2. Base model: a Llama-shaped model pretrained from scratch on the English text with elo-ray's
   own engine (full training), with a tokenizer trained on both languages.
3. Comparison at the same token budget, one run, same machine: full fine-tuning, LoRA, ELO
   (first + last layers) without and with alignment, ELO on the two middle layers.
4. Output under `--out` (default results/replicate/): results.json, results.md, perplexity.png,
   time.png, loss.png; the table and plots are copied to benchmarks/results/ (not for --smoke).

The corpus, tokenizer and base model are reused by a rerun with the same settings (`--fresh`
rebuilds them); every compared method always trains from scratch. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the `replicate` package beside this file

from replicate import report  # noqa: E402
from replicate.corpus import log  # noqa: E402
from replicate.experiment import SIZES, Experiment, Size, machine_info  # noqa: E402

METHODS = ("full", "lora", "elo", "elo-middle")
PUBLISHED = ROOT / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="scale preset (default: small, for 2 CPU cores)")
    p.add_argument("--smoke", action="store_true", help="the smallest setting (same as --size smoke); never published")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where training and evaluation run")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "replicate", help="results folder")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)} (default: all)")
    p.add_argument("--middle-layers", default=None, help="the middle pair for elo-middle, e.g. 5,6 (default: the two middle layers)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the size preset, e.g. --set cp_tokens=100000 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray (default: all)")
    p.add_argument("--fresh", action="store_true", help="rebuild the tokenizer and base model even if settings match")
    p.add_argument("--no-publish", action="store_true", help="do not copy the table and plots to benchmarks/results/")
    p.add_argument("--report-only", action="store_true", help="redraw the table and plots from --out/results.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.size = "smoke"
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    try:
        args.size_config = with_overrides(SIZES[args.size], args.overrides)
    except ValueError as e:
        p.error(f"--set: {e}")
    return args


def with_overrides(size: Size, overrides: list[str]) -> Size:
    """`size` with `FIELD=VALUE` overrides, each value parsed as the field's type."""
    fields = {f.name: f for f in dataclasses.fields(size)}
    changes = {}
    for item in overrides:
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            raise ValueError(f"{item!r}: expected FIELD=VALUE with FIELD one of the preset's fields"
                             + (f"; did you mean {close[0]}?" if close else f" ({', '.join(fields)})"))
        current = getattr(size, name)
        kind = type(current) if current is not None else int
        changes[name] = None if raw.lower() == "none" else kind(float(raw)) if kind is int else kind(raw)
    return dataclasses.replace(size, **changes)


def start_ray(args: argparse.Namespace) -> None:
    # Ray gives each worker OMP_NUM_THREADS = its CPUs (1) unless set: let torch use every core.
    os.environ.setdefault("OMP_NUM_THREADS", str(args.cpus))
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # shorter start-up of each stage
    import ray

    from elo_ray import logs

    logs.configure()  # elo-ray's progress lines, here and (the level carried along) in the workers
    # "local": always a Ray of our own, never a cluster some other process started on this machine.
    ray.init(address="local", num_cpus=args.cpus, num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False,
             logging_config=ray.LoggingConfig(log_level="WARNING"))


def publish(paths: list[Path], results_json: Path) -> None:
    PUBLISHED.mkdir(parents=True, exist_ok=True)
    for p in [*paths, results_json]:
        shutil.copy2(p, PUBLISHED / p.name)
    log(f"published the table and plots to {PUBLISHED.relative_to(ROOT)}/")


def main(argv=None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    results_json = out / "results.json"
    if args.report_only:
        results = json.loads(results_json.read_text())
        paths = report.write(results, out)
        if results["size_name"] != "smoke" and not args.no_publish:
            publish(paths, results_json)
        return 0

    began = time.perf_counter()
    size = args.size_config
    methods = args.methods.split(",")
    middle = tuple(int(x) for x in args.middle_layers.split(",")) if args.middle_layers else size.middle_pair
    exp = Experiment(out, size, size_name=args.size, device=args.device, seed=args.seed, fresh=args.fresh)
    exp.info.update(machine_info(args.device))
    log(f"size {args.size} on {args.device}; results in {out}")

    exp.prepare_corpus()
    exp.train_tokenizer()
    exp.count_tokens()
    exp.load_heldout()
    start_ray(args)

    base_run = exp.pretrain_base()
    base_ppl = exp.perplexity(exp.base_dir)
    results = {
        "size_name": args.size, "size": asdict(size), "device": args.device,
        "command": " ".join(["benchmarks/replicate.py", *(argv if argv is not None else sys.argv[1:])]),
        "overrides": args.overrides,
        "device_name": exp.info.get("gpu") or f"{exp.info['cpus']} CPU cores",
        "corpus": {lang: c.stats for lang, c in exp.corpus.items()},
        "base": {"params": exp.trainable_params(exp.base_dir, "full"), "run": asdict(base_run), "perplexity": base_ppl},
        "methods": [], "info": exp.info,
    }
    exp.info["vocab_size"] = len(json.loads((exp.tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])

    for name in methods:
        if name in ("full", "lora"):
            res = exp.run_full_or_lora(name)
        else:
            res = exp.run_elo((0, size.num_layers - 1) if name == "elo" else middle)
        results["methods"].append(asdict(res))
        results_json.write_text(json.dumps(results, indent=1))  # a crash later keeps what finished

    exp.info["load_average_at_end"] = os.getloadavg()
    exp.info["total_s"] = time.perf_counter() - began
    results_json.write_text(json.dumps(results, indent=1))
    paths = report.write(results, out)
    print(report.markdown(results), flush=True)
    if args.size != "smoke" and not args.no_publish:
        publish(paths, results_json)
    log(f"done in {exp.info['total_s']:.0f}s: {', '.join(str(p) for p in [results_json, *paths])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
