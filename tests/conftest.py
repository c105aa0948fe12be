"""Shared test fixtures: a real local Ray, a real S3 endpoint (moto's server on 127.0.0.1),
tiny models and tokenizers built from configs. No network beyond loopback, no downloads."""

from __future__ import annotations

import logging
import os
import uuid

import pytest

from elo_ray.local_ray import free_port

# Set before anything starts Ray: workers inherit the driver's environment at ray.init.
_S3_PORT = free_port()
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{_S3_PORT}",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    RAY_TRAIN_ENABLE_PRINT_PATCH="0",
    RAY_DATA_DISABLE_PROGRESS_BARS="1",
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
    RAY_DEDUP_LOGS="0",
    TOKENIZERS_PARALLELISM="false",
)
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's threaded server) for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_S3_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket; returns its `s3://name` URI."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session with this machine's 2 CPUs. Without the dashboard: the
    suite's Ray Train runs work without it (its placement-group cleaner only warns), it costs
    a little memory and start-up (benchmarks/ray_start.py), and it would put its State API's
    address in the environment that the Ray clusters some tests start inherit."""
    import ray

    from elo_ray import local_ray

    if not ray.is_initialized():
        local_ray.start(dashboard=False, num_cpus=2, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a little English and Korean text."""
    from elo_ray.tiny import train_tokenizer

    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "A model learns a new language from mixed text.",
        "빠른 갈색 여우가 게으른 개를 뛰어넘는다.",
        "모델은 섞인 텍스트로 새로운 언어를 배운다.",
    ] * 20
    return train_tokenizer(texts, vocab_size=320)


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory) -> str:
    """The demo's `builtin:tiny-llama`, built once for the session (local path)."""
    from elo_ray import builtin

    return builtin.resolve("builtin:tiny-llama", str(tmp_path_factory.mktemp("builtin")))


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """torch.distributed with a single gloo rank, and its device mesh, for one test module."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()
