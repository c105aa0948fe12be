"""Where elo-ray's messages go: one logger tree, one format, set up in one place.

Every module logs through `log = logging.getLogger(__name__)`, so every message belongs to the
`elo_ray` logger. Nothing is printed until `configure` is called: the CLI calls it once with the
level of `--verbose` (DEBUG), `--quiet` (WARNING) or neither (INFO), and messages then go to
stdout as `[elo-ray] message`. A library user sets levels as with any library (tests use
pytest's `caplog`).

Code that runs in Ray worker processes (the Ray Train worker loop, Ray tasks) is wrapped with
`in_workers`, which takes the driver's level along as an argument: a worker on another node does
not inherit the driver's environment nor its logging set-up.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, TypeVar

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


def configure(level: int = logging.INFO, *, propagate: bool = True) -> None:
    """Send `elo_ray` messages of `level` and above to stdout as `[elo-ray] message`.

    Idempotent: a second call changes the level and keeps one handler. `propagate=False` keeps
    messages away from the root logger's handlers (Ray Train workers have their own there)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    logger.propagate = propagate
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        logger.addHandler(_Stdout())


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

    The level is read on the driver when this is called and travels with the pickled function,
    so `ray.remote(in_workers(fn))` and `TorchTrainer(in_workers(loop))` log like the driver
    on any node."""
    driver_level = level()

    @functools.wraps(fn)
    def run_with_driver_level(*args, **kwargs):
        configure(driver_level, propagate=False)
        return fn(*args, **kwargs)

    return run_with_driver_level  # type: ignore[return-value]
