"""How elo-ray starts a local Ray: its dashboard agent on a free port. (A local Ray with its
dashboard beside another Ray on the machine, port 52365 taken, and Ray Train's State API
queries answered: test_cli_output.py, which runs `elo-ray run` that way.)"""

from __future__ import annotations

import socket

import pytest
from ray._private import ray_constants
from ray._private.parameter import RayParams

from elo_ray import local_ray


@pytest.fixture
def ray_param_defaults():
    saved = RayParams.__init__.__defaults__
    yield
    RayParams.__init__.__defaults__ = saved


def test_ray_gives_every_local_instance_the_same_dashboard_agent_port():
    # The fact local_ray works around: if Ray changes it, the work-around can go. (Ray's
    # constant: RayParams' default is already another port once a local Ray has started here.)
    assert ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT == local_ray.DASHBOARD_AGENT_PORT == 52365


def test_the_next_local_ray_gets_a_free_dashboard_agent_port(ray_param_defaults):
    first = local_ray.free_dashboard_agent_port()
    assert RayParams().dashboard_agent_listen_port == first != 52365
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", first))  # free: nothing listens there
    second = local_ray.free_dashboard_agent_port()
    assert RayParams().dashboard_agent_listen_port == second
    # Only that default changed: every other parameter keeps Ray's.
    assert RayParams().dashboard_port == 8265 and RayParams().include_dashboard is None


def test_a_ray_without_the_dashboards_packages_starts_without_it(monkeypatch, ray_param_defaults, caplog):
    # A minimal Ray (pip install ray, or the offline archive on a GPU host) cannot start the
    # dashboard: ray.init(include_dashboard=True) raises there. start() leaves it out and says why.
    import ray

    calls = []
    monkeypatch.setattr(local_ray, "missing_dashboard_packages", lambda: "No module named 'aiohttp_cors'")
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_num_workers_soft_limit", raising=False)
    with caplog.at_level("WARNING", logger="elo_ray.local_ray"):
        assert local_ray.start(num_cpus=2) is None
    assert calls == [{"address": "local", "include_dashboard": False, "num_cpus": 2}]
    assert __import__("os").environ["RAY_API_SERVER_ADDRESS"] == local_ray.unserved_state_api()
    assert "without its dashboard" in caplog.text and "No module named 'aiohttp_cors'" in caplog.text
    assert __import__("os").environ["RAY_num_workers_soft_limit"] == "12" == str(local_ray.IDLE_WORKERS)


def test_a_soft_limit_already_in_the_environment_wins(monkeypatch, ray_param_defaults):
    import ray

    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setenv("RAY_num_workers_soft_limit", "-1")  # Ray's own default: as many as CPUs
    local_ray.start(dashboard=False)
    assert __import__("os").environ["RAY_num_workers_soft_limit"] == "-1"


def test_idle_workers_beyond_the_cpus_are_kept_for_the_next_tasks(ray_local, tmp_path):
    # Six tasks held at a barrier until all six run at once (six processes) on the session's
    # 2-CPU Ray; after a wait longer than the second an idle worker beyond Ray's limit lives, six
    # more held the same way: every one runs in a process that was already there. (Under Ray's
    # default limit, the CPU count, four would be ended and started anew: with
    # RAY_num_workers_soft_limit=-1 in the environment this test fails.)
    import os
    import time

    import psutil

    @ray_local.remote(num_cpus=0)
    def pid_at_barrier(folder: str, n: int) -> int:
        open(os.path.join(folder, str(os.getpid())), "w").close()
        deadline = time.time() + 300
        while len(os.listdir(folder)) < n and time.time() < deadline:
            time.sleep(0.05)
        return os.getpid()

    def six_at_once(name: str) -> list[int]:
        folder = tmp_path / name
        folder.mkdir()
        pids = ray_local.get([pid_at_barrier.remote(str(folder), 6) for _ in range(6)])
        assert len(set(pids)) == 6, pids  # held together: six processes
        return pids

    six_at_once("first")
    time.sleep(4)  # idle: Ray ends idle workers beyond its limit after 1 s
    before = time.time()
    second = six_at_once("second")
    started = {p: psutil.Process(p).create_time() for p in second}
    assert all(t < before for t in started.values()), f"new worker processes for the second six: {started}, {before}"



def test_the_dashboards_packages_are_installed_here():
    # The environment the tests run in has ray[default]: start() keeps the dashboard there.
    assert local_ray.missing_dashboard_packages() is None


def test_without_a_dashboard_the_state_api_refuses_instead_of_asking_another_ray(monkeypatch):
    # Ray Train's placement-group cleaner removes the training's placement group when the State
    # API says the controller is gone (None), and keeps waiting when the query raises. Without a
    # dashboard, start() points the State API at an address that refuses, never at the machine's
    # latest Ray (which would answer None for an actor it does not have).
    from ray.train.v2._internal.state.util import is_actor_alive
    from ray.util.state.exception import RayStateApiException

    url = local_ray.unserved_state_api()
    assert url == local_ray.unserved_state_api()  # one port for the process's life
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as sock, pytest.raises(OSError):
        sock.bind(("127.0.0.1", port))  # held: no server can take it
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", url)
    with pytest.raises(RayStateApiException, match=f"127.0.0.1:{port}"):
        is_actor_alive(actor_id="2544cf76c37ec4697ae5b80d01000000", timeout=5)
