"""The paper's claims in miniature, on real text nobody here wrote (issues #7, #16).

    .venv/bin/python benchmarks/replicate.py                 # the paper's comparison, under an hour on 2 CPU cores
    .venv/bin/python benchmarks/replicate.py --matrix all    # every published row (a few hours, resumable)
    .venv/bin/python benchmarks/replicate.py --methods elo --set elo_lr=1e-4   # one row
    .venv/bin/python benchmarks/replicate.py --smoke --target de               # a few pages, a tiny model
    .venv/bin/python benchmarks/replicate.py --size medium --device cuda       # larger, on a GPU
    .venv/bin/python benchmarks/replicate.py --search-spec    # a spec of this setting for `elo-ray search`
    .venv/bin/python benchmarks/replicate.py --size medium --bundle   # corpus + tokenizer for a host without apt-get

1. Corpus: English and the target language (`--target`, default ja) from Debian's manual pages
   (`manpages`, `manpages-dev`, `manpages-LANG`; installed with apt-get when missing), rendered
   to text, cut into sections, untranslated ones dropped, deduplicated, written as JSONL with
   held-out pages per language.
2. Base model: a Llama-shaped model pretrained from scratch on the English text with elo-ray's
   own engine (full training), with a tokenizer trained on both languages.
3. Rows: a method (full fine-tuning, LoRA, ELO on first + last layers without and with
   alignment, ELO on the two middle layers) under a setting of the preset (`--set`), each from
   its base at the same token budget. Rows are appended to results.json as they finish and a
   rerun skips the rows already there.
4. Output under `--out` (default results/replicate/SIZE-TARGET/): results.json, results.md and
   plots; the table and plots are copied to benchmarks/results/ (not for --smoke).

The corpus, tokenizer and base models are reused by a rerun with the same settings (`--fresh`
rebuilds them and starts results.json anew). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the `replicate` package beside this file

from replicate import languages, report  # noqa: E402
from replicate.corpus import log  # noqa: E402
from replicate.experiment import SIZES, Experiment, machine_info  # noqa: E402
from replicate.methods import METHODS, MethodOptions  # noqa: E402
from replicate.rows import MATRICES, ResultsStore, Row, changes_from, command, row_key  # noqa: E402

PUBLISHED = ROOT / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="scale preset (default: small, for 2 CPU cores)")
    p.add_argument("--smoke", action="store_true", help="the smallest setting (same as --size smoke); never published")
    p.add_argument("--target", default="ja", help="the target language: a Debian manpages-LANG code "
                   f"(default ja; {', '.join(sorted(languages.TARGETS))})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where training and evaluation run")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/replicate/SIZE-TARGET)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated rows to run under --set: {', '.join(METHODS)} (default: --matrix paper)")
    p.add_argument("--matrix", choices=sorted(MATRICES), default=None,
                   help="a published list of rows (paper: the four methods; ratio: the English:target sweep; "
                   "english: the English question; all: every one)")
    p.add_argument("--middle-layers", default=None, help="the middle pair for elo-middle, e.g. 5,6 (default: the two middle layers)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the size preset for every row, e.g. --set elo_lr=1e-4 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true",
                   help="Ray's worker output and elo-ray's debug lines too (as `elo-ray run --verbose`)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray (default: all)")
    p.add_argument("--nice", type=int, default=0, metavar="N",
                   help="once Ray has started, lower this process and all of Ray's to niceness N (on a shared "
                   "machine: 19; `nice -n 19` on the command line starves Ray's own start-up)")
    p.add_argument("--fresh", action="store_true",
                   help="remove the tokenizers, base models and results.json under --out first (the corpus is rebuilt "
                   "only when its settings change)")
    p.add_argument("--rerun", action="store_true", help="run the asked rows again even if results.json has them")
    p.add_argument("--no-publish", action="store_true", help="do not copy the table and plots to benchmarks/results/")
    p.add_argument("--search-spec", action="store_true",
                   help="write --out/search.yaml, a job spec of this setting (base model, corpus, ELO's stream and "
                   "schedule) for `elo-ray search`, print the command that runs it, and exit")
    p.add_argument("--report-only", action="store_true", help="redraw the table and plots from --out/results.json")
    p.add_argument("--bundle", action="store_true",
                   help="build the corpus and tokenizer of --size and --target, pack them into --out/bundle.tar.xz "
                   "for a GPU host that cannot install the manual pages, print how to run there, and exit")
    args = p.parse_args(argv)
    if args.smoke:
        args.size = "smoke"
    try:
        languages.target(args.target)
    except ValueError as e:
        p.error(str(e))
    if args.methods and args.matrix:
        p.error("--methods and --matrix: choose one (a matrix names its own methods)")
    methods = args.methods.split(",") if args.methods else None
    unknown = set(methods or ()) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    rows = [Row(m) for m in methods] if methods else MATRICES[args.matrix or "paper"]
    args.rows = [Row(r.method, (*r.overrides, *args.overrides)) for r in rows]
    try:
        for row in args.rows:
            row.size(SIZES[args.size])
    except ValueError as e:
        p.error(f"--set: {e}")
    args.middle = tuple(int(x) for x in args.middle_layers.split(",")) if args.middle_layers else None
    args.out = (args.out or ROOT / "results" / "replicate" / f"{args.size}-{args.target}").resolve()
    return args


def start_ray(args: argparse.Namespace) -> None:
    # Ray gives each worker OMP_NUM_THREADS = its CPUs (1) unless set: let torch use every core.
    os.environ.setdefault("OMP_NUM_THREADS", str(args.cpus))
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # shorter start-up of each stage
    import logging

    import psutil  # Ray depends on it

    from elo_ray import logs
    from elo_ray.stages import ensure_ray

    # elo-ray's progress lines, here and (the level carried along) in the workers; Ray's worker
    # output (its State API warning every second, without a dashboard) only with --verbose.
    logs.configure(logging.DEBUG if args.verbose else logging.INFO)
    # A Ray of our own (`local_ray` says why), started as `elo-ray run` starts one but without its
    # dashboard. A start can still time out on a loaded machine, so a long matrix keeps trying, for
    # about half an hour.
    attempts = 30
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ensure_ray(dashboard=False, num_cpus=args.cpus, num_gpus=1 if args.device == "cuda" else 0)
            break
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            # The failed start leaves its GCS server, dashboard and monitors running: end them.
            for p in psutil.Process().children(recursive=True):
                if p.pid not in before:
                    p.kill()
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            log(f"Ray did not start (attempt {attempt} of {attempts}: {e}); trying again in 30 s")
            time.sleep(30)
    if args.nice:
        # Ray's start-up has fixed time limits, so it runs at the caller's priority; after it, the
        # driver and every Ray process (the raylet's later workers inherit its niceness) yield.
        for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            p.nice(max(p.nice(), args.nice))
        log(f"this process and Ray's run at niceness {args.nice} from here on")


def publish(paths: list[Path], results_json: Path) -> None:
    PUBLISHED.mkdir(parents=True, exist_ok=True)
    for p in [*paths, results_json]:
        shutil.copy2(p, PUBLISHED / p.name)
    log(f"published the table and plots to {PUBLISHED.relative_to(ROOT)}/")


def run_rows(args: argparse.Namespace, store: ResultsStore) -> None:
    """Every asked row not yet in `store`, in order; each row's Experiment shares the corpus,
    tokenizer and (where the settings match) the base model with the others."""
    preset = SIZES[args.size]
    experiments: dict = {}
    ray_started = False
    for row in args.rows:
        size = row.size(preset)
        changes = changes_from(preset, size)
        middle = args.middle if row.method == "elo-middle" else None
        key = row_key(row.method, changes, middle)
        cmd = command(store.data, row.method, changes, middle)
        if store.has(key) and not args.rerun:
            log(f"row done already, skipped: {cmd}")
            continue
        log(f"row: {cmd}")
        if size not in experiments:
            exp = Experiment(args.out, size, target=args.target, size_name=args.size, device=args.device,
                             seed=args.seed)
            exp.info.update(machine_info(args.device))
            exp.prepare()
            experiments[size] = exp
        exp = experiments[size]
        if not ray_started:
            start_ray(args)
            ray_started = True
        store.data["corpus"] = {lang: c.stats for lang, c in exp.corpus.items()}
        store.data["info"].update({k: exp.info[k] for k in ("corpus_tokens", "eval_tokens", "cpus", "torch",
                                                              "platform") if k in exp.info})
        store.data["info"]["vocab_size"] = len(json.loads((exp.tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
        base_key = store.add_base(exp.pretrain_base())
        load_start, began = list(os.getloadavg()), time.perf_counter()
        result = METHODS[row.method](exp, MethodOptions(middle_layers=middle))
        store.add_row({
            "key": key, "method": row.method, "changes": changes, "command": cmd, "base": base_key,
            "size": asdict(size), "result": asdict(result), "commit": exp.info.get("elo_ray_commit"),
            "load_average_at_start": load_start, "load_average_at_end": list(os.getloadavg()),
            "wall_s": time.perf_counter() - began, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        })


def write_search_spec(args: argparse.Namespace) -> int:
    """--search-spec: the preset's setting (with --set) as a job spec for `elo-ray search`, so that
    the search's trained ranking and its probe are measured on the manual pages (issue 14)."""
    import yaml

    from elo_ray.config import spec_from_dict

    size = args.rows[0].size(SIZES[args.size])
    exp = Experiment(args.out, size, target=args.target, size_name=args.size, device=args.device, seed=args.seed)
    exp.prepare()
    if not (exp.base_dir / "replicate-base.json").is_file():
        start_ray(args)
    exp.pretrain_base()
    spec = exp.search_spec(args.out / "search-runs")
    spec_from_dict(spec)  # what elo-ray will read: a mistake here fails now, not in the search
    path = args.out / "search.yaml"
    cmd = f"elo-ray search {path}"
    path.write_text(f"# `{' '.join(sys.argv)}`: the replicate setting for the layer search. Run:\n#   {cmd}\n"
                    + yaml.safe_dump(spec, sort_keys=False))
    log(f"wrote {path}; run: {cmd}")
    return 0


# What a run elsewhere needs of --out to skip the corpus' build (man-db, apt-get) and the tokenizer's
# training: the rendered documents and their settings, and the tokenizer. The alignment split,
# token counts, bases and rows are made there.
def bundle_members(exp: Experiment) -> list[Path]:
    """The files of `exp.out` that `--bundle` packs, relative to it."""
    corpus = [exp.corpus_dir / "corpus.json"] + [exp.corpus_dir / f"{lang}.{part}.jsonl"
                                                 for lang in exp.languages for part in ("train", "heldout")]
    tokenizer = sorted(p for p in exp.tokenizer_dir.iterdir() if p.is_file() and not p.name.startswith("counts-"))
    return [p.relative_to(exp.out) for p in corpus + tokenizer]


def write_bundle(args: argparse.Namespace) -> int:
    """--bundle: the corpus and tokenizer of this preset and target as one archive (issue 16: the
    larger presets on a GPU host that has no package index, so no manual pages to render)."""
    import tarfile

    size = args.rows[0].size(SIZES[args.size])
    exp = Experiment(args.out, size, target=args.target, size_name=args.size, device=args.device, seed=args.seed)
    exp.prepare()
    path = args.out / "bundle.tar.xz"
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:xz") as tar:
        for member in bundle_members(exp):
            tar.add(exp.out / member, arcname=str(member))
    os.replace(tmp, path)
    out = os.path.relpath(args.out, Path.cwd())
    log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); on the GPU host, in a copy of the checkout that has it:")
    log(f"  tar -xJf {out}/bundle.tar.xz -C {out}")
    log(f"  python3 benchmarks/replicate.py --size {args.size} --target {args.target} --device cuda --out {out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    results_json = out / "results.json"
    publish_ok = args.size != "smoke" and not args.no_publish
    if args.report_only:
        if not results_json.is_file():
            log(f"error: no {results_json} to draw from; run rows into that --out first (or pass the --out they used)")
            return 2
        results = json.loads(results_json.read_text())
        paths = report.write(results, out)
        if publish_ok:
            publish(paths, results_json)
        return 0

    if args.search_spec:
        return write_search_spec(args)
    if args.bundle:
        return write_bundle(args)
    began = time.perf_counter()
    header = {"size_name": args.size, "target": args.target, "device": args.device, "seed": args.seed}
    if args.fresh:
        for path in (out / "tokenizer", out / "bases"):
            shutil.rmtree(path, ignore_errors=True)
        results_json.unlink(missing_ok=True)
    try:
        store = ResultsStore(results_json, header)
    except ValueError as e:
        log(f"error: {e}")
        return 2
    log(f"size {args.size}, target {args.target}, on {args.device}; {len(args.rows)} rows; results in {out}")
    store.data["device_name"] = machine_info(args.device).get("gpu") or f"{os.cpu_count()} CPU cores"
    run_rows(args, store)
    store.data["info"]["last_invocation_s"] = time.perf_counter() - began
    store.save()
    paths = report.write(store.data, out)
    print(report.markdown(store.data), flush=True)
    if publish_ok:
        publish(paths, results_json)
    log(f"done in {time.perf_counter() - began:.0f}s: {', '.join(str(p) for p in [results_json, *paths])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
