"""Who holds something that outlives a process (a staging directory, a lease), and whether that
holder is gone.

`identity()` names the calling process so that another process can later tell, from this host
alone, that it has ended: host name, boot, PID namespace, PID and the process's start time
(which tells a reused PID from the original). `gone(holder)` is True only when that is certain;
a holder on another host, in another container's PID namespace or on a system without /proc
is never judged gone here (callers fall back to a heartbeat's age).

`start_time(pid)` and `running(pid, started)` ask the same of a process known only by its PID
and start time in seconds since the epoch (the run lease records those; its host is the
caller's to compare).
"""

from __future__ import annotations

import os
import socket

import psutil


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a live or zombie process, else None."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    fields = raw.rsplit(")", 1)[-1].split()  # the command name before ")" may hold spaces
    return fields[0], fields[19]


def identity() -> dict:
    """This process, as `gone` recognises it later."""
    stat = _stat(os.getpid())
    return {
        "host": socket.gethostname(),
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": _pid_namespace(),
        "pid": os.getpid(),
        "start": stat[1] if stat else None,
    }


def gone(holder: dict) -> bool:
    """True when the process `holder` (an `identity()`) has certainly ended; False when it is
    alive or when this host cannot tell."""
    me = identity()
    if holder.get("host") != me["host"] or not isinstance(holder.get("pid"), int):
        return False
    if holder.get("boot") and me["boot"] and holder["boot"] != me["boot"]:
        return True  # this host rebooted since
    if holder.get("pid_namespace") != me["pid_namespace"]:
        return False  # another container: its PIDs are not ours to look up
    if me["boot"] is None:  # no /proc: ask the kernel whether the PID exists
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        return False
    stat = _stat(holder["pid"])
    return stat is None or stat[0] == "Z" or (holder.get("start") is not None and stat[1] != holder["start"])


def start_time(pid: int | None = None) -> float:
    """When process `pid` (this process by default) started, in seconds since the epoch."""
    return psutil.Process(pid).create_time()


def running(pid: int, started: float) -> bool:
    """True while process `pid`, started at `started` (its `start_time`), runs on this host:
    False once it ended or is a zombie, or when the PID now names a process started at another
    time (a reused PID). A process this user may not inspect counts as running."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
