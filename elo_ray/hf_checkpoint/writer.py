"""Writing a checkpoint: staged beside its place, committed when complete, config.json last."""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from typing import Iterable, Sequence

from elo_ray import storage
from elo_ray.hf_checkpoint.format import (
    CHUNK_BYTES,
    CONFIG_NAME,
    INDEX_NAME,
    CheckpointError,
    side_files,
)


class CheckpointWriter:
    """A checkpoint being written to `out`, through a staging directory (prefix) beside it.

    Files go to `.NAME.tmp-XXXXXXXX` beside `out`; `commit` moves them into place, config.json
    last; `abort`, or leaving a `with` block by an exception before `commit`, removes them.
    Creating a writer checks `out` (new, empty, or holding a checkpoint when `overwrite` is set;
    none of `inputs`).

    Local commit is two renames (old aside, staging into place). Object stores have no rename:
    commit copies, weights first and config.json last, so that an interrupted copy never looks
    like a checkpoint; on failure it removes what was copied.
    """

    def __init__(self, out: str, *, overwrite: bool = False, inputs: Sequence[str] = ()):
        self.out = os.fspath(out).rstrip("/") or "/"
        self.fs, self.path = storage.filesystem(self.out)
        self.local = storage.is_local(self.fs)
        self.replace = self._check_out(overwrite, inputs)
        parent, base = posixpath.split(self.path.rstrip("/"))
        self._parent, self._prefix = parent, f".{base}.tmp-"
        self._staging_path = posixpath.join(parent, f"{self._prefix}{uuid.uuid4().hex[:8]}")
        self.staging = self._uri(self._staging_path)
        self.written: list[str] = []
        self._state = "open"  # -> committed | aborted
        if self.local:
            os.makedirs(self._staging_path)

    def _check_out(self, overwrite: bool, inputs: Sequence[str]) -> bool:
        """Refuse an `out` that is an input, a bucket root, a file, or a directory of other
        things; returns whether `out` holds a checkpoint to replace."""
        for src in inputs:
            if storage.location(src) == storage.location(self.out):
                raise CheckpointError(f"out={self.out} is also an input; write the result to a new path")
        parent = posixpath.dirname(self.path.rstrip("/"))
        if not self.local and not parent:
            raise CheckpointError(f"out={self.out} is a bucket root; write the checkpoint under a prefix (s3://bucket/name)")
        if self.local and os.path.isfile(self.path):
            raise CheckpointError(f"out={self.out} is a file; give a directory path for the checkpoint")
        names = storage.listdir(self.out)
        if not names:
            return False
        if not (CONFIG_NAME in names or any(n.endswith(".safetensors") for n in names)):
            raise CheckpointError(
                f"out={self.out} holds other files ({', '.join(names[:5])}); write the checkpoint to a new or empty path"
            )
        if not overwrite:
            raise CheckpointError(
                f"out={self.out} already holds a checkpoint; pass overwrite=True to replace it or choose another path"
            )
        return True

    def _uri(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    # -- writing files into staging

    def uri(self, name: str) -> str:
        """Where file `name` of the checkpoint is staged."""
        return storage.join(self.staging, name)

    def open(self, name: str):
        """A binary file object for file `name` of the checkpoint (close it when done)."""
        self.written.append(name)
        path = posixpath.join(self._staging_path, name)
        return open(path, "wb") if self.local else self.fs.open(path, "wb")

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open(name) as f:
            f.write(data)

    def copy_in(self, src_uri: str, name: str) -> None:
        """Copy a small file (config, tokenizer) into the checkpoint."""
        self.write_bytes(name, storage.read_bytes(src_uri))

    def copy_side_files(self, src: str, names: Iterable[str]) -> None:
        """Copy the tokenizer and generation files among `names` from checkpoint `src`."""
        for name in side_files(names):
            self.copy_in(storage.join(src, name), name)

    def save_pretrained(self, model) -> None:
        """Write a transformers model's config and weights with its own `save_pretrained`."""
        if self.local:
            model.save_pretrained(self._staging_path)
            self.written += os.listdir(self._staging_path)
            return
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            for name in sorted(os.listdir(tmp)):
                if os.path.isfile(os.path.join(tmp, name)):
                    with open(os.path.join(tmp, name), "rb") as f_in, self.open(name) as f_out:
                        shutil.copyfileobj(f_in, f_out, CHUNK_BYTES)

    # -- commit and abort

    def commit(self) -> str:
        """Move the staged checkpoint into place at `out`; returns `out`."""
        if self._state != "open":
            raise RuntimeError(f"commit of {self.out} after it was {self._state}")
        if self.local:
            self._swap_local()
        else:
            self._commit_remote()
            self._remove_staging()
        self._state = "committed"
        return self.out

    def _swap_local(self) -> None:
        if not os.path.isdir(self.path):
            os.rename(self._staging_path, self.path)
            return
        old = f"{self._staging_path}.old"
        os.rename(self.path, old)
        try:
            os.rename(self._staging_path, self.path)
        except BaseException:
            os.rename(old, self.path)
            raise
        shutil.rmtree(old)

    def _commit_remote(self) -> None:
        if self.replace:
            self.fs.rm(self.path, recursive=True)
        order = sorted(set(self.written), key=lambda n: (n == CONFIG_NAME, n == INDEX_NAME, n))
        try:
            for name in order:
                self.fs.copy(posixpath.join(self._staging_path, name), posixpath.join(self.path, name))
        except BaseException:
            for name in order:
                try:
                    self.fs.rm(posixpath.join(self.path, name))
                except FileNotFoundError:
                    pass
            raise

    def abort(self) -> None:
        """Remove the staged files; `out` is as it was."""
        if self._state in ("committed", "aborted"):
            return
        self._remove_staging()
        self._state = "aborted"

    def _remove_staging(self) -> None:
        if self.local:
            shutil.rmtree(self._staging_path, ignore_errors=True)
            return
        try:
            self.fs.rm(self._staging_path, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self._staging_path)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.abort()
