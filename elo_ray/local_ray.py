"""The local Ray that elo-ray starts on a machine without a cluster (`make demo`, the tests,
the benchmarks): how it is started, in one place.

- Always a Ray of its own (`address="local"`): a bare `ray.init()` would join whatever Ray
  another process on the machine last started.
- With its dashboard by default. The dashboard serves Ray's State API, which Ray Train 2.60's
  placement-group cleaner polls about once a second: without it the cleaner logs "Failed to
  query Ray Train Controller actor state. State API may be temporarily unavailable" each time
  and cannot clean up after a crashed controller. What the dashboard costs to start is
  measured by `benchmarks/ray_start.py`.
- The State API's address told to every Ray process (`RAY_API_SERVER_ADDRESS`, set before
  `ray.init` so that the raylet and its workers inherit it). Without an address the State API
  client looks for the machine's Ray instances and gives up when it finds more than one
  ("Found multiple active Ray instances"), so the cleaner would fail whenever another Ray runs
  on the machine.
- Its dashboard agent on a free port. Ray 2.60 starts every local instance's dashboard agent
  on port 52365 and `ray.init` cannot change that: while another Ray runs on the machine
  (another checkout's tests, a benchmark) the agent cannot bind, the raylet gives up waiting
  for it ("Timed out waiting for file .../metrics_agent_port_...") and `ray.init` fails with
  "The current node timed out during startup". (The dashboard's own port, 8265, is not an
  issue: Ray tries the next ones when it is taken.)
- Without its dashboard where Ray is installed without the dashboard's packages (`pip install
  ray` rather than `ray[default]`, or the offline archive of scripts/offline_archive.py on a GPU
  host that cannot install): `ray.init(include_dashboard=True)` would raise "Cannot include
  dashboard with missing packages", so the run starts without it and says so once.
- Without a dashboard, a State API address where nothing can answer: a port this process holds
  bound and never listens on, so each query is refused at once and the cleaner keeps waiting
  ("State API may be temporarily unavailable"). Left unset, the State API client finds the
  machine's most recently started Ray instead: once another Ray with a dashboard starts on the
  machine (a second run, a search, the tests), the cleaner asks that Ray for this one's
  controller, is told it does not exist, and removes the running training's placement group,
  which kills its workers ("Destroying worker since its placement group was removed"; seen
  when an `elo-ray search` started beside a dashboard-less benchmark run).
- Idle workers kept for reuse: up to IDLE_WORKERS (`RAY_num_workers_soft_limit`, in the
  environment before `ray.init` so that the raylet reads it; a value already there wins). Ray's
  default keeps as many as the node has CPUs and ends the others a second after their task: on
  a 2-CPU machine each stage's Ray tasks (the detach, the counting pass, the reading, merge,
  eval) then start new Python processes that import torch and transformers again. Kept, the
  next task reuses one. Ray's memory monitor still ends idle workers first when memory runs
  short. What it saves: `benchmarks/worker_reuse.py`.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket

log = logging.getLogger(__name__)

DASHBOARD_PORT = 8265  # Ray's default, kept when it is free: the address users know
DASHBOARD_AGENT_PORT = 52365  # Ray 2.60's fixed default, for the record and the tests
IDLE_WORKERS = 12
"""Idle worker processes the local Ray keeps for the next task (module docstring)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_dashboard_agent_port() -> int:
    """Make a free port the dashboard agent port of the next local Ray started in this process
    and return it (`ray.init` has no argument for it, so this sets `RayParams`' default)."""
    from ray._private.parameter import RayParams

    params = [p for p in inspect.signature(RayParams.__init__).parameters.values() if p.default is not p.empty]
    defaults = list(RayParams.__init__.__defaults__)
    port = free_port()
    defaults[[p.name for p in params].index("dashboard_agent_listen_port")] = port
    RayParams.__init__.__defaults__ = tuple(defaults)
    return port


_UNSERVED: socket.socket | None = None  # held for this process's life: see unserved_state_api()


def unserved_state_api() -> str:
    """A State API address that refuses every connection while this process lives (a port held
    bound, never listened on: nothing else can take it)."""
    global _UNSERVED
    if _UNSERVED is None:
        _UNSERVED = socket.socket()
        _UNSERVED.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{_UNSERVED.getsockname()[1]}"


def missing_dashboard_packages() -> str | None:
    """Why Ray's dashboard cannot start here (the first of its packages that fails to import),
    or None when it can."""
    from ray._private.utils import get_dashboard_dependency_error

    error = get_dashboard_dependency_error()
    return str(error) if error else None


def start(*, dashboard: bool = True, **init_kwargs) -> str | None:
    """Start a local Ray of this process's own, its dashboard agent on a free port and its
    State API's address (without a dashboard: one that refuses) in the environment of every
    Ray process, and up to IDLE_WORKERS idle workers kept for reuse. Returns the dashboard's
    URL (None without one); `init_kwargs` go to `ray.init` (num_cpus, log_to_driver,
    logging_level, ...). A dashboard asked for where its packages are missing is left out,
    with a warning."""
    import ray

    free_dashboard_agent_port()
    url = None
    if dashboard and (missing := missing_dashboard_packages()):
        log.warning(f"starting Ray without its dashboard: its packages are not installed here ({missing}); "
                    "Ray Train will log that its State API is unavailable. pip install 'ray[default]' to have it")
        dashboard = False
    if dashboard:
        port = DASHBOARD_PORT if _bindable(DASHBOARD_PORT) else free_port()
        url = f"http://127.0.0.1:{port}"
        os.environ["RAY_API_SERVER_ADDRESS"] = url
        init_kwargs = {"dashboard_host": "127.0.0.1", "dashboard_port": port, **init_kwargs}
    else:
        os.environ["RAY_API_SERVER_ADDRESS"] = unserved_state_api()  # never another Ray's (docstring)
    os.environ.setdefault("RAY_num_workers_soft_limit", str(IDLE_WORKERS))
    ray.init(address="local", include_dashboard=dashboard, **init_kwargs)
    return url
