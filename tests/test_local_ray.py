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
