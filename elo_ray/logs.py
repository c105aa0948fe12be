"""Where elo-ray's messages go: one logger tree, one format, set up in one place.

Every module logs through `log = logging.getLogger(__name__)`, so every message belongs to the
`elo_ray` logger. Nothing is printed until `configure` is called: the CLI calls it once with the
level of `--verbose` (DEBUG), `--quiet` (WARNING) or neither (INFO), and messages then go to
stdout as `[elo-ray] message`. A library user sets levels as with any library (tests use
pytest's `caplog`).

Code that runs in Ray worker processes (the Ray Train worker loop, Ray tasks) is wrapped with
`in_workers`, which takes the driver's level along as an argument: a worker on another node does
not inherit the driver's environment nor its logging set-up. Once the driver relays worker
messages (`log_relay`, started with Ray), a worker's messages go there instead of its stdout,
and the driver prints them as its own.

Other libraries' output belongs to --verbose: at INFO and above `configure` turns off the
progress bars of Ray Data and transformers ("Loading weights", "Writing model shards").
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from logging.handlers import QueueHandler
from typing import Callable, TypeVar

from elo_ray import log_relay

LOGGER = "elo_ray"
FORMAT = "[elo-ray] %(message)s"

F = TypeVar("F", bound=Callable)


class _Stdout(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is when a message is logged (pytest's capsys swaps it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(level: int = logging.INFO, *, propagate: bool = True, handler: logging.Handler | None = None) -> None:
    """Send `elo_ray` messages of `level` and above to stdout as `[elo-ray] message`, or to
    `handler` (a Ray worker's relay to the driver).

    Idempotent: a second call changes the level and keeps one handler. `propagate=False` keeps
    messages away from the root logger's handlers (Ray Train workers have their own there)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    logger.propagate = propagate
    handler = handler or next((h for h in logger.handlers if isinstance(h, _Stdout)), None) or _Stdout()
    for old in [h for h in logger.handlers if h is not handler and isinstance(h, (_Stdout, QueueHandler))]:
        logger.removeHandler(old)
    if handler not in logger.handlers:
        logger.addHandler(handler)
    _library_progress_bars(level <= logging.DEBUG)


def _library_progress_bars(shown: bool) -> None:
    """Ray Data's and transformers' progress bars only at DEBUG: they tell the libraries' story.
    Both read the environment (Ray Data when its context is made, and it travels to the
    workers with the datasets); transformers, if already imported, is told directly."""
    if shown:
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def quiet_ray_data() -> None:
    """Ray Data's console lines on this driver (dataset started, its plan, finished, progress bars
    off) only at DEBUG: they tell Ray Data's story and stay in the session's ray-data.log."""
    import ray.data  # noqa: F401 - its loggers are set up on import

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.ERROR)


WORKER_POOL_NOTICE = "worker processes have been started on node"
"""The raylet's notice, each time its live worker processes reach another multiple of the node's
CPUs from four up: "WARNING: 8 PYTHON worker processes have been started on node: ... This could
be a result of using a large number of actors, or due to tasks blocked in ray.get() calls"."""


def quiet_worker_pool_notice() -> None:
    """The raylet's WORKER_POOL_NOTICE off this driver's console (it stays in the raylet's log):
    a Ray Train run is a controller, its workers and Ray Data's actors, and the local Ray keeps
    idle workers for the next task (`local_ray.IDLE_WORKERS`), so on a small machine the count
    passes four per CPU in an ordinary run, where the notice tells the user of nothing to do.
    Every other message the raylet sends the driver (a task killed for memory, ...) is printed
    as before. Ray 2.60 prints them from its error-listener thread through
    `ray._private.worker.print_to_stdstream`, looked up at each message: that function is
    wrapped, once."""
    import ray._private.worker as ray_worker

    shown = ray_worker.print_to_stdstream
    if getattr(shown, "elo_ray_quiet", False):
        return

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            data = {**data, "lines": [line for line in data["lines"] if WORKER_POOL_NOTICE not in line]}
            if not data["lines"]:
                return
        shown(data, ignore_prefix)

    print_to_stdstream.elo_ray_quiet = True
    ray_worker.print_to_stdstream = print_to_stdstream


def level() -> int:
    """The `elo_ray` logger's effective level here (the one `in_workers` passes on)."""
    return logging.getLogger(LOGGER).getEffectiveLevel()


def level_from_flags(verbose: bool = False, quiet: bool = False) -> int:
    """The CLI's level: --verbose DEBUG, --quiet WARNING, else INFO."""
    if verbose:
        return logging.DEBUG
    return logging.WARNING if quiet else logging.INFO


def in_workers(fn: F) -> F:
    """`fn` to run in a Ray worker process, logging at the level in force here and now.

    The level (and the driver's relay, when it runs) is read on the driver when this is called
    and travels with the pickled function, so `ray.remote(in_workers(fn))` and
    `TorchTrainer(in_workers(loop))` log like the driver, and to it, on any node."""
    driver_level = level()
    relay = log_relay.sink()

    @functools.wraps(fn)
    def run_with_driver_level(*args, **kwargs):
        configure(driver_level, propagate=False, handler=None if relay is None else log_relay.worker_handler(relay))
        return fn(*args, **kwargs)

    return run_with_driver_level  # type: ignore[return-value]
