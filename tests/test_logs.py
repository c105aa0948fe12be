"""One logger: `[elo-ray] message` on stdout, the level from the CLI's flags, carried to worker
processes explicitly (a fresh interpreter stands in for a Ray worker on another node)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from ray import cloudpickle  # what Ray pickles tasks and train loops with

from elo_ray import cli, logs


@pytest.fixture(autouse=True)
def restore_logger():
    logger = logging.getLogger(logs.LOGGER)
    saved = logger.level, logger.propagate, list(logger.handlers)
    yield
    logger.level, logger.propagate, logger.handlers[:] = saved[0], saved[1], saved[2]


def test_messages_go_to_stdout_with_one_prefix_and_one_handler(capsys):
    logs.configure(logging.INFO)
    logs.configure(logging.INFO)  # a second call keeps one handler
    logging.getLogger("elo_ray.pipeline").info("pretrain: starting")
    logging.getLogger("elo_ray.pipeline").debug("not at INFO")
    assert capsys.readouterr().out == "[elo-ray] pretrain: starting\n"


@pytest.mark.parametrize(("flags", "level"), [([], logging.INFO), (["--verbose"], logging.DEBUG),
                                              (["-q"], logging.WARNING)])
def test_cli_flags_set_the_level(flags, level, tmp_path, capsys):
    assert cli.main(["validate", str(tmp_path / "missing.yaml"), *flags]) == cli.EXIT_INVALID
    assert logs.level() == level
    assert "no such file" in capsys.readouterr().err


def test_verbose_and_quiet_together_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "spec.yaml", "--verbose", "--quiet"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def _run_in_fresh_process(fn) -> str:
    """Unpickle and call `fn` in a new interpreter, as Ray does in a worker; its stdout."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from ray import cloudpickle; cloudpickle.loads(sys.stdin.buffer.read())()"],
                          input=cloudpickle.dumps(fn), capture_output=True, check=True)
    return proc.stdout.decode()


@pytest.mark.parametrize(("driver_level", "expected"), [
    (logging.DEBUG, ["step 1/4 loss 5.1", "exported s3://b/model", "data: ko ran out"]),
    (logging.INFO, ["exported s3://b/model", "data: ko ran out"]),
    (logging.WARNING, ["data: ko ran out"]),
])
def test_workers_log_at_the_level_the_driver_passed(driver_level, expected):
    def worker_body():  # nested: pickled by value, as a Ray worker on another node receives it
        logging.getLogger("elo_ray.train.loop").debug("step 1/4 loss 5.1")
        logging.getLogger("elo_ray.train.loop").info("exported s3://b/model")
        logging.getLogger("elo_ray.data.reader").warning("data: ko ran out")

    logs.configure(driver_level)
    out = _run_in_fresh_process(logs.in_workers(worker_body))
    assert out.splitlines() == [f"[elo-ray] {m}" for m in expected]


def test_the_raylets_worker_pool_notice_is_off_the_console_and_its_other_messages_are_not(monkeypatch, capsys):
    import inspect

    import ray._private.worker as ray_worker

    # Ray's error-listener thread prints the raylet's messages through this module function,
    # looked up at each message: what the quieting wraps (if Ray moves it, this fails).
    assert "print_to_stdstream(" in inspect.getsource(ray_worker.listen_error_messages)
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # undone after
    notice = ("WARNING: 10 PYTHON worker processes have been started on node: 70fd11 with address: 192.0.2.2. "
              "This could be a result of using a large number of actors, or due to tasks blocked in ray.get() calls")
    oom = "Task was killed due to the node running low on memory."
    logs.quiet_worker_pool_notice()
    logs.quiet_worker_pool_notice()  # once: a second call does not wrap it again
    assert ray_worker.print_to_stdstream.elo_ray_quiet
    ray_worker.print_to_stdstream({"lines": [notice], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert capsys.readouterr().out == ""
    ray_worker.print_to_stdstream({"lines": [notice, oom], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert oom in out and "PYTHON worker" not in out
    # A worker's own line that happens to say it is printed: only the raylet's notice is dropped.
    ray_worker.print_to_stdstream({"lines": [notice], "pid": 4242, "ip": "192.0.2.2", "task_name": "t",
                                   "is_err": False}, ignore_prefix=False)
    assert "PYTHON worker" in capsys.readouterr().out
