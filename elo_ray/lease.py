"""One driver per run: a lease in the run's storage, taken atomically, kept alive by a heartbeat.

A scheduled run and a manual one, or a retried `ray job submit`, must not both drive
`{root}/{run_id}`: both would train and write, and their manifests would race. The lease lives at

    {root}/{run_id}/lease/{n:08d}.json      n = 1, 2, 3, ...

The highest number is the lease; its JSON names the holder (host, pid, since, last heartbeat)
and its state (held or released). A driver takes the run by creating the NEXT number with
`storage.create_exclusive`, which succeeds for exactly one of any number of drivers trying the
same name (local: hard link; S3: If-None-Match: *; GCS: ifGenerationMatch=0). Taking a free run
and taking over a dead one are the same race-free step: two drivers that both find lease n stale
both try n+1, and one of them gets it; the other is refused, naming the winner. Only the holder
ever writes its own number (the heartbeat, every HEARTBEAT_S, and `released` at the end), so
no write can undo another driver's.

What the driver does with the lease it finds:
- none, or released: takes the next number;
- held by a process of this host that is no longer running (a killed driver): takes over at
  once, so that rerunning a killed driver works immediately;
- held, with no heartbeat for STALE_S: takes over, with a warning naming the old holder
  (a driver on another host that died; the clocks of the two hosts must agree to well within
  STALE_S, as NTP keeps them);
- held and alive: stops with `LeaseHeld` (exit 2) naming the holder; `--force-unlock` takes
  over anyway (for a holder known to be gone whose host cannot tell).
A holder whose heartbeat finds a higher number (it was taken over), finds another driver's
record under its own number (a store that ignored the condition of the create), or cannot
refresh the lease for STALE_S - 2 * HEARTBEAT_S interrupts its driver, which stops with
`LeaseLost` (exit 1).

What is guaranteed where (the create is the whole mechanism):
- local storage: `link(2)` of a complete file is atomic on a POSIX filesystem, for drivers on
  one machine or sharing one filesystem that implements it (NFS servers do; a client retrying
  a lost reply may report EEXIST for its own link, which the token check turns into success);
- S3: PutObject with If-None-Match: * is atomic on AWS S3 since August 2024: of concurrent
  creators one gets 200 and the others 412 (or 409 ConditionalRequestConflict, retried). Other
  S3 stores must implement the header; one that ignores it degrades to "the second driver
  notices within HEARTBEAT_S and stops";
- moto's S3 server (the tests): answers both conditions correctly but checks and then writes
  without a lock, so it proves the protocol, not atomicity (the race test runs on local files);
- GCS: ifGenerationMatch=0 is atomic by GCS's generation preconditions (412); gcsfs marks its
  mode="create" experimental and no test here reaches GCS.
"""

from __future__ import annotations

import _thread
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Iterator

from elo_ray import processes, storage

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
"""Seconds between heartbeats of the holder."""
STALE_S = 300.0
"""A lease without a heartbeat for this long is taken over (its holder is presumed dead)."""
LEASE_DIR = "lease"
_NAME = re.compile(r"^(\d{8})\.json$")


class LeaseHeld(RuntimeError):
    """Another driver holds the run; the message names it and what to do."""


class LeaseLost(RuntimeError):
    """This driver's lease was taken over or could not be refreshed; the run stopped."""


@dataclasses.dataclass
class Holder:
    """The content of one lease object."""

    host: str
    pid: int
    process_started: float  # the process's start time, so a reused pid is not mistaken for it
    since: str  # ISO times, UTC
    heartbeat: str
    token: str  # tells this driver's own object from another's
    state: str = "held"  # or "released"

    @classmethod
    def of_this_process(cls) -> "Holder":
        now = _now()
        return cls(socket.gethostname(), os.getpid(), processes.start_time(), now, now, uuid.uuid4().hex)

    def seconds_since_heartbeat(self) -> float:
        return time.time() - dt.datetime.fromisoformat(self.heartbeat).timestamp()

    def gone_from_this_host(self) -> bool:
        """The holder ran on this host and its process is no longer running."""
        return self.host == socket.gethostname() and not processes.running(self.pid, self.process_started)

    def describe(self) -> str:
        return (f"host {self.host}, pid {self.pid}, since {self.since}, last heartbeat {self.heartbeat} "
                f"({self.seconds_since_heartbeat():.0f}s ago)")

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2).encode()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def lease_uri(run_uri: str, n: int) -> str:
    """Where lease number `n` of the run at `run_uri` lives."""
    return storage.join(run_uri, LEASE_DIR, f"{n:08d}.json")


def _numbers(run_uri: str) -> list[int]:
    names = storage.listdir(storage.join(run_uri, LEASE_DIR))
    return sorted(int(m.group(1)) for m in map(_NAME.match, names) if m)


def current(run_uri: str) -> tuple[int, Holder | None]:
    """The lease's number and holder; (0, None) when the run was never leased."""
    for _ in range(3):  # a newer driver may remove what was listed: list again
        numbers = _numbers(run_uri)
        if not numbers:
            return 0, None
        with contextlib.suppress(storage.StorageError):
            return numbers[-1], Holder(**json.loads(storage.read_text(lease_uri(run_uri, numbers[-1]))))
    raise storage.StorageError(f"{storage.join(run_uri, LEASE_DIR)}: the lease changed while being read, three times")


def _takeover(holder: Holder | None, force: bool) -> tuple[int, str] | None:
    """(log level, why) when `holder`'s lease may be taken now; None when it may not."""
    if holder is None or holder.state == "released":
        return logging.DEBUG, "the run is free"
    if holder.gone_from_this_host():
        return logging.INFO, f"taking over the lease of pid {holder.pid} on {holder.host}, which is no longer running"
    if holder.seconds_since_heartbeat() > STALE_S:
        return logging.WARNING, f"taking over the lease of {holder.describe()}: no heartbeat for more than {STALE_S:.0f}s"
    if force:
        return logging.WARNING, f"--force-unlock: taking over the lease of {holder.describe()}"
    return None


class Lease:
    """The lease this driver holds: number `n` of the run at `run_uri`."""

    def __init__(self, run_uri: str, n: int, holder: Holder):
        self.run_uri, self.n, self.holder = run_uri, n, holder
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="elo-ray-lease", daemon=True)

    @property
    def uri(self) -> str:
        return lease_uri(self.run_uri, self.n)

    def _beat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(HEARTBEAT_S):
            try:
                newer = [n for n in _numbers(self.run_uri) if n > self.n]
                if newer:
                    _, other = current(self.run_uri)
                    return self._lose(f"another driver took the run over ({other.describe() if other else 'unknown'})")
                mine = Holder(**json.loads(storage.read_text(self.uri)))
                if mine.token != self.holder.token:  # a store that ignored If-None-Match let it be overwritten
                    return self._lose(f"another driver overwrote this driver's lease ({mine.describe()}); the "
                                      "storage does not honour conditional writes")
                self.holder.heartbeat = _now()
                storage.write_bytes(self.uri, self.holder.to_json())
                last_ok = time.monotonic()
            except Exception as e:  # storage trouble: keep trying until the lease may be stale
                silent = time.monotonic() - last_ok
                log.warning(f"lease: heartbeat failed ({type(e).__name__}: {e}); {silent:.0f}s without one")
                if silent > STALE_S - 2 * HEARTBEAT_S:
                    return self._lose(f"the lease could not be refreshed for {silent:.0f}s, so another driver may take it")

    def _lose(self, reason: str) -> None:
        self.lost = reason
        log.error(f"lease lost: {reason}; stopping this driver")
        _thread.interrupt_main()

    def start(self) -> None:
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (unless it was lost to another driver)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if self.lost is None:
            self.holder.state, self.holder.heartbeat = "released", _now()
            try:
                storage.write_bytes(self.uri, self.holder.to_json())
            except Exception as e:  # the run's own error, if any, matters more
                log.warning(f"lease: could not mark {self.uri} released ({e}); the next driver on this "
                            f"host takes it over at once, elsewhere after {STALE_S:.0f}s")


def acquire(run_uri: str, force: bool = False, attempts: int = 5) -> Lease:
    """Take the run's lease (see the module docstring) and start its heartbeat."""
    me = Holder.of_this_process()
    for _ in range(attempts):
        n, holder = current(run_uri)
        takeover = _takeover(holder, force)
        if takeover is None:
            raise LeaseHeld(
                f"run {run_uri} is held by another driver: {holder.describe()}. Wait for it to end or stop it; "
                f"a lease without heartbeat is taken over after {STALE_S:.0f}s, and --force-unlock takes it "
                "now (only when that driver is gone for good)"
            )
        created = storage.create_exclusive(lease_uri(run_uri, n + 1), me.to_json())
        # not created: another driver was first, unless a retried request of ours was
        if created or json.loads(storage.read_text(lease_uri(run_uri, n + 1)))["token"] == me.token:
            log.log(takeover[0], f"lease: {takeover[1]}")
            lease = Lease(run_uri, n + 1, me)
            _remove_older(run_uri, n + 1)
            lease.start()
            return lease
        force = False  # forcing applies to the lease this driver saw, never to a new winner
    raise LeaseHeld(f"run {run_uri}: {attempts} drivers in a row took the lease first; try again")


def _remove_older(run_uri: str, n: int) -> None:
    for old in _numbers(run_uri):
        if old < n:
            storage.remove(lease_uri(run_uri, old))


@contextlib.contextmanager
def hold(run_uri: str, force: bool = False) -> Iterator[Lease]:
    """Hold the run's lease for the duration of the block; released on the way out.

    When the lease is lost meanwhile, the heartbeat interrupts the main thread and the block
    ends with `LeaseLost`. The interrupt runs whatever SIGINT handler is installed: Ray Train's
    (installed while a trainer runs, and left behind) aborts the training run instead of raising,
    so the block's end, however it comes, is where a lost lease is turned into `LeaseLost`."""
    lease = acquire(run_uri, force)
    try:
        yield lease
    except BaseException as e:
        if lease.lost is not None:
            raise LeaseLost(f"{lease.lost}; this driver stopped") from e
        raise
    else:
        if lease.lost is not None:
            raise LeaseLost(f"{lease.lost}; this driver stopped")
    finally:
        lease.release()
