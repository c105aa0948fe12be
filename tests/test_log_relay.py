"""elo-ray's messages from Ray workers reach the driver's loggers through the relay, whatever
Ray streams: in order, with the worker's logger names, at the driver's level."""

from __future__ import annotations

import logging

import pytest
import ray

from elo_ray import log_relay, logs


@pytest.fixture
def relay(ray_local):
    logger = logging.getLogger(logs.LOGGER)
    saved = logger.level, logger.propagate, list(logger.handlers)
    log_relay.start()
    yield
    log_relay.close()
    logger.level, logger.propagate, logger.handlers[:] = saved


def worker_body():
    """What a worker says; nested, so that it is pickled by value (the workers cannot import
    this test module), as a worker on another node receives it."""

    def body(steps: int) -> int:
        log = logging.getLogger("elo_ray.train.loop")
        for step in range(1, steps + 1):
            log.info(f"step {step}/{steps}")
        log.debug("below the driver's level")
        logging.getLogger("elo_ray.data.reader").warning("data: ko ran out")
        return steps

    return body


def test_worker_messages_reach_the_drivers_loggers_in_order(relay, caplog):
    caplog.set_level(logging.INFO, logger=logs.LOGGER)
    task = ray.remote(num_cpus=0)(logs.in_workers(worker_body()))
    assert ray.get(task.remote(3)) == 3
    log_relay.flush()  # everything the task said is logged once flush returns
    got = [(r.name, r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith("elo_ray.")]
    assert got == [("elo_ray.train.loop", "INFO", "step 1/3"), ("elo_ray.train.loop", "INFO", "step 2/3"),
                   ("elo_ray.train.loop", "INFO", "step 3/3"), ("elo_ray.data.reader", "WARNING", "data: ko ran out")]


def test_driver_prints_relayed_messages_in_its_own_format(relay, capsys):
    logs.configure(logging.WARNING)
    task = ray.remote(num_cpus=0)(logs.in_workers(worker_body()))
    ray.get(task.remote(2))
    log_relay.flush()
    assert capsys.readouterr().out == "[elo-ray] data: ko ran out\n"


def test_without_a_relay_workers_keep_printing_themselves():
    assert log_relay.sink() is None  # nothing started it: in_workers leaves workers on stdout
    log_relay.flush()  # and flushing nothing is harmless
