"""What `elo-ray run` prints. By default the run's story: the stage lines, one progress line per
log interval with the time left, where the outputs are, and nothing of Ray's; with --verbose,
Ray's worker output as well. Each run is a fresh `elo-ray` process that starts its own local
Ray, as `make demo` does (so the Ray here has the dashboard that `stages.ensure_ray` starts),
beside the session's Ray and with port 52365 taken: on a machine that runs another Ray, the
new one starts and Ray Train's placement-group cleaner still reaches its State API."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from elo_ray import local_ray

REPO = Path(__file__).resolve().parent.parent
ELO_RAY = str(Path(sys.executable).parent / "elo-ray")
# Pretraining of the demo spec only, 4 steps with a progress line every 2.
SMALL = ["--stages", "pretrain", "--set", "pretrain.train.max_steps=4", "--set", "pretrain.train.log_every=2",
         "--set", "pretrain.train.checkpoint_every=4"]
# Lines the demo printed before: Ray's worker output, its State API warnings, library bars.
RAY_NOISE = ["Failed to query Ray Train Controller actor state", "pid=", "Loading weights", "Writing model shards",
             "Token authentication", "Starting execution of Dataset", "Progress bars disabled", "it/s]",
             "worker processes have been started"]
# Every line of the default output: elo-ray's messages and the summary at the end of `run`
# (a message's further lines are indented).
STORY = re.compile(r"\[elo-ray\] .*|run \S+ complete at \S+|  \S.*")


@pytest.fixture
def another_ray_on_the_machine(ray_local):
    """The session's Ray runs, and port 52365 (every Ray's default dashboard agent port) is
    taken, by us unless some other Ray holds it already."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", local_ray.DASHBOARD_AGENT_PORT))
            sock.listen()
        except OSError:
            pass
        yield


def run(tmp_path: Path, demo_base: str, *flags: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # start a local Ray
    env.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)  # as a user's shell has it: bars are elo-ray's call
    args = ["run", "jobs/demo.yaml", *flags, "--set", f"storage.root={tmp_path / 'runs'}",
            "--set", f"model.base={demo_base}", *SMALL]
    done = subprocess.run([ELO_RAY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


def test_default_output_is_the_runs_story_with_progress_and_eta(another_ray_on_the_machine, demo_base, tmp_path):
    out = run(tmp_path, demo_base)
    lines = [line for line in out.splitlines() if line.strip()]
    assert all(STORY.fullmatch(line) for line in lines), [line for line in lines if not STORY.fullmatch(line)]
    assert "[elo-ray] pretrain: starting" in lines
    assert any(re.fullmatch(r"\[elo-ray\] started a local Ray; its dashboard: http://127\.0\.0\.1:\d+", line)
               for line in lines), lines
    progress = [line for line in lines if line.startswith("[elo-ray] step ")]
    assert len(progress) == 2, progress
    assert re.fullmatch(r"\[elo-ray\] step 2/4 \(50%\) loss \d+\.\d{4} [\d,]+ tok/s ETA \d+(m\d\ds|s)", progress[0])
    assert re.fullmatch(r"\[elo-ray\] step 4/4 \(100%\) loss \d+\.\d{4} [\d,]+ tok/s took \d+(m\d\ds|s)", progress[1])
    # The trainer's lines come from rank 0 through the relay, in order with the driver's.
    order = [next(i for i, line in enumerate(lines) if needle in line) for needle in (
        "pretrain: starting", "elo: starting", "step 2/4", "step 4/4", "exported", "pretrain: complete in",
        "pretrain.model: ")]
    assert order == sorted(order), lines
    for noise in RAY_NOISE:
        assert noise not in out, noise


@pytest.mark.slow  # a second real run; the default output's test runs in make test
def test_verbose_brings_back_rays_worker_output_and_the_detail_lines(another_ray_on_the_machine, demo_base, tmp_path):
    out = run(tmp_path, demo_base, "--verbose")
    assert "(RayTrainWorker pid=" in out  # what Ray's workers print, streamed by Ray
    # Noise that the default output turns off, kept: Ray Data's console lines on the driver (the
    # counting pass) and transformers' bars in the detach task.
    assert re.search(r"INFO streaming_executor\.py:\d+ -- Starting execution of Dataset \S+\. Full logs are in ", out)
    assert "TaskPoolMapOperator[Readelo_ray_count]" in out
    assert re.search(r"\(save_detached pid=\d+\)", out) and "Loading weights: 100%" in out
    assert re.search(r"\[elo-ray\] step 2 lr \S+ grad_norm \S+ .* TFLOP/s/worker .* GiB", out)  # DEBUG
    assert re.search(r"\[elo-ray\] step 4/4 \(100%\) .* took ", out)
    # Ray Train's placement-group cleaner reaches the State API: the cause is gone, not hidden.
    assert "Failed to query Ray Train Controller actor state" not in out
