"""One driver per run: the lease on local storage and on moto's S3 server. Other drivers are this
process, a second process, or a lease object written as another host's driver would write it."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from elo_ray import lease, storage


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs" / "r1")
    return request.getfixturevalue("s3_bucket") + "/runs/r1"


def foreign(run_uri: str, n: int = 1, *, age_s: float = 0.0, host: str = "gpu-node-7", pid: int = 4242) -> lease.Holder:
    """Lease number `n` as a driver on another host wrote it, its last heartbeat `age_s` ago."""
    t = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age_s)).isoformat(timespec="seconds")
    holder = lease.Holder(host, pid, 0.0, t, t, "token-of-the-other-driver")
    assert storage.create_exclusive(lease.lease_uri(run_uri, n), holder.to_json())
    return holder


HELD = r"run {run} is held by another driver: host {host}, pid {pid}, since {since}, last heartbeat {since} \(\d+s ago\)\. "


def test_create_exclusive_writes_once(run_uri):
    uri = storage.join(run_uri, "x.json")
    assert storage.create_exclusive(uri, b"first") is True
    assert storage.create_exclusive(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"


def test_a_free_run_is_taken_then_released(run_uri):
    with lease.hold(run_uri) as held:
        n, holder = lease.current(run_uri)
        assert (n, holder.host, holder.pid, holder.state) == (1, socket.gethostname(), os.getpid(), "held")
        assert holder.token == held.holder.token
    assert lease.current(run_uri)[1].state == "released"
    with lease.hold(run_uri):
        assert lease._numbers(run_uri) == [2]  # the next driver takes the next number, older ones go


def test_a_second_driver_is_refused_naming_the_holder(run_uri):
    with lease.hold(run_uri) as held:
        with pytest.raises(lease.LeaseHeld) as e:
            lease.acquire(run_uri)
        h = held.holder
        assert re.match(HELD.format(run=re.escape(run_uri), host=re.escape(h.host), pid=h.pid, since=re.escape(h.since)),
                        str(e.value))
        assert "--force-unlock" in str(e.value)
    assert lease._numbers(run_uri) == [1]


def test_the_lease_of_a_killed_driver_on_this_host_is_taken_over_at_once(run_uri, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from elo_ray import lease; "
         "lease.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)", run_uri],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(lease.LeaseHeld, match=f"pid {holder.pid},"):
            lease.acquire(run_uri)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    caplog.set_level(logging.INFO, logger="elo_ray")
    with lease.hold(run_uri) as held:
        assert held.n == 2
    assert (f"lease: taking over the lease of pid {holder.pid} on {socket.gethostname()}, which is no longer "
            "running") in caplog.messages


def test_a_lease_without_heartbeat_is_taken_over_with_a_warning(run_uri, caplog):
    old = foreign(run_uri, age_s=lease.STALE_S + 60)
    caplog.set_level(logging.INFO, logger="elo_ray")
    with lease.hold(run_uri) as held:
        assert held.n == 2
    [record] = [r for r in caplog.records if r.name == "elo_ray.lease"]
    assert record.levelno == logging.WARNING
    assert re.fullmatch(
        rf"lease: taking over the lease of host gpu-node-7, pid 4242, since {re.escape(old.since)}, last heartbeat "
        rf"{re.escape(old.since)} \(3[6-9]\ds ago\): no heartbeat for more than 300s", record.message)


def test_a_live_lease_of_another_host_needs_force_unlock(run_uri, caplog):
    other = foreign(run_uri, age_s=5)
    with pytest.raises(lease.LeaseHeld, match=HELD.format(run=re.escape(run_uri), host="gpu-node-7", pid=4242,
                                                           since=re.escape(other.since))):
        lease.acquire(run_uri)
    caplog.set_level(logging.INFO, logger="elo_ray")
    with lease.hold(run_uri, force=True) as held:
        assert held.n == 2 and lease.current(run_uri)[1].token == held.holder.token
    assert any(m.startswith("lease: --force-unlock: taking over the lease of host gpu-node-7, pid 4242")
               for m in caplog.messages)


def test_only_one_of_many_racing_drivers_takes_a_stale_lease(tmp_path):
    """Eight drivers find the same stale lease at once; one gets it, seven are refused naming it.
    (Local storage: moto's server checks a condition and then writes without a lock, so a race
    there says nothing about S3.)"""
    run_uri = str(tmp_path / "r1")
    foreign(run_uri, age_s=lease.STALE_S + 60)
    barrier = threading.Barrier(8)
    won, refused = [], []

    def driver():
        barrier.wait()
        try:
            won.append(lease.acquire(run_uri))
        except lease.LeaseHeld as e:
            refused.append(str(e))

    threads = [threading.Thread(target=driver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(won) == 1 and len(refused) == 7
        assert lease._numbers(run_uri) == [2]
        assert all(f"pid {os.getpid()}," in r for r in refused)
    finally:
        for held in won:
            held.release()


@pytest.fixture(params=["default", "ray-train"])
def sigint_handler(request):
    """The main thread's SIGINT handler: Python's, or one that aborts work without raising, as the
    handler Ray Train installs while a trainer runs (and leaves behind) does."""
    if request.param == "default":
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def busy(held: lease.Lease, seconds: float = 10) -> None:
    """A driver's work: it goes on until interrupted, or until it sees the lease lost."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and held.lost is None:
        time.sleep(0.01)


def test_a_driver_whose_lease_was_taken_over_stops(tmp_path, monkeypatch, sigint_handler):
    run_uri = str(tmp_path / "r1")
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    with pytest.raises(lease.LeaseLost, match=r"another driver took the run over \(host gpu-node-7, pid 4242, "
                       r".*\); this driver stopped"):
        with lease.hold(run_uri) as held:
            taker = foreign(run_uri, held.n + 1)  # an operator's --force-unlock on another host
            busy(held)
    n, holder = lease.current(run_uri)
    assert n == 2 and holder == taker  # the stopped driver left the taker's lease alone


def test_a_driver_whose_lease_was_overwritten_stops(tmp_path, monkeypatch, sigint_handler):
    """What a store that ignores If-None-Match allows: another driver's object under this one's number."""
    run_uri = str(tmp_path / "r1")
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    with pytest.raises(lease.LeaseLost, match=r"another driver overwrote this driver's lease \(host gpu-node-7, pid 4242, "
                       r".*\); the storage does not honour conditional writes; this driver stopped"):
        with lease.hold(run_uri) as held:
            t = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            storage.write_bytes(held.uri, lease.Holder("gpu-node-7", 4242, 0.0, t, t, "other").to_json())
            busy(held)
    assert lease.current(run_uri)[1].token == "other"
