"""Pack what a GPU host without a package index lacks to run elo-ray into one archive.

    python scripts/offline_archive.py                      # for Python 3.12 -> .offline/elo-ray-offline-cp312.tar.xz
    python scripts/offline_archive.py --python-version 3.11
    make offline-archive                                   # the same as the first line

On the host (torch, transformers, peft, safetensors, tokenizers, pyarrow, numpy, ... already
there, nothing installable):

    tar -xJf elo-ray-offline-cp312.tar.xz -C /opt
    export PYTHONPATH=/opt/elo-ray-offline/site:$PYTHONPATH PATH=/opt/elo-ray-offline/bin:$PATH
    elo-ray run jobs/demo.yaml            # bin/ has elo-ray and ray; Ray's workers inherit PYTHONPATH

What it holds (`MANIFEST.json` inside lists each package, version, wheel and size):
- Ray 2.60 (the wheel for the host's Python, `--python-version`), without `ray/jars`, `rllib`,
  `serve` and `llm`, which elo-ray never imports (79 MB wheel -> about 31 MB compressed);
- the packages that Ray Train/Data and elo-ray import and a PyTorch image usually lacks
  (`IMAGE_LACKS`: found by running elo-ray in a clean interpreter that holds only an image's
  packages, see benchmarks/README.md), at the versions installed where this script runs (the
  versions elo-ray's tests ran with);
- liger-kernel (pure Python; its Triton kernels serve `train.loss: liger` on GPUs);
- elo-ray itself (the `elo_ray` package of this checkout), and `bin/` launchers.
Wheels are fetched with `pip download --only-binary=:all: --platform manylinux...
--python-version X` into `.offline/wheels-cpXY/` (kept: a rerun downloads nothing), unpacked
as pip would install them, pruned, and compressed with xz.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAY_VERSION = "2.60.0"
# What Ray Train/Data and elo-ray import that a PyTorch GPU image usually lacks, found by trying
# (benchmarks/README.md): pydantic (Ray Train, elo-ray's config), jsonschema (Ray core), tensorboardX
# (Ray Train's imports), and what those need in turn.
IMAGE_LACKS = (
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
    "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
    "tensorboardX",
)
# Optional packages elo-ray uses where present, pinned here because they are not installed where tests run.
OPTIONAL = {"liger-kernel": "0.8.5"}
# Parts of the Ray wheel elo-ray never imports (Java workers, RLlib, Serve, Ray LLM).
PRUNE = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/")
# Tags of manylinux x86-64 wheels, newest first (pip matches each exactly).
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
NAME = "elo-ray-offline"
LAUNCHERS = {
    "elo-ray": "from elo_ray.cli import main",
    "ray": "from ray.scripts.scripts import main",
}


def requirements(versions: dict[str, str] | None = None, optional: bool = True) -> list[str]:
    """`name==version` of every package the archive carries: Ray, what the image lacks (at the
    versions of `versions`, default: this environment's), and the optional ones."""
    versions = versions if versions is not None else {n: importlib.metadata.version(n) for n in IMAGE_LACKS}
    missing = [n for n in IMAGE_LACKS if n not in versions]
    if missing:
        raise SystemExit(f"not installed here, so no version to pin: {', '.join(missing)}; "
                         f"install elo-ray's dependencies first (make test does)")
    pins = [f"ray=={RAY_VERSION}"] + [f"{n}=={versions[n]}" for n in IMAGE_LACKS]
    return pins + ([f"{n}=={v}" for n, v in OPTIONAL.items()] if optional else [])


def python_tag(python_version: str) -> str:
    major, minor = python_version.split(".")[:2]
    return f"cp{major}{minor}"


def download_command(reqs: list[str], python_version: str, dest: Path) -> list[str]:
    """The pip command that fetches the wheels of `reqs` for CPython `python_version` on x86-64 Linux."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--implementation", "cp", "--python-version", python_version, *platforms, "-d", str(dest), *reqs]


def wheel_for(req: str, wheels: list[Path]) -> Path:
    """The wheel file of `name==version` among `wheels` (names normalised as wheel files spell them)."""
    name, version = req.split("==")
    stem = f"{name.replace('-', '_').lower()}-{version}-"
    found = [w for w in wheels if w.name.lower().startswith(stem)]
    if len(found) != 1:
        raise SystemExit(f"expected one wheel of {req} in {wheels[0].parent if wheels else 'the wheel dir'}, "
                         f"found {[w.name for w in found]}")
    return found[0]


def kept(member: str) -> str | None:
    """Where a wheel member goes in site/ (None: left out). Pruned parts of Ray are left out; a
    wheel's `.data/purelib` and `.data/platlib` go to the top, as pip installs them; its other
    `.data` (scripts, headers) is left out: bin/ has launchers."""
    if member.endswith("/") or member.startswith(PRUNE):
        return None
    head, _, rest = member.partition("/")
    if head.endswith(".data"):
        kind, _, path = rest.partition("/")
        return path if kind in ("purelib", "platlib") and path else None
    return member


def unpack(wheel: Path, site: Path) -> dict:
    """Unzip `wheel` into `site` as an install; returns its entry for the manifest."""
    kept_bytes = pruned_bytes = 0
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            target = kept(info.filename)
            if target is None:
                pruned_bytes += info.file_size
                continue
            path = site / target
            path.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if info.external_attr >> 16 & 0o111:  # executables (Ray's gcs_server, raylet) stay executable
                path.chmod(0o755)
            kept_bytes += info.file_size
    return {"wheel": wheel.name, "wheel_bytes": wheel.stat().st_size, "unpacked_bytes": kept_bytes,
            "left_out_bytes": pruned_bytes}


def copy_elo_ray(site: Path) -> int:
    """elo-ray's package (code, bundled corpus, demo spec) into `site`; returns its bytes."""
    total = 0
    for path in sorted((ROOT / "elo_ray").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            target = site / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            total += path.stat().st_size
    return total


def write_launchers(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, import_line in LAUNCHERS.items():
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env python3\nimport sys\n{import_line}\nsys.exit(main())\n")
        path.chmod(0o755)


def elo_ray_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def build_tree(reqs: list[str], wheels: list[Path], top: Path, python_version: str) -> dict:
    """site/, bin/ and MANIFEST.json under `top` from the wheels of `reqs`; returns the manifest."""
    site = top / "site"
    site.mkdir(parents=True)
    packages = {}
    for req in reqs:
        packages[req.split("==")[0]] = {"version": req.split("==")[1], **unpack(wheel_for(req, wheels), site)}
    write_launchers(top / "bin")
    manifest = {
        "python": python_version,
        "left_out_of_ray": list(PRUNE),
        "packages": packages,
        "elo_ray": {"commit": elo_ray_commit(), "bytes": copy_elo_ray(site)},
        "use": f"tar -xJf ARCHIVE -C DIR; export PYTHONPATH=DIR/{NAME}/site:$PYTHONPATH PATH=DIR/{NAME}/bin:$PATH",
    }
    (top / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def compress(top: Path, archive: Path) -> None:
    """xz tarball of `top` (written beside, then renamed: never a half-written archive)."""
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:xz", preset=6) as tar:
        tar.add(top, arcname=NAME)
    partial.replace(archive)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12", help="the GPU host's Python (default 3.12)")
    parser.add_argument("--out", default=str(ROOT / ".offline"), help="folder of the archive and the wheels")
    parser.add_argument("--wheel-dir", help="take the wheels from here instead of downloading them")
    parser.add_argument("--no-optional", action="store_true", help="leave out liger-kernel")
    parser.add_argument("--max-mb", type=float, default=60.0, help="fail when the archive is larger")
    args = parser.parse_args(argv)

    tag = python_tag(args.python_version)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reqs = requirements(optional=not args.no_optional)
    wheel_dir = Path(args.wheel_dir) if args.wheel_dir else out / f"wheels-{tag}"
    if not args.wheel_dir:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        print(f"downloading {len(reqs)} wheels for CPython {args.python_version} into {wheel_dir}", flush=True)
        subprocess.run(download_command(reqs, args.python_version, wheel_dir), check=True)
    archive = out / f"{NAME}-{tag}.tar.xz"
    with tempfile.TemporaryDirectory(prefix="elo-ray-offline-") as tmp:
        manifest = build_tree(reqs, sorted(wheel_dir.glob("*.whl")), Path(tmp) / NAME, args.python_version)
        print("compressing (xz, about a minute of one core)", flush=True)
        compress(Path(tmp) / NAME, archive)
    size_mb = archive.stat().st_size / 2**20
    for name, p in manifest["packages"].items():
        print(f"  {name:28s} {p['version']:12s} wheel {p['wheel_bytes'] / 2**20:6.1f} MiB  unpacked "
              f"{p['unpacked_bytes'] / 2**20:6.1f} MiB" + (f"  (left out {p['left_out_bytes'] / 2**20:.1f} MiB)"
                                                           if p["left_out_bytes"] else ""))
    print(f"  elo_ray {manifest['elo_ray']['bytes'] / 2**20:.1f} MiB (commit {manifest['elo_ray']['commit']})")
    print(f"{archive}: {size_mb:.1f} MiB")
    if size_mb > args.max_mb:
        print(f"larger than --max-mb {args.max_mb}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
