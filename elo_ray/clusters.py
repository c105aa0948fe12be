"""What a Ray cluster file offers, and where a job spec and the cluster disagree.

`cluster_offer` reads a cluster launcher YAML (AWS, GCP), a KubeRay RayCluster or a RayJob;
`check_cluster` compares it with a spec's resources and, on the cluster's GPU, each stage's
memory estimate (memory.py). `elo-ray validate SPEC --cluster FILE` prints its warnings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from elo_ray.config import JobSpec
from elo_ray.memory import GPUS, memory_warnings

# Cloud machine -> (GPUs, GPU name, vCPUs) for the machines the cluster files use and their kin.
MACHINES: dict[str, tuple[int, str, int]] = {
    "p4d.24xlarge": (8, "A100-40GB", 96),
    "p4de.24xlarge": (8, "A100-80GB", 96),
    "p5.48xlarge": (8, "H100-80GB", 192),
    "p5e.48xlarge": (8, "H200-141GB", 192),
    "p5en.48xlarge": (8, "H200-141GB", 192),
    "g5.48xlarge": (8, "A10G-24GB", 192),
    "a2-highgpu-8g": (8, "A100-40GB", 96),
    "a2-ultragpu-8g": (8, "A100-80GB", 96),
    "a3-highgpu-8g": (8, "H100-80GB", 208),
    "a3-megagpu-8g": (8, "H100-80GB", 208),
    "a3-ultragpu-8g": (8, "H200-141GB", 224),
    "g2-standard-96": (8, "L4-24GB", 96),
}
# GKE accelerator label -> GPU name.
ACCELERATORS: dict[str, str] = {
    "nvidia-tesla-a100": "A100-40GB",
    "nvidia-a100-80gb": "A100-80GB",
    "nvidia-h100-80gb": "H100-80GB",
    "nvidia-h100-mega-80gb": "H100-80GB",
    "nvidia-h200-141gb": "H200-141GB",
    "nvidia-l4": "L4-24GB",
}


@dataclass(frozen=True)
class NodeGroup:
    """One kind of node a cluster can start: how many, and what each offers Ray."""

    name: str
    gpus: int
    max_nodes: int
    cpus: int | None = None
    gpu_name: str | None = None


@dataclass(frozen=True)
class ClusterOffer:
    """The GPUs a cluster file offers at its largest scale."""

    source: str
    groups: list[NodeGroup] = field(default_factory=list)

    @property
    def gpu_groups(self) -> list[NodeGroup]:
        return [g for g in self.groups if g.gpus > 0 and g.max_nodes > 0]

    @property
    def max_gpus(self) -> int:
        return sum(g.gpus * g.max_nodes for g in self.gpu_groups)

    @property
    def gpu_name(self) -> str | None:
        return next((g.gpu_name for g in self.gpu_groups if g.gpu_name), None)

    @property
    def gpu_memory_gib(self) -> float | None:
        return GPUS.get(self.gpu_name) if self.gpu_name else None


def _launcher_offer(doc: dict, source: str) -> ClusterOffer:
    groups = []
    head = doc.get("head_node_type")
    for name, node in (doc.get("available_node_types") or {}).items():
        node_config = node.get("node_config") or {}
        machine = node_config.get("InstanceType") or node_config.get("machineType")
        known = MACHINES.get(machine or "")
        resources = node.get("resources") or {}
        gpus = resources.get("GPU")
        if gpus is None:
            accel = sum(int(a.get("acceleratorCount", 0)) for a in node_config.get("guestAccelerators") or [])
            gpus = accel or (known[0] if known else 0)
        max_nodes = 1 if name == head else node.get("max_workers", doc.get("max_workers", 0))
        groups.append(
            NodeGroup(
                name=name,
                gpus=int(gpus),
                max_nodes=int(max_nodes),
                cpus=resources.get("CPU", known[2] if known else None),
                gpu_name=known[1] if known else None,
            )
        )
    return ClusterOffer(source, groups)


def _pod_group(name: str, group: dict, max_nodes: int) -> NodeGroup:
    pod = (group.get("template") or {}).get("spec") or {}
    gpus = 0
    cpus = None
    for container in pod.get("containers") or []:
        res = container.get("resources") or {}
        limits = {**(res.get("requests") or {}), **(res.get("limits") or {})}
        gpus += int(limits.get("nvidia.com/gpu", 0))
        if "cpu" in limits:
            cpus = int(float(str(limits["cpu"]).rstrip("m")) / (1000 if str(limits["cpu"]).endswith("m") else 1))
    params = group.get("rayStartParams") or {}
    if "num-gpus" in params:
        gpus = int(params["num-gpus"])
    if "num-cpus" in params:
        cpus = int(params["num-cpus"])
    selector = pod.get("nodeSelector") or {}
    gpu_name = ACCELERATORS.get(selector.get("cloud.google.com/gke-accelerator", ""))
    machine = selector.get("node.kubernetes.io/instance-type") or selector.get("beta.kubernetes.io/instance-type")
    if gpu_name is None and machine in MACHINES:
        gpu_name = MACHINES[machine][1]
    return NodeGroup(name=name, gpus=gpus, max_nodes=max_nodes, cpus=cpus, gpu_name=gpu_name)


def _kuberay_offer(spec: dict, source: str) -> ClusterOffer:
    groups = [_pod_group("head", spec.get("headGroupSpec") or {}, 1)]
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for g in spec.get("workerGroupSpecs") or []:
        replicas = g.get("maxReplicas", g.get("replicas", 0)) if autoscaling else g.get("replicas", 0)
        groups.append(_pod_group(g.get("groupName", "workers"), g, int(replicas) * int(g.get("numOfHosts", 1))))
    return ClusterOffer(source, groups)


def cluster_offer(path: str | Path) -> ClusterOffer:
    """What a Ray cluster launcher YAML, a KubeRay RayCluster or a RayJob offers."""
    path = Path(path)
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if isinstance(d, dict)]
    for doc in docs:
        if "available_node_types" in doc:
            return _launcher_offer(doc, str(path))
        if doc.get("kind") == "RayCluster":
            return _kuberay_offer(doc.get("spec") or {}, str(path))
        if doc.get("kind") == "RayJob" and (doc.get("spec") or {}).get("rayClusterSpec"):
            return _kuberay_offer(doc["spec"]["rayClusterSpec"], str(path))
    raise ValueError(
        f"{path}: no Ray cluster found; expected a cluster launcher YAML (available_node_types), "
        "a KubeRay RayCluster or a RayJob with rayClusterSpec"
    )


def resource_warnings(spec: JobSpec, offer: ClusterOffer) -> list[str]:
    """Lines where the spec's resources and the cluster disagree, with the numbers."""
    r = spec.resources
    src = offer.source
    gpu_groups = offer.gpu_groups
    if not r.use_gpu:
        if gpu_groups:
            return [
                f"resources.use_gpu is false but {src} offers up to {offer.max_gpus} GPUs: training "
                "would run on CPUs with gloo while the GPUs idle; set resources.use_gpu: true"
            ]
        return []
    if not gpu_groups:
        return [
            f"resources.use_gpu is true but {src} offers no GPU worker; the job would wait for GPUs "
            "forever. Use a GPU cluster file or set resources.use_gpu: false"
        ]
    lines = []
    per_node = max(g.gpus for g in gpu_groups)
    if r.num_workers > offer.max_gpus:
        detail = ", ".join(f"{g.name}: {g.max_nodes} nodes x {g.gpus} GPUs" for g in gpu_groups)
        nodes_needed = -(-r.num_workers // per_node)
        lines.append(
            f"resources.num_workers is {r.num_workers} but {src} offers at most {offer.max_gpus} GPUs "
            f"({detail}); lower num_workers to {offer.max_gpus} or let the cluster grow to "
            f"{nodes_needed} nodes of {per_node} GPUs"
        )
    elif r.num_workers % per_node:
        nodes = -(-r.num_workers // per_node)
        idle = nodes * per_node - r.num_workers
        lines.append(
            f"resources.num_workers is {r.num_workers} on nodes of {per_node} GPUs: {nodes} node(s) "
            f"with {idle} GPU(s) idle; use a multiple of {per_node}"
        )
    cpus = min((g.cpus for g in gpu_groups if g.cpus), default=None)
    if cpus is not None:
        reserved = r.cpus_per_worker * min(r.num_workers, per_node)
        if reserved > cpus:
            lines.append(
                f"resources.cpus_per_worker {r.cpus_per_worker:g} x {min(r.num_workers, per_node)} workers "
                f"per node needs {reserved:g} CPUs but a node of {src} has {cpus}; lower cpus_per_worker"
            )
    return lines


def check_cluster(spec: JobSpec, path: str | Path, model_config: Any | None = None) -> list[str]:
    """`resource_warnings` for a cluster file, plus, when the model config is given,
    `memory_warnings` on the cluster's GPU (on resources.gpu_type when the file does not say)."""
    offer = cluster_offer(path)
    lines = resource_warnings(spec, offer)
    if model_config is not None:
        gpu = offer.gpu_name or spec.resources.gpu_type
        lines += memory_warnings(spec, model_config, GPUS[gpu], gpu)
    return lines
