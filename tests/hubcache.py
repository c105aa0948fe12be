"""A Hugging Face Hub cache built by hand, laid out as huggingface_hub lays it out
(`models--ORG--NAME/{blobs/<hash>, snapshots/<commit>/<file> -> blob, refs/<branch>}`), so that
Hub ids resolve offline (HF_HUB_OFFLINE=1) in tests."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_snapshot(cache: Path, repo_id: str, files_from: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put every file of `files_from` in the cache as `repo_id` at `commit`; point `refs` at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for src in sorted(files_from.iterdir()):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / src.name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, snapshot), link)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot
