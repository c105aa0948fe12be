"""A spec's resources against what a Ray cluster offers (the cluster files themselves are read in
test_cluster_files.py)."""

from __future__ import annotations

from elo_ray.clusters import ClusterOffer, NodeGroup, resource_warnings
from elo_ray.config import spec_from_dict


def make_spec(num_workers=8, use_gpu=True):
    return spec_from_dict({
        "storage": {"root": "s3://bucket/runs"},
        "model": {"base": "s3://bucket/models/base"},
        "resources": {"num_workers": num_workers, "use_gpu": use_gpu},
        "pretrain": {"data": {"sources": [{"uri": "s3://bucket/ko/*.jsonl", "language": "ko"}]}},
    })


def gpu_offer(nodes=1, gpus=8, cpus=96):
    return ClusterOffer("c.yaml", [NodeGroup("head", 0, 1, 16), NodeGroup("gpu", gpus, nodes, cpus, "H100-80GB")])


def test_spec_that_fits_the_cluster_gets_no_resource_warning():
    assert resource_warnings(make_spec(num_workers=8), gpu_offer(nodes=1)) == []
    assert resource_warnings(make_spec(num_workers=16), gpu_offer(nodes=2)) == []


def test_more_workers_than_the_cluster_has_gpus_is_named_with_numbers():
    (line,) = resource_warnings(make_spec(num_workers=16), gpu_offer(nodes=1))
    assert line == (
        "resources.num_workers is 16 but c.yaml offers at most 8 GPUs (gpu: 1 nodes x 8 GPUs); "
        "lower num_workers to 8 or let the cluster grow to 2 nodes of 8 GPUs"
    )


def test_workers_that_leave_gpus_of_a_node_idle_are_named():
    (line,) = resource_warnings(make_spec(num_workers=12), gpu_offer(nodes=2))
    assert "12 on nodes of 8 GPUs: 2 node(s) with 4 GPU(s) idle" in line


def test_use_gpu_false_on_a_gpu_cluster_and_true_on_a_cpu_cluster_are_named():
    (idle,) = resource_warnings(make_spec(use_gpu=False), gpu_offer(nodes=2))
    assert "resources.use_gpu is false but c.yaml offers up to 16 GPUs" in idle
    cpu_only = ClusterOffer("cpu.yaml", [NodeGroup("head", 0, 1, 16), NodeGroup("cpu", 0, 4, 32)])
    (stuck,) = resource_warnings(make_spec(use_gpu=True), cpu_only)
    assert "resources.use_gpu is true but cpu.yaml offers no GPU worker" in stuck


def test_more_cpus_per_worker_than_a_node_has_is_named():
    spec = make_spec(num_workers=8)
    spec.resources.cpus_per_worker = 16
    (line,) = resource_warnings(spec, gpu_offer(nodes=1, cpus=96))
    assert "needs 128 CPUs but a node of c.yaml has 96" in line
