"""The cluster path for real: a Ray head started with `ray start --head`, the demo job sent with
`ray job submit --working-dir .`, its manifests checked; the head is always stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from elo_ray import manifest, pipeline

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMALL = ["pretrain.train.max_steps=2", "align.train.max_steps=2", "instruct.train.max_steps=2", "eval.max_docs=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A separate local Ray head with a dashboard (the job server), stopped after the test.

    `--block` keeps `ray start` in the foreground, so ending its process group stops exactly
    this cluster and never the test session's own Ray. Start and submit share RAY_AUTH_MODE."""
    gcs, dashboard = free_port(), free_port()
    # Every port of its own: the defaults (e.g. the agent's 52365) clash with any other Ray here.
    ports = {flag: free_port() for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "metrics-export-port", "runtime-env-agent-port",
                                            "node-manager-port", "object-manager-port", "ray-client-server-port")}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "ray-head.log", "w")
    temp_dir = tempfile.mkdtemp(prefix="er-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--temp-dir={temp_dir}", *(f"--{flag}={port}" for flag, port in ports.items())],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", dashboard), timeout=1):
                    break
            except OSError:
                assert head.poll() is None, (tmp_path / "ray-head.log").read_text()
                assert time.monotonic() < deadline, "the Ray dashboard did not come up in 120 s"
                time.sleep(0.5)
        yield address, env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=60)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow  # the whole demo through `ray job submit` (about 5 minutes on 2 cores); test_demo runs the pipeline
def test_ray_job_submit_runs_the_demo_spec(ray_head, tmp_path):
    """The demo spec as it ships (its builtin base model built on the cluster), shrunk in steps."""
    address, env = ray_head
    root = tmp_path / "runs"
    excludes = json.dumps({"excludes": [".git", ".venv", "work", "results", "*.egg-info", ".pytest_cache"]})
    overrides = sum((["--set", s] for s in [f"storage.root={root}", *SMALL]), [])
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
              "--runtime-env-json", excludes, "--", "elo-ray", "run", "jobs/demo.yaml", "--run-id", "submitted",
              *overrides]
    deadline = time.monotonic() + 300
    while True:
        proc = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        # The dashboard answers before its job agent is up; then nothing was submitted: try again.
        if "No available agent to submit job" not in proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout and "run submitted complete" in proc.stdout
    for stage in pipeline.STAGE_ORDER:
        m = manifest.read(str(root / "submitted" / stage))
        assert m is not None and m.status == "complete", stage
    assert manifest.read(str(root / "submitted" / "pretrain")).metrics["step"] == 2
    status = subprocess.run([str(BIN / "elo-ray"), "status", str(root / "submitted"), "--json"],
                            capture_output=True, text=True, check=True)
    assert {s: v["state"] for s, v in json.loads(status.stdout).items()} == dict.fromkeys(pipeline.STAGE_ORDER, "complete")
