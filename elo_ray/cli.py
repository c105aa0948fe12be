"""The `elo-ray` command line: run, validate, status, demo.

    elo-ray run jobs/demo.yaml --run-id 'ko-{date}' --set pretrain.train.lr=1e-5
    elo-ray validate jobs/llama3.1-8b-korean.yaml
    elo-ray status work/runs/demo [--json]
    elo-ray demo

Exit codes: 0 every asked stage is complete; 2 the spec or the run is invalid (one line per
problem, each naming the key or URI); 1 a stage failed while running.

Messages go to stdout as `[elo-ray] ...` at INFO; `--verbose` adds DEBUG lines, `--quiet` keeps
only warnings (run, validate, demo). Problems and warnings about the spec go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources

from elo_ray import logs
from elo_ray.config import JobSpec, SpecError, load_spec

EXIT_INVALID = 2
DEMO_SPEC = "demo.yaml"  # inside the package; jobs/demo.yaml is the same file for users to copy


def _print_problems(header: str, problems: list[str]) -> None:
    print(header, file=sys.stderr)
    for p in problems:
        print(f"  {p}", file=sys.stderr)


def _load(path: str, overrides: list[str]) -> JobSpec | None:
    try:
        return load_spec(path, overrides)
    except SpecError as e:
        _print_problems(f"{e.source}: invalid job spec", e.problems)
        return None


def _validate(spec: JobSpec) -> bool:
    from elo_ray.validate import validate

    report = validate(spec)
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not report.ok:
        _print_problems("the job spec cannot run:", report.problems)
    return report.ok


def cmd_validate(args) -> int:
    spec = _load(args.spec, args.set)
    if spec is None:
        return EXIT_INVALID
    if not _validate(spec):
        return EXIT_INVALID
    print(f"{args.spec}: valid")
    return 0


def cmd_run(args) -> int:
    from elo_ray import pipeline
    from elo_ray.stages import STAGES

    spec = _load(args.spec, args.set)
    if spec is None or not _validate(spec):
        return EXIT_INVALID
    try:
        run_id = pipeline.resolve_run_id(args.run_id or spec.run_id)
    except pipeline.PipelineError as e:
        _print_problems("cannot start:", [str(e)])
        return EXIT_INVALID
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    try:
        done = pipeline.run_pipeline(spec, run_id, STAGES, stages=stages, overridden=bool(args.set))
    except pipeline.PipelineError as e:
        _print_problems("run stopped:", [str(e)])
        return EXIT_INVALID
    run = pipeline.Run(spec, run_id)
    print(f"\nrun {run_id} complete at {run.uri}")
    for stage, m in done.items():
        for name, uri in m.uris.items():
            print(f"  {stage}.{name}: {uri}")
    if "eval" in done:
        from elo_ray import storage

        print("\n" + storage.read_text(done["eval"].uris["table"]))
    return 0


def cmd_status(args) -> int:
    from elo_ray import pipeline

    try:
        status = pipeline.run_status(args.run_uri)
    except pipeline.PipelineError as e:
        _print_problems("no status:", [str(e)])
        return EXIT_INVALID
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    for stage, s in status.items():
        secs = s.get("seconds")
        extra = f"  {secs:.1f}s" if secs is not None else ""
        metrics = s.get("metrics", {})
        keys = [k for k in ("loss", "tokens_per_s", "steps") if k in metrics]
        summary = "  " + " ".join(f"{k}={metrics[k]:.4g}" for k in keys) if keys else ""
        print(f"{stage:9s} {s['state']}{extra}{summary}")
    return 0


def cmd_demo(args) -> int:
    spec_path = str(resources.files("elo_ray") / DEMO_SPEC)
    overrides = [f"storage.root={os.path.abspath(os.path.join(args.workdir, 'runs'))}", *args.set]
    return cmd_run(argparse.Namespace(**{**vars(args), "spec": spec_path, "set": overrides, "stages": None}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elo-ray", description="ELO continual pretraining on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_verbosity(p):
        loud = p.add_mutually_exclusive_group()
        loud.add_argument("--verbose", "-v", action="store_true", help="also print debug messages")
        loud.add_argument("--quiet", "-q", action="store_true", help="print only warnings and errors")

    def with_spec(p):
        with_verbosity(p)
        p.add_argument("spec", help="job spec YAML")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec key, e.g. pretrain.train.lr=1e-5 (repeatable)")

    p = sub.add_parser("run", help="run the pipeline (skips committed stages, resumes training)")
    with_spec(p)
    p.add_argument("--run-id", help="run id; {date}, {time}, {datetime} are filled in (default: the spec's run_id)")
    p.add_argument("--stages", help="comma-separated stages to run, e.g. pretrain,merge")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("validate", help="check a spec, its storage, model and data before spending GPUs")
    with_spec(p)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("status", help="each stage's state, duration and key metrics")
    p.add_argument("run_uri", help="{storage.root}/{run_id}")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded default (tiny model, bundled corpus)")
    p.add_argument("--workdir", default="work/demo", help="where the demo keeps its runs (default work/demo)")
    p.add_argument("--run-id", default="demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    with_verbosity(p)
    p.set_defaults(fn=cmd_demo)

    args = parser.parse_args(argv)
    logs.configure(logs.level_from_flags(getattr(args, "verbose", False), getattr(args, "quiet", False)))
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
