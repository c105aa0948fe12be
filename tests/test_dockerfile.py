"""The image's build steps, run as `docker build` runs them: each RUN of docker/Dockerfile
(read from the file itself) through `/bin/sh -c`, with the ARGs declared before it in the
environment, against a fake root under tmp. The commands that need the network or root
(apt-get, curl, the EFA installer, ldconfig, pip, python) are small stubs on PATH that record
their arguments; everything else (sh, tar, mkdir, rm, cd) is real."""

from __future__ import annotations

import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# Where the EFA installer puts libfabric and the AWS OFI NCCL plugin: 1.44 and later, and before.
LAYOUT_NOW = ["/opt/amazon/efa/lib", "/opt/amazon/ofi-nccl/lib"]
LAYOUT_BEFORE_1_44 = ["/opt/amazon/efa/lib", "/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu"]
# Lowest Linux driver branch each CUDA minor release of the torch wheels needs (NVIDIA's CUDA
# toolkit release notes, "CUDA Toolkit and Corresponding Driver Versions").
CUDA_MIN_DRIVER = {(12, 6): 560, (12, 8): 570, (12, 9): 575, (13, 0): 580, (13, 2): 595}


@dataclass
class Instruction:
    keyword: str
    text: str
    line: int


def instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """The Dockerfile's instructions with continuation lines joined (comment lines inside a
    continuation are dropped, as Docker does)."""
    out, pending, start = [], None, 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if pending is None:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            pending, start = "", n
        elif line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1]  # Docker joins the lines: the escaped newline goes
            continue
        keyword, _, text = (pending + line).strip().partition(" ")
        out.append(Instruction(keyword.upper(), text.strip(), start))
        pending = None
    return out


def build_args(upto: Instruction, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The ARGs declared before `upto`, with their defaults or `overrides` (like --build-arg)."""
    args = {}
    for ins in instructions():
        if ins is upto or ins.line >= upto.line:
            break
        if ins.keyword == "ARG":
            name, _, default = ins.text.partition("=")
            args[name] = (overrides or {}).get(name, default)
    return args


def run_step(needle: str) -> Instruction:
    (step,) = [i for i in instructions() if i.keyword == "RUN" and needle in i.text]
    return step


# An absolute path: a "/" at the start of a word (not inside a URL or a ${var##*/}).
ABSOLUTE = re.compile(r"(?<![^\s\"'=>])/")
SYSTEM_DIRS = re.compile(r"(?<![^\s\"'=>:])/(?:bin|dev|etc|home|lib\w*|opt|proc|root|sbin|sys|tmp|usr|var)\b")


def in_fake_root(script: str, root: Path) -> str:
    """`script` with every absolute path moved under `root`; refuses a script that would still
    name a system directory outside it (say in `A=/x:/opt/y`), since the test runs it for real."""
    moved = ABSOLUTE.sub(f"{root}/", script)
    rest = re.sub(r"\w+://\S+", "", moved.replace(str(root), "ROOT"))
    assert not SYSTEM_DIRS.search(rest), f"a path outside the fake root in: {script}"
    return moved


RECORD = 'printf "%s\\037" "$(basename "$0")" "$@" >> "$STUB_LOG"; printf "\\036" >> "$STUB_LOG"\n'
STUBS = {
    "apt-get": "",
    "ldconfig": "",
    "pip": "",
    "python": "",
    # `curl -fsSLO URL` saves the URL's file in the current directory: the test's installer.
    "curl": 'for a in "$@"; do url="$a"; done\ncp "$STUB_TARBALL" "$(basename "$url")"\n',
}
# The EFA installer lays out the directories that the test asks for, under the fake root.
INSTALLER = 'for d in $EFA_LAYOUT; do mkdir -p "$FAKE_ROOT$d"; done\n'


def executable(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + RECORD + body)
    path.chmod(0o755)


@dataclass
class Build:
    returncode: int
    stderr: str
    calls: list[list[str]]
    root: Path

    def called(self, name: str) -> list[list[str]]:
        return [c[1:] for c in self.calls if c[0] == name]

    def image_path(self, path: str) -> Path:
        return self.root / path.lstrip("/")


def run(step: Instruction, tmp: Path, layout: list[str] = (), args: dict[str, str] | None = None) -> Build:
    root = tmp / "root"
    stubs = tmp / "stubs"
    for d in (root / "etc" / "ld.so.conf.d", root / "var" / "lib" / "apt" / "lists", root / "tmp", stubs):
        d.mkdir(parents=True, exist_ok=True)
    for name, body in STUBS.items():
        executable(stubs / name, body)
    installer = tmp / "aws-efa-installer"
    installer.mkdir(exist_ok=True)
    executable(installer / "efa_installer.sh", INSTALLER)
    tarball = tmp / "installer.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(installer, arcname="aws-efa-installer")
    log = tmp / "calls"
    env = {
        **build_args(step, args),
        "PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(root),
        "STUB_LOG": str(log), "STUB_TARBALL": str(tarball), "FAKE_ROOT": str(root), "EFA_LAYOUT": " ".join(layout),
    }
    done = subprocess.run(["/bin/sh", "-c", in_fake_root(step.text, root)], cwd=root, env=env,
                          capture_output=True, text=True)
    text = log.read_text() if log.exists() else ""
    calls = [record.split("\x1f")[:-1] for record in text.split("\x1e")[:-1]]
    return Build(done.returncode, done.stderr, calls, root)


# --------------------------------------------------------------------------- EFA


@pytest.mark.parametrize("layout", [LAYOUT_NOW, LAYOUT_BEFORE_1_44], ids=["installer-1.44+", "installer-before-1.44"])
def test_efa_step_installs_the_efa_stack_and_registers_its_libraries(tmp_path, layout):
    step = run_step("efa_installer.sh")
    build = run(step, tmp_path, layout)
    assert build.returncode == 0, build.stderr
    version = build_args(step)["EFA_INSTALLER_VERSION"]
    (url,) = [c[-1] for c in build.called("curl")]
    assert url == f"https://efa-installer.amazonaws.com/aws-efa-installer-{version}.tar.gz"
    # NCCL over EFA wants the kernel driver from the host and nothing from the container's limits.
    assert build.called("efa_installer.sh") == [["-y", "--skip-kmod", "--skip-limit-conf", "--no-verify"]]
    conf = build.image_path("/etc/ld.so.conf.d/000-efa.conf").read_text().split()
    assert {str(build.image_path(d)) for d in layout} <= set(conf)  # the libraries' directories,
    assert all(Path(d).is_dir() for d in conf)  # and no directory that does not exist
    assert build.called("ldconfig") == [[]]
    assert not build.image_path("/tmp/efa").exists()
    assert not any(build.image_path("/var/lib/apt/lists").iterdir())


def test_efa_step_stops_the_build_when_the_installer_left_no_nccl_plugin(tmp_path):
    build = run(run_step("efa_installer.sh"), tmp_path, ["/opt/amazon/efa/lib"])
    assert build.returncode != 0
    assert "no AWS OFI NCCL plugin" in build.stderr and "EFA_INSTALLER_VERSION" in build.stderr
    assert build.called("ldconfig") == []


def test_efa_none_installs_nothing(tmp_path):
    build = run(run_step("efa_installer.sh"), tmp_path, LAYOUT_NOW, {"EFA_INSTALLER_VERSION": "none"})
    assert build.returncode == 0, build.stderr
    assert build.calls == []
    assert not build.image_path("/etc/ld.so.conf.d/000-efa.conf").exists()


def test_fake_root_moves_absolute_paths_and_refuses_what_it_cannot_move(tmp_path):
    moved = in_fake_root('cd / && rm -rf /tmp/efa "https://host/x" ${URL##*/} 2>/dev/null', tmp_path)
    assert moved == f'cd {tmp_path}/ && rm -rf {tmp_path}/tmp/efa "https://host/x" ${{URL##*/}} 2>{tmp_path}/dev/null'
    with pytest.raises(AssertionError, match="outside the fake root"):
        in_fake_root("LD_LIBRARY_PATH=/a:/opt/amazon/efa/lib ldconfig", tmp_path)


# --------------------------------------------------------------------------- torch


def torch_pin() -> tuple[str, str]:
    args = build_args(run_step("pip install"))
    return args["TORCH_VERSION"], args["TORCH_INDEX_URL"]


def test_image_installs_the_pinned_torch_build_and_checks_it(tmp_path):
    version, index = torch_pin()
    build = run(run_step("pip install"), tmp_path)
    assert build.returncode == 0, build.stderr
    first, *rest = build.called("pip")
    assert first == ["install", "--no-cache-dir", "--index-url", index, f"torch=={version}"]
    # Installing elo-ray keeps that build: the same pin, so pip never swaps in PyPI's torch.
    (project,) = [c for c in rest if ".[gcs]" in c]
    assert f"torch=={version}" in project and "--index-url" not in project
    (check,) = build.called("python")
    cuda = index.rsplit("/", 1)[1]
    assert check[0] == "-c" and f"torch.__version__ == '{version}+{cuda}'" in check[1]
    compile(check[1], "python -c of the RUN", "exec")  # one valid line once Docker joins the RUN


def test_torch_is_the_version_the_project_tests_against():
    version, _ = torch_pin()
    tested = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert version == tested


def test_torch_cuda_build_runs_on_the_base_image_and_the_cluster_drivers():
    _, index = torch_pin()
    m = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d\d)(\d)", index)
    assert m, index
    cuda = (int(m.group(1)), int(m.group(2)))
    (base,) = [i.text for i in instructions() if i.keyword == "FROM"]
    image_cuda = re.search(r"-cu(\d\d)(\d)$", base)
    # Same CUDA major as the base image's libraries, and no newer minor than its driver needs.
    assert cuda[0] == int(image_cuda.group(1)) and cuda[1] <= int(image_cuda.group(2)), (index, base)
    gcp = (ROOT / "cluster" / "gcp-a3-h100.yaml").read_text()
    drivers = {int(d) for d in re.findall(r"sourceImage: \S+-nvidia-(\d+)$", gcp, re.M)}
    assert drivers and all(d >= CUDA_MIN_DRIVER[cuda] for d in drivers), (cuda, drivers)
