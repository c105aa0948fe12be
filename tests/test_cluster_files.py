"""The files users deploy with: job specs, Ray cluster launcher YAMLs, KubeRay manifests and the
Dockerfile. Checked against Ray's own schema and config checks, against KubeRay's required
fields, and against each other (same image, same Ray, specs that exist and load)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.specifiers import SpecifierSet

from elo_ray.clusters import check_cluster, cluster_offer
from elo_ray.config import load_spec

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
RECIPES = [ROOT / "jobs" / f"{n}.yaml" for n in (
    "llama3.1-8b-korean", "llama3.1-8b-japanese", "qwen2-7b-korean", "mistral-7b-v0.3-korean"
)]
LAUNCHERS = sorted((ROOT / "cluster").glob("*.yaml"))
KUBERAY = ROOT / "cluster" / "kuberay"
PYPROJECT = (ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+; the project supports 3.10
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.M).group(1)
IMAGE = f"YOUR-REGISTRY/elo-ray:{VERSION}"
TARGETS = {"llama3.1-8b-korean": "ko", "llama3.1-8b-japanese": "ja", "qwen2-7b-korean": "ko",
           "mistral-7b-v0.3-korean": "ko"}


def ids(paths):
    return [p.name for p in paths]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def ray_pin() -> str:
    return re.search(r'"ray\[[^\]]*\]==([^"]+)"', PYPROJECT).group(1)


def llama31_8b():
    import transformers

    return transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    )


# --------------------------------------------------------------------------- job specs


def test_the_paper_recipes_exist():
    assert all(p.is_file() for p in RECIPES), [p.name for p in RECIPES if not p.is_file()]


@pytest.mark.parametrize("path", JOBS, ids=ids(JOBS))
def test_every_job_spec_loads(path):
    load_spec(path)  # raises SpecError listing every problem


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_recipes_follow_the_paper_but_align_on_a_fifth_of_the_tokens_at_one_to_one(path):
    """The paper's 9:1 split at 1:9 became 8:2 with a 1:1 alignment mix: what kept English as well
    as full fine-tuning in the miniature (benchmarks/README.md); the header says how to go back."""
    spec = load_spec(path)
    target = TARGETS[path.stem]
    assert spec.pretrain.layers == [0, -1]
    assert spec.pretrain.data.weights == {"en": 1, target: 9} and spec.align.data.weights == {"en": 1, target: 1}
    assert (spec.pretrain.data.max_tokens, spec.align.data.max_tokens) == (2_400_000_000, 600_000_000)
    for data in (spec.pretrain.data, spec.align.data):
        assert data.seq_len == 8192
        assert {s.language for s in data.sources} == {"en", target}
    paper = load_spec(path, [f"align.data.weights={{en: 1, {target}: 9}}", "align.data.max_tokens=300000000",
                             "pretrain.data.max_tokens=2700000000"])
    assert "--set " + " --set ".join(["align.data.weights='{en: 1, %s: 9}'" % target, "align.data.max_tokens=300000000"]) \
        in path.read_text()
    assert paper.align.data.weights == {"en": 1, target: 9} and paper.pretrain.data.max_tokens == 2_700_000_000
    assert spec.pretrain.train.method == "elo" and spec.align.train.method == "full"
    assert {spec.pretrain.train.lr, spec.align.train.lr, spec.instruct.train.lr} == {5e-6}
    assert spec.instruct.enabled and spec.instruct.sft_enabled and spec.instruct.chat_vector.enabled
    assert spec.instruct.data.weights == {target: 1, "en": 1}
    assert all(s.text_field == "messages" for s in spec.instruct.data.sources)
    assert spec.model.instruct is not None
    assert spec.resources.num_workers == 8 and spec.resources.use_gpu
    assert spec.storage.root == "s3://YOUR-BUCKET/elo-ray/runs"
    assert spec.model.base.startswith("s3://YOUR-BUCKET/models/")


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_recipe_header_shows_how_to_submit_override_and_reschedule(path):
    header = "\n".join(line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#"))
    assert "ray job submit --address http://HEAD:8265 --working-dir ." in header
    assert f"-- elo-ray run jobs/{path.name}" in header
    assert "--set pretrain.train.lr=1e-5" in header
    assert re.search(r"--run-id '(ko|ja)-\{date\}'", header)
    env = json.loads(re.search(r"--runtime-env-json '([^']+)'", header).group(1))
    assert {".git", ".venv", "data", "work"} <= set(env["excludes"])


def test_jobs_readme_explains_submission_credentials_and_warm_starts():
    text = (ROOT / "jobs" / "README.md").read_text()
    for needle in ("ray job submit", "excludes", "AWS_ACCESS_KEY_ID", "instance profile", "gs://",
                   "--run-id 'ko-{date}'", "pretrain.init_from", "/pretrain/model"):
        assert needle in text, needle


# --------------------------------------------------------------------------- cluster launcher


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_the_cluster_launcher_files_exist():
    assert ids(LAUNCHERS) == ["aws-p4d-a100.yaml", "aws-p5-h100.yaml", "gcp-a3-h100.yaml"]


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_launcher_yaml_validates_against_rays_schema(path, ray_schema):
    jsonschema.validate(load(path), ray_schema)


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_launcher_yaml_passes_the_checks_of_ray_up(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(path)))  # what `ray up` runs before touching the cloud


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_launcher_has_a_cpu_head_and_gpu_workers_that_scale_to_zero(path):
    cfg = load(path)
    nodes = cfg["available_node_types"]
    head = nodes[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    (gpu,) = [n for name, n in nodes.items() if name != cfg["head_node_type"]]
    assert gpu["resources"]["GPU"] == 8
    assert gpu["min_workers"] == 0 and 1 <= gpu["max_workers"] <= cfg["max_workers"]
    assert 0 < cfg["idle_timeout_minutes"] <= 30
    assert path.read_text().startswith("# ")


@pytest.mark.parametrize("path", [p for p in LAUNCHERS if p.name.startswith("aws")], ids=lambda p: p.name)
def test_aws_gpu_nodes_have_one_efa_per_network_card(path):
    from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces

    cfg = load(path)
    node = cfg["available_node_types"]["gpu"]["node_config"]
    cards = {"p4d.24xlarge": 4, "p5.48xlarge": 32}[node["InstanceType"]]
    nics = node["NetworkInterfaces"]
    assert sorted(n["NetworkCardIndex"] for n in nics) == list(range(cards))
    assert nics[0] == {**nics[0], "NetworkCardIndex": 0, "DeviceIndex": 0, "InterfaceType": "efa"}
    assert all(n["InterfaceType"] in ("efa", "efa-only") for n in nics)
    assert "Placement" in node
    # Ray's own rule: with NetworkInterfaces, subnet and groups on every interface, none on the node.
    _configure_subnets_and_groups_from_network_interfaces(node)


@pytest.mark.parametrize("path", [p for p in LAUNCHERS if p.name.startswith("aws")], ids=lambda p: p.name)
def test_aws_workers_run_nccl_over_efa(path):
    docker = load(path)["docker"]
    worker = " ".join(docker["worker_run_options"])
    for option in ("--device=/dev/infiniband", "memlock=-1", "FI_PROVIDER=efa", "FI_EFA_USE_DEVICE_RDMA=1"):
        assert option in worker, option
    assert "NCCL_DEBUG=WARN" in " ".join(docker["run_options"])


def node_identities(cfg: dict) -> dict[str, str]:
    """Each node type's cloud identity: its instance profile's name (AWS) or its service account."""
    out = {}
    for name, node in cfg["available_node_types"].items():
        nc = node["node_config"]
        if cfg["provider"]["type"] == "aws":
            out[name] = re.fullmatch(r"arn:aws:iam::[\w-]+:instance-profile/(.+)", nc["IamInstanceProfile"]["Arn"]).group(1)
        else:
            (account,) = nc["serviceAccounts"]
            out[name] = account["email"]
    return out


def readme_permissions() -> dict[str, tuple[str, str, str]]:
    """cluster/README.md's permissions table: identity -> (file pattern, node type, what it needs)."""
    text = (ROOT / "cluster" / "README.md").read_text()
    section = text.split("## Permissions", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            identity, who, needs = line.split("|")[1:-1]
            files, node = re.fullmatch(r"\s*`([^`]+)`: (\w+)\s*", who).groups()
            rows[re.match(r"\s*`([^`]+)`", identity).group(1)] = (files, node, needs)
    return rows


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_nodes_reach_object_storage_through_a_cloud_identity(path):
    for name, identity in node_identities(load(path)).items():
        assert identity.startswith("elo-ray-") or identity.endswith(".iam.gserviceaccount.com"), (name, identity)


def test_gcp_head_runs_as_the_account_ray_gives_it():
    # Ray's bootstrap sets the head's account to this one unless node_config names another.
    source = (Path(ray.autoscaler.__file__).parent / "_private" / "gcp" / "config.py").read_text()
    ray_account = re.search(r'^RAY = "(.+)"$', source, re.M).group(1) + "-sa-" + re.search(r'^VERSION = "(.+)"$', source, re.M).group(1)
    cfg = load(ROOT / "cluster" / "gcp-a3-h100.yaml")
    head = node_identities(cfg)[cfg["head_node_type"]]
    assert head == f"{ray_account}@{cfg['provider']['project_id']}.iam.gserviceaccount.com"


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_every_node_may_pull_the_image_as_the_readme_says(path):
    cfg = load(path)
    permissions = readme_permissions()
    pull = {"aws": "`AmazonEC2ContainerRegistryReadOnly`", "gcp": "`roles/artifactregistry.reader`"}[cfg["provider"]["type"]]
    for name, identity in node_identities(cfg).items():
        assert identity in permissions, f"{path.name}: {name} runs as {identity}, which cluster/README.md does not list"
        files, node, needs = permissions[identity]
        assert fnmatch.fnmatch(path.name, files) and node == name, (path.name, name, files, node)
        assert pull in needs, f"{path.name}: {name} ({identity}) may not pull the image"


def test_readme_lists_no_identity_that_no_cluster_file_uses():
    used = {i for cfg in map(load, LAUNCHERS) for i in node_identities(cfg).values()}
    assert set(readme_permissions()) == used


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_every_node_logs_docker_in_to_the_images_registry_before_the_pull(path):
    cfg = load(path)
    registry = cfg["docker"]["image"].rsplit("/", 1)[0]
    region = cfg["provider"]["region"]
    commands = cfg["initialization_commands"]  # run on every node's host, before `docker pull`
    if cfg["provider"]["type"] == "aws":
        login = f"aws ecr get-login-password --region {region} | docker login --username AWS --password-stdin {registry}"
        assert commands == [login]
    else:
        assert commands == [f"gcloud auth configure-docker {region}-docker.pkg.dev --quiet"]
        assert f"{region}-docker.pkg.dev/YOUR-PROJECT/" in path.read_text()  # what YOUR-REGISTRY is
    assert cfg["docker"]["pull_before_run"] is True


@pytest.mark.parametrize(
    "name, gpu, max_gpus",
    [("aws-p4d-a100.yaml", "A100-40GB", 16), ("aws-p5-h100.yaml", "H100-80GB", 16), ("gcp-a3-h100.yaml", "H100-80GB", 16)],
)
def test_cluster_offer_reads_gpus_and_gpu_model(name, gpu, max_gpus):
    offer = cluster_offer(ROOT / "cluster" / name)
    assert (offer.gpu_name, offer.max_gpus) == (gpu, max_gpus)


def test_recipes_fit_h100_clusters_and_p4d_warns_about_pretraining_memory():
    spec = load_spec(ROOT / "jobs" / "llama3.1-8b-korean.yaml")
    for name in ("aws-p5-h100.yaml", "gcp-a3-h100.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        assert check_cluster(spec, ROOT / "cluster" / name, llama31_8b()) == [], name
    (line,) = check_cluster(spec, ROOT / "cluster" / "aws-p4d-a100.yaml", llama31_8b())
    assert line.startswith("pretrain: estimated ") and "of an A100-40GB" in line


# --------------------------------------------------------------------------- KubeRay


def pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def ray_cluster_specs() -> dict[str, dict]:
    return {
        "raycluster.yaml": load(KUBERAY / "raycluster.yaml")["spec"],
        "rayjob.yaml": load(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"],
    }


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_have_the_fields_kuberay_requires(name):
    doc = load(KUBERAY / name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[name]
    assert doc["metadata"].get("name") or doc["metadata"].get("generateName")
    spec = ray_cluster_specs()[name]
    assert spec["rayVersion"] == ray_pin()
    assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict)
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for pod in pod_specs(spec):
        assert pod["containers"] and all(c["image"] == IMAGE for c in pod["containers"])
    assert (KUBERAY / name).read_text().startswith("# ")


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_gpu_workers_get_8_gpus_tolerations_and_shared_memory(name):
    for group in ray_cluster_specs()[name]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        shm = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"}
        assert [v["emptyDir"]["medium"] for v in pod["volumes"] if v["name"] in shm] == ["Memory"]
        assert pod["serviceAccountName"] == "elo-ray"


def test_autoscaled_raycluster_scales_gpu_workers_from_zero():
    spec = load(KUBERAY / "raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["workerGroupSpecs"][0]["minReplicas"] == 0


def test_rayjob_runs_a_job_spec_that_exists_in_the_image_and_loads():
    spec = load(KUBERAY / "rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["elo-ray", "run"]
    image_path = Path(argv[2])
    assert image_path.parts[:5] == ("/", "home", "ray", "elo-ray", "jobs")  # WORKDIR of the image
    load_spec(ROOT / "jobs" / image_path.name)
    assert argv[argv.index("--run-id") + 1] == "ko-{date}"
    assert spec["shutdownAfterJobFinishes"] is True
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "WORKDIR /home/ray/elo-ray" in dockerfile and "COPY --chown=ray:users jobs ./jobs" in dockerfile


def render_like_the_cronjob(tmp_path: Path) -> dict:
    """The CronJob's render step run as the pod runs it, on the real rayjob.yaml; the RayJob."""
    pod = {d["kind"]: d for d in load_all(KUBERAY / "cronjob.yaml")}["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (render,) = pod["initContainers"]
    (template_dir, rendered_dir) = (tmp_path / "template", tmp_path / "rendered")
    template_dir.mkdir(), rendered_dir.mkdir()
    (template_dir / "rayjob.yaml").write_text((KUBERAY / "rayjob.yaml").read_text())
    script = render["args"][0].replace("/template/", f"{template_dir}/").replace("/rendered/", f"{rendered_dir}/")
    subprocess.run([*render["command"], script], check=True, env={**os.environ, "TZ": "UTC"})
    return load(rendered_dir / "rayjob.yaml")


def test_cronjob_creates_the_rayjob_weekly_with_a_dated_run_id(tmp_path):
    docs = {d["kind"]: d for d in load_all(KUBERAY / "cronjob.yaml")}
    cron = docs["CronJob"]["spec"]
    assert len(cron["schedule"].split()) == 5 and cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    # Create and read RayJobs, never change or delete one: an existing run is left as it is.
    assert docs["Role"]["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]
    (create,) = pod["containers"]
    assert create["args"] == ["apply", "-f", "/rendered/rayjob.yaml"]

    job = render_like_the_cronjob(tmp_path)
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert job["spec"]["entrypoint"].endswith(f"--run-id ko-{today}")
    assert job["metadata"]["name"] == f"elo-ray-ko-{today}"


def test_rayjob_is_named_after_its_run_id_so_a_second_one_cannot_start(tmp_path):
    template = load(KUBERAY / "rayjob.yaml")
    assert "generateName" not in template["metadata"]
    job = render_like_the_cronjob(tmp_path)
    argv = shlex.split(job["spec"]["entrypoint"])
    name = job["metadata"]["name"]
    assert name == "elo-ray-" + argv[argv.index("--run-id") + 1]
    # KubeRay's RayJob name rule (ray-operator utils.ValidateRayJobMetadata, v1.7): a DNS-1035
    # label of at most 47 characters, room for the RayCluster's suffix.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47
    # Creating it by hand renders it the same way as the CronJob does.
    cron_pod = {d["kind"]: d for d in load_all(KUBERAY / "cronjob.yaml")}["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    sed = cron_pod["initContainers"][0]["args"][0].split(" /template/")[0]
    assert f"{sed} cluster/kuberay/rayjob.yaml | kubectl create --save-config -f -" in (KUBERAY / "rayjob.yaml").read_text()


def test_cronjob_pulls_small_pinned_images_not_the_training_image():
    cron = {d["kind"]: d for d in load_all(KUBERAY / "cronjob.yaml")}["CronJob"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    images = {c["name"]: c["image"] for c in [*pod["initContainers"], *pod["containers"]]}
    assert images == {"render": "busybox:1.37.0", "create-rayjob": "registry.k8s.io/kubectl:v1.33.0"}


def test_service_account_carries_both_cloud_identity_annotations():
    (sa,) = load_all(KUBERAY / "serviceaccount.yaml")
    assert sa["metadata"]["name"] == "elo-ray"
    assert set(sa["metadata"]["annotations"]) == {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"}


# --------------------------------------------------------------------------- image


def test_dockerfile_base_image_matches_the_pinned_ray_and_a_supported_python():
    (base,) = re.findall(r"^FROM (\S+)", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-cu\d+", base)
    assert m, base
    assert m.group(1) == ray_pin()
    python = f"3.{m.group(2)}"
    assert python == "3.11"
    requires = re.search(r'^requires-python = "([^"]+)"', PYPROJECT, re.M).group(1)
    assert SpecifierSet(requires).contains(python)


def test_every_cluster_file_runs_the_image_of_this_version():
    images = [load(p)["docker"]["image"] for p in LAUNCHERS]
    for name, spec in ray_cluster_specs().items():
        images += [c["image"] for pod in pod_specs(spec) for c in pod["containers"]]
    assert set(images) == {IMAGE}
    assert f"-t {IMAGE} ." in (ROOT / "docker" / "Dockerfile").read_text()


def test_dockerignore_drops_what_the_image_does_not_need_and_keeps_what_it_copies():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "data", "work"} <= ignored
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    sources = {s for line in copied for s in line.split()}
    assert sources == {"pyproject.toml", "README.md", "elo_ray", "jobs"}
    assert not sources & ignored
    assert all((ROOT / s).exists() for s in sources)


def test_image_turns_on_expandable_segments_which_the_memory_estimate_assumes():
    assert "ENV PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in (ROOT / "docker" / "Dockerfile").read_text()
