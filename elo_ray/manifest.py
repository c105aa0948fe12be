"""Stage manifests: the commit record of a stage's output in object storage.

A stage writes its files under `{run}/{stage}/` and then `manifest.json` LAST; a stage
directory without a manifest is unfinished and is never read. A manifest holds the stage's
config hash, the digests of its input manifests, every output file with size and sha256,
metrics, times and versions; its own `digest` is the sha256 of its content, which the next
stage's config hash includes, so a changed stage reruns everything after it.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import platform
from dataclasses import dataclass, field
from typing import Any

from elo_ray import storage

MANIFEST = "manifest.json"


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def versions() -> dict[str, str]:
    import ray
    import torch
    import transformers

    import elo_ray

    return {
        "elo_ray": elo_ray.__version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def describe_outputs(stage_uri: str, exclude: tuple[str, ...] = (MANIFEST,), skip_dirs: tuple[str, ...] = ()) -> list[dict]:
    """Every file under `stage_uri` (relative path, size, sha256), streamed in 8 MiB reads."""
    fs, root = storage.filesystem(stage_uri)
    out = []
    for path in sorted(fs.find(root)):
        rel = posixpath.relpath(path, root)
        if rel in exclude or rel.split("/", 1)[0] in skip_dirs:
            continue
        digest = hashlib.sha256()
        size = 0
        with fs.open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
                size += len(chunk)
        out.append({"path": rel, "size": size, "sha256": digest.hexdigest()})
    return out


@dataclass
class Manifest:
    stage: str
    config_hash: str
    inputs: dict[str, str]  # input name -> its manifest digest (or a content id for external inputs)
    outputs: list[dict]
    metrics: dict[str, Any]
    started_at: str
    finished_at: str
    status: str = "complete"
    versions: dict[str, str] = field(default_factory=versions)
    uris: dict[str, str] = field(default_factory=dict)  # named outputs, e.g. {"model": ".../model"}

    def body(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @property
    def digest(self) -> str:
        return sha256_json(self.body())

    def to_json(self) -> str:
        return json.dumps({**self.body(), "digest": self.digest}, indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        data.pop("digest", None)
        return cls(**data)


def manifest_uri(stage_uri: str) -> str:
    return storage.join(stage_uri, MANIFEST)


def read(stage_uri: str) -> Manifest | None:
    """The stage's manifest, or None when the stage has not committed."""
    uri = manifest_uri(stage_uri)
    if not storage.exists(uri):
        return None
    return Manifest.from_json(storage.read_text(uri))


def commit(stage_uri: str, manifest: Manifest) -> None:
    storage.write_text(manifest_uri(stage_uri), manifest.to_json())


def retract(stage_uri: str) -> None:
    """Remove a manifest before its stage reruns, so stale outputs are never read as committed."""
    storage.remove(manifest_uri(stage_uri))
