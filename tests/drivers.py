"""The `elo-ray` driver as the tests kill it: started as a subprocess in its own process group,
and waited on until Ray Train has registered a checkpoint of the stage it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ELO_RAY = str(Path(sys.executable).parent / "elo-ray")


def cli(args: list[str], env_extra: dict, **kw) -> subprocess.Popen:
    """`elo-ray ARGS` from the repository root, output merged into stdout; `os.killpg` stops it whole."""
    return subprocess.Popen([ELO_RAY, *args], cwd=REPO, env={**os.environ, **env_extra}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def registered_checkpoint(ray_dir: Path) -> bool:
    """Whether Ray Train has registered a checkpoint of the run: its files (checkpoint_*) appear
    before the controller records them, and a driver killed in between rightly resumes from step 0."""
    for snapshot in ray_dir.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, json.JSONDecodeError):  # being written
            pass
    return False


def wait_for_checkpoint(ray_dir: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Return once `ray_dir` (a stage's Ray Train storage) holds a registered checkpoint; fail with
    the driver's output if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if registered_checkpoint(ray_dir):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint registered under {ray_dir} after {timeout}s")
