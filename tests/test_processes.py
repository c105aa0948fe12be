"""Telling whether the process that holds a staging directory (or a lease) is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from elo_ray import processes

IDENTITY = "import json; from elo_ray import processes; print(json.dumps(processes.identity()), flush=True)"


def test_a_live_process_is_not_gone():
    assert processes.gone(processes.identity()) is False
    child = subprocess.Popen([sys.executable, "-c", IDENTITY + "; import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        holder = json.loads(child.stdout.readline())
        assert holder["pid"] == child.pid
        assert processes.gone(holder) is False
    finally:
        child.kill()
        child.wait()
    assert processes.gone(holder) is True


def test_an_ended_process_is_gone():
    run = subprocess.run([sys.executable, "-c", IDENTITY], capture_output=True, text=True, check=True)
    assert processes.gone(json.loads(run.stdout)) is True


def test_a_killed_child_not_yet_reaped_is_gone():
    child = subprocess.Popen([sys.executable, "-c", IDENTITY + "; import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    holder = json.loads(child.stdout.readline())
    child.send_signal(signal.SIGKILL)
    time.sleep(0.5)  # a zombie until waited for
    assert processes.gone(holder) is True
    child.wait()


def test_a_reused_pid_is_not_mistaken_for_the_holder():
    me = processes.identity()
    assert processes.gone({**me, "start": str(int(me["start"]) + 1)}) is True


def test_a_process_of_another_host_or_container_is_never_judged_gone_here():
    me = processes.identity()
    assert processes.gone({**me, "host": "another-host", "pid": 2**22 + 7}) is False
    assert processes.gone({**me, "pid_namespace": "pid:[1]", "pid": 2**22 + 7}) is False


def test_running_tells_a_live_process_from_an_ended_a_zombie_and_a_reused_pid():
    me = processes.start_time()
    assert processes.running(os.getpid(), me) is True
    assert processes.running(os.getpid(), me + 5.0) is False  # the PID names a process started at another time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = processes.start_time(child.pid)
    assert abs(started - time.time()) < 60
    assert processes.running(child.pid, started) is True
    child.send_signal(signal.SIGKILL)
    time.sleep(0.5)  # a zombie until waited for
    assert processes.running(child.pid, started) is False
    child.wait()
    assert processes.running(child.pid, started) is False
