"""scripts/offline_archive.py: which wheels it asks pip for, what it keeps of them, and the archive
it builds (from small local wheels: the real download is 80 MB and runs by hand)."""

from __future__ import annotations

import json
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import offline_archive as oa  # noqa: E402


def test_requirements_pin_ray_what_the_image_lacks_and_liger():
    versions = {name: "1.2.3" for name in oa.IMAGE_LACKS}
    reqs = oa.requirements(versions)
    assert reqs[0] == "ray==2.60.0"
    assert "pydantic==1.2.3" in reqs and "pydantic-core==1.2.3" in reqs and "rpds-py==1.2.3" in reqs
    assert reqs[-1] == "liger-kernel==0.8.5"
    assert oa.requirements(versions, optional=False)[-1] == "tensorboardX==1.2.3"


def test_a_package_not_installed_here_has_no_version_to_pin():
    versions = {name: "1.0" for name in oa.IMAGE_LACKS if name != "rpds-py"}
    with pytest.raises(SystemExit, match="not installed here, so no version to pin: rpds-py"):
        oa.requirements(versions)


def test_download_asks_for_binary_wheels_of_the_hosts_python_only():
    cmd = oa.download_command(["ray==2.60.0"], "3.12", Path("/w"))
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("--implementation") + 1] == "cp"
    platforms = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"]
    assert "manylinux2014_x86_64" in platforms and "manylinux_2_28_x86_64" in platforms
    assert cmd[-3:] == ["-d", "/w", "ray==2.60.0"]
    assert oa.python_tag("3.12") == "cp312" and oa.python_tag("3.11.7") == "cp311"


@pytest.mark.parametrize("member, target", [
    ("ray/_raylet.so", "ray/_raylet.so"),
    ("ray/train/__init__.py", "ray/train/__init__.py"),
    ("ray/jars/ray_dist.jar", None),
    ("ray/rllib/algorithms/ppo.py", None),
    ("ray/serve/api.py", None),
    ("ray/llm/__init__.py", None),
    ("ray/dashboard/", None),  # directories are made as files need them
    ("pkg-1.0.data/purelib/pkg/mod.py", "pkg/mod.py"),
    ("pkg-1.0.data/platlib/pkg/_ext.so", "pkg/_ext.so"),
    ("pkg-1.0.data/scripts/pkg-cli", None),
])
def test_wheel_members_are_installed_as_pip_would_less_the_pruned_parts_of_ray(member, target):
    assert oa.kept(member) == target


def fake_wheel(folder: Path, req: str) -> Path:
    """A wheel of `name==version` with one module (Ray's also with an executable and a pruned jar)."""
    name, version = req.split("==")
    module = {"pydantic-core": "pydantic_core", "rpds-py": "rpds", "tensorboardX": "tensorboardX",
              "liger-kernel": "liger_kernel"}.get(name, name.replace("-", "_"))
    tag = "cp311-cp311-manylinux2014_x86_64" if name in ("ray", "pydantic-core", "rpds-py") else "py3-none-any"
    path = folder / f"{name.replace('-', '_').lower()}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", f"VERSION = {version!r}\n")
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n")
        if name == "ray":
            z.writestr("ray/jars/ray_dist.jar", b"x" * 5000)
            info = zipfile.ZipInfo("ray/core/src/ray/gcs/gcs_server")
            info.external_attr = (stat.S_IFREG | 0o755) << 16
            z.writestr(info, b"\x7fELF")
    return path


def test_archive_from_local_wheels_holds_the_packages_elo_ray_and_launchers(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    reqs = oa.requirements()
    for req in reqs:
        fake_wheel(wheels, req)
    assert oa.main(["--wheel-dir", str(wheels), "--out", str(tmp_path / "out"), "--python-version", "3.11"]) == 0
    archive = tmp_path / "out" / "elo-ray-offline-cp311.tar.xz"
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        manifest = json.load(tar.extractfile("elo-ray-offline/MANIFEST.json"))
    site = "elo-ray-offline/site/"
    assert site + "ray/__init__.py" in members and site + "pydantic_core/__init__.py" in members
    assert not [n for n in members if "/jars" in n]
    assert members[site + "ray/core/src/ray/gcs/gcs_server"].mode & 0o111
    assert site + "elo_ray/cli.py" in members and site + "elo_ray/corpus/en.jsonl" in members
    assert not [n for n in members if "__pycache__" in n]
    assert members["elo-ray-offline/bin/elo-ray"].mode & 0o111 and "elo-ray-offline/bin/ray" in members
    assert sorted(manifest["packages"]) == sorted(r.split("==")[0] for r in reqs)
    assert manifest["packages"]["ray"]["version"] == "2.60.0"
    assert manifest["packages"]["ray"]["left_out_bytes"] == 5000
    assert manifest["python"] == "3.11" and manifest["left_out_of_ray"] == list(oa.PRUNE)
    assert not (tmp_path / "out" / "elo-ray-offline-cp311.tar.xz.partial").exists()


def test_a_missing_wheel_is_named(tmp_path):
    (tmp_path / "wheels").mkdir()
    with pytest.raises(SystemExit, match=r"expected one wheel of ray==2.60.0 .* found \[\]"):
        oa.main(["--wheel-dir", str(tmp_path / "wheels"), "--out", str(tmp_path / "out")])
