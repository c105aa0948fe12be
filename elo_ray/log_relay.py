"""elo-ray's messages from Ray workers, on the driver, without Ray's stream of worker output.

The driver starts Ray with `log_to_driver` off unless `--verbose` (`stages.ensure_ray`): what
Ray workers print (Ray's own logs, progress bars, library warnings) stays in the session's log
files. What elo-ray itself says in a worker (the trainer's start, progress and export lines, the
data reader's, a Ray task's) comes through this relay instead, so that it reaches the driver
whatever Ray streams, on one node or many: a worker's `elo_ray` logger hands its records to a
Ray queue (`logging.handlers.QueueHandler` over `ray.util.queue.Queue`), and a thread on the
driver logs them through the driver's logger of the same name, in the driver's format and at
its level.

`logs.in_workers` installs the worker side; `start` runs the driver side once Ray is up. A
worker's `put` returns once the record is in the queue, so after a worker function or a Ray
Train run has returned, `flush` on the driver has logged everything it said.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import threading

_relay: "_Relay | None" = None


def _log_on_driver(record: logging.LogRecord) -> None:
    """Log a worker's record through the driver's logger of the record's name."""
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


class _Relay:
    """A Ray queue that workers put records in, drained by a thread on the driver. One
    consumer at a time (the lock), so records come out in the order each worker put them."""

    POLL_S = 0.5

    def __init__(self):
        from ray.util.queue import Queue

        # No CPU: the queue must not wait for, nor take one from, training and data tasks.
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._drain, name="elo-ray log relay", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self.stopping.is_set():
            try:
                with self.lock:
                    _log_on_driver(self.queue.get(timeout=self.POLL_S))
            except Empty:
                pass
            except Exception:  # Ray shut down under the relay: stop quietly
                return

    def flush(self) -> None:
        from ray.util.queue import Empty

        with self.lock:
            while True:
                try:
                    _log_on_driver(self.queue.get_nowait())
                except Empty:
                    return

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2 * self.POLL_S)
        try:
            self.flush()
            self.queue.shutdown()
        except Exception:  # Ray is already gone, and the queue with it
            pass


def start() -> None:
    """On the driver, once Ray is up: log what workers send from now on (idempotent). Closed
    at exit, before Ray shuts down."""
    global _relay
    if _relay is None:
        _relay = _Relay()
        atexit.register(close)


def sink():
    """The queue a worker sends its records to; None when no relay runs (workers print)."""
    return _relay.queue if _relay is not None else None


class _ToDriver(logging.handlers.QueueHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        # The driver is gone (its queue with it): a warning still shows in the worker's log.
        logging.lastResort.handle(record)


def worker_handler(queue) -> logging.Handler:
    """The handler of a worker's `elo_ray` logger: each record to the driver through `queue`."""
    return _ToDriver(queue)


def flush() -> None:
    """Log on the driver every record workers have sent so far (call after ray.get or fit)."""
    if _relay is not None:
        _relay.flush()


def close() -> None:
    """Stop relaying (at exit, or before `ray.shutdown`)."""
    global _relay
    if _relay is not None:
        relay, _relay = _relay, None
        relay.close()
