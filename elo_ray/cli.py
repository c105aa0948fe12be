"""The `elo-ray` command line: run, search, validate, status, report, demo.

    elo-ray run jobs/demo.yaml --run-id 'ko-{date}' --set pretrain.train.lr=1e-5
    elo-ray search jobs/demo.yaml --candidates "0,-1; 0,1; -2,-1"
    elo-ray validate jobs/llama3.1-8b-korean.yaml [--cluster cluster/aws-p4d-a100.yaml]
    elo-ray status work/runs/demo [--json]
    elo-ray report work/runs/demo        # PNG plots and a markdown summary in {run}/report/
    elo-ray demo

Exit codes:
    0  every asked stage is complete (search: at least one candidate finished; the failed ones
       are in the ranking with their errors)
    2  bad input: the spec, its data or models, or the run as asked, is wrong; changing the
       spec, the data or the command fixes it. Before a run: one line per problem, each
       naming the key or URI. During a run: SpecError; PipelineError (a stage's input
       missing, another spec under the same run id); LeaseHeld (another driver holds the
       run); DataError (a source that cannot be read as configured); SurgeryError (a
       checkpoint or layer choice that does not fit); TrainingError and
       CheckpointMismatchError (settings the model or the checkpoint cannot train with).
    1  a failure: the input may be fine but the run did not get through: DivergedError (the
       loss became NaN/inf); StorageError (storage did not answer after retries); LeaseLost
       (another driver took the run over, or the lease could not be refreshed); a Ray worker
       or task that crashed more often than resources.max_failures allows; search: no
       candidate finished; an unexpected error (printed with its traceback: a bug to report).
A run stops with one last line on stderr, `run stopped: STAGE: message` (`run stopped: message`
for what goes wrong outside a stage), and no traceback unless `--debug` is given. Errors raised
inside Ray tasks and Train workers are unwrapped to the project's own error.

One driver per run: `run` and `demo` hold the run's lease (lease.py) while they work; a second
driver on the same run exits 2 naming the holder. A killed driver's lease is taken over at once
by a rerun on the same host, a silent one after lease.STALE_S; `--force-unlock` takes it now.
`search` holds the lease of `{run}/search` (elo_ray/search).

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

EXIT_FAILED = 1
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


def _validate(spec: JobSpec, cluster: str | None = None) -> bool:
    from elo_ray.validate import validate

    report = validate(spec, cluster)
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not report.ok:
        _print_problems("the job spec cannot run:", report.problems)
    return report.ok


def cmd_validate(args) -> int:
    spec = _load(args.spec, args.set)
    if spec is None:
        return EXIT_INVALID
    if not _validate(spec, args.cluster):
        return EXIT_INVALID
    print(f"{args.spec}: valid" + (f" (checked against {args.cluster})" if args.cluster else ""))
    return 0


def _bad_input() -> tuple[type[BaseException], ...]:
    from elo_ray.data.sources import DataError
    from elo_ray.lease import LeaseHeld
    from elo_ray.pipeline import PipelineError
    from elo_ray.surgery import SurgeryError
    from elo_ray.train.errors import TrainingError  # CheckpointMismatchError is one

    return (SpecError, PipelineError, LeaseHeld, DataError, SurgeryError, TrainingError)


def _own_failures() -> tuple[type[BaseException], ...]:
    from elo_ray.lease import LeaseLost
    from elo_ray.storage import StorageError
    from elo_ray.train.errors import DivergedError

    return (DivergedError, StorageError, LeaseLost)


def _ray_failures() -> tuple[type[BaseException], ...]:
    import ray.exceptions
    import ray.train

    return (ray.exceptions.RayError, ray.train.TrainingFailedError)


def _stopped(error: Exception, debug: bool) -> int:
    """End a run on `error`: the traceback when asked for (or for a bug), then one line."""
    import traceback

    from elo_ray.pipeline import StageError

    from elo_ray.stages import root_error

    cause = root_error(error)
    own_failure = isinstance(cause, _own_failures())  # tested first: DivergedError is a TrainingError
    bad_input = not own_failure and isinstance(cause, _bad_input())
    ray_failure = not (own_failure or bad_input) and isinstance(cause, _ray_failures())
    if own_failure or bad_input:
        lines = _lines(str(cause))
    elif ray_failure:  # Ray's messages hold whole tracebacks: the first line says what happened
        lines = _lines(f"{type(cause).__name__}: {cause}")[:1] + ["rerun with --debug for the details"]
    else:
        lines = _lines(f"{type(cause).__name__}: {cause}") + ["an unexpected error: please report it with the traceback"]
    if debug or not (own_failure or bad_input or ray_failure):
        traceback.print_exception(error, file=sys.stderr)
    stage = f"{error.stage}: " if isinstance(error, StageError) else ""
    print(f"run stopped: {stage}{'; '.join(lines)}", file=sys.stderr)
    return EXIT_INVALID if bad_input else EXIT_FAILED


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def cmd_run(args) -> int:
    from elo_ray import pipeline
    from elo_ray.stages import STAGES

    spec = _load(args.spec, args.set)
    if spec is None or not _validate(spec):
        return EXIT_INVALID
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    try:
        run_id = pipeline.resolve_run_id(args.run_id or spec.run_id)
        done = pipeline.run_pipeline(spec, run_id, STAGES, stages=stages, overridden=bool(args.set),
                                     force_unlock=args.force_unlock)
    except Exception as e:
        return _stopped(e, args.debug)
    run = pipeline.Run(spec, run_id)
    print(f"\nrun {run_id} complete at {run.uri}")
    for stage, m in done.items():
        for name, uri in m.uris.items():
            print(f"  {stage}.{name}: {uri}")
    if "eval" in done:
        from elo_ray import storage

        print("\n" + storage.read_text(done["eval"].uris["table"]))
    return 0


def cmd_search(args) -> int:
    from elo_ray import pipeline
    from elo_ray import layer_sets as candidates
    from elo_ray.search import run_search

    spec = _load(args.spec, args.set)
    if spec is None or not _validate(spec):
        return EXIT_INVALID
    try:
        given = candidates.parse(args.candidates) if args.candidates is not None else None
        run_id = pipeline.resolve_run_id(args.run_id or spec.run_id)
        result = run_search(spec, run_id, given, force_unlock=args.force_unlock)
    except candidates.CandidateError as e:
        _print_problems("no search:", [str(e)])
        return EXIT_INVALID
    except Exception as e:
        return _stopped(e, args.debug)
    print("\n" + result.markdown)
    for name, uri in result.uris.items():
        print(f"  {name}: {uri}")
    best = result.best
    if best is None:
        print("search: no candidate finished; see the errors above", file=sys.stderr)
        return EXIT_FAILED
    print(f"\nbest: layers {best.layers}; run with\n  {best.set_line}")
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
    print(f"{'lease':9s} {_lease_state(args.run_uri)}")
    for stage, s in status.items():
        secs = s.get("seconds")
        extra = f"  {secs:.1f}s" if secs is not None else ""
        metrics = s.get("metrics", {})
        keys = [k for k in ("loss", "tokens_per_s", "steps") if k in metrics]
        summary = "  " + " ".join(f"{k}={metrics[k]:.4g}" for k in keys) if keys else ""
        print(f"{stage:9s} {s['state']}{extra}{summary}")
    return 0


def _lease_state(run_uri: str) -> str:
    from elo_ray import lease

    _, holder = lease.current(run_uri)
    if holder is None:
        return "none"
    return "released" if holder.state == "released" else f"held by {holder.describe()}"


def cmd_report(args) -> int:
    from elo_ray.report import ReportError, write_report

    try:
        out = write_report(args.run_uri, args.out)
    except ReportError as e:
        _print_problems("no report:", [str(e)])
        return EXIT_INVALID
    from elo_ray import storage

    plots = [n for n in storage.listdir(out) if n.endswith(".png")]
    print(f"report: {storage.join(out, 'README.md')}" + (f" with {', '.join(plots)} beside it" if plots else ""))
    return 0


def cmd_demo(args) -> int:
    spec_path = str(resources.files("elo_ray") / DEMO_SPEC)
    overrides = [f"storage.root={os.path.abspath(os.path.join(args.workdir, 'runs'))}", *args.set]
    from elo_ray import harness

    if not harness.installed():  # the demo still runs; it says how to see task accuracy too
        print(f"note: lm-evaluation-harness is not installed, so the demo scores perplexity only; {harness.EXTRA_HINT}")
        overrides.append("eval.tasks=[]")
    code = cmd_run(argparse.Namespace(**{**vars(args), "spec": spec_path, "set": overrides, "stages": None}))
    if code == 0:  # the demo ends by saying where its plots and summary are
        from elo_ray import pipeline

        runs = os.path.abspath(os.path.join(args.workdir, "runs"))
        code = cmd_report(argparse.Namespace(run_uri=os.path.join(runs, pipeline.resolve_run_id(args.run_id)), out=None))
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elo-ray", description="ELO continual pretraining on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_verbosity(p):
        loud = p.add_mutually_exclusive_group()
        loud.add_argument("--verbose", "-v", action="store_true", help="also print debug messages")
        loud.add_argument("--quiet", "-q", action="store_true", help="print only warnings and errors")

    def with_debug(p):
        p.add_argument("--debug", action="store_true", help="print the traceback when the run stops on an error")

    def with_force_unlock(p):
        p.add_argument("--force-unlock", action="store_true",
                       help="take the run's lease from a driver that holds it (only when that driver is gone)")

    def with_spec(p):
        with_verbosity(p)
        p.add_argument("spec", help="job spec YAML")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec key, e.g. pretrain.train.lr=1e-5 (repeatable)")

    p = sub.add_parser("run", help="run the pipeline (skips committed stages, resumes training)")
    with_spec(p)
    p.add_argument("--run-id", help="run id; {date}, {time}, {datetime} are filled in (default: the spec's run_id)")
    p.add_argument("--stages", help="comma-separated stages to run, e.g. pretrain,merge")
    with_force_unlock(p)
    with_debug(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("search", help="which layers to detach: short ELO runs of candidate layer sets, ranked")
    with_spec(p)
    p.add_argument("--run-id", help="run id; the search lives under {storage.root}/{run_id}/search/")
    p.add_argument("--candidates", metavar="SETS",
                   help='layer sets separated by ";", e.g. "0,-1; 0,1; -2,-1; 0,15,-1" (default: search.candidates, '
                        "or sets derived from the model's depth)")
    with_force_unlock(p)
    with_debug(p)
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser("validate", help="check a spec, its storage, model and data before spending GPUs")
    with_spec(p)
    p.add_argument("--cluster", metavar="FILE",
                   help="a Ray cluster launcher YAML or KubeRay manifest: check the spec's resources and "
                        "memory against it (e.g. cluster/aws-p4d-a100.yaml)")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("status", help="each stage's state, duration and key metrics")
    p.add_argument("run_uri", help="{storage.root}/{run_id}")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("report", help="PNG plots (loss, perplexity, task scores) and a markdown summary of a run")
    p.add_argument("run_uri", help="{storage.root}/{run_id}")
    p.add_argument("--out", help="where to write them (default {run}/report)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded default (tiny model, bundled corpus)")
    p.add_argument("--workdir", default="work/demo", help="where the demo keeps its runs (default work/demo)")
    p.add_argument("--run-id", default="demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    with_verbosity(p)
    with_force_unlock(p)
    with_debug(p)
    p.set_defaults(fn=cmd_demo)

    args = parser.parse_args(argv)
    logs.configure(logs.level_from_flags(getattr(args, "verbose", False), getattr(args, "quiet", False)))
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
