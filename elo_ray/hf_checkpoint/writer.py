"""Writing a checkpoint: staged beside its place, committed when complete, config.json last;
staging that a dead writer left behind is swept by the next writer of the same place."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import threading
import uuid
from typing import Iterable, Sequence

from elo_ray import processes, storage
from elo_ray.hf_checkpoint.format import (
    CHUNK_BYTES,
    CONFIG_NAME,
    INDEX_NAME,
    CheckpointError,
    side_files,
)

log = logging.getLogger(__name__)

# A writer's staging holds this file naming its process (`processes.identity()`), rewritten every
# HEARTBEAT_S while the writer lives. A staging directory is abandoned, and the next writer of
# the same `out` removes it, when its process is certainly gone (same host), or when nothing in
# it has changed for STALE_AFTER_S: twenty missed heartbeats, a margin for clock skew between
# hosts too (ages are taken against the storage's own clock where it has one).
STAGING_MARKER = ".elo-ray-writer.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class CheckpointWriter:
    """A checkpoint being written to `out`, through a staging directory (prefix) beside it.

    Files go to `.NAME.tmp-XXXXXXXX` beside `out`; `commit` moves them into place, config.json
    last; `abort`, or leaving a `with` block by an exception before `commit`, removes them.
    Creating a writer checks `out` (new, empty, or holding a checkpoint when `overwrite` is set;
    none of `inputs`) and removes staging that dead writers of the same `out` left behind.

    What a reader of `out` sees:
    - local: the old checkpoint until `commit`, then the new one. Commit is two renames (old
      aside, staging into place); between them, for microseconds, `out` is absent.
    - object store (no rename): the old checkpoint, untouched, while the new one is written to
      staging. Commit then (1) deletes out's config.json, (2) copies the new files over (index
      last), (3) deletes the old files the new checkpoint does not hold, (4) copies config.json,
      (5) removes staging. From (1) to (4) `out` has no config.json: to every reader (elo-ray's,
      from_pretrained) it is no checkpoint, never a mix of old and new that looks complete, and
      the new checkpoint is complete in staging. If commit fails or the process dies there,
      staging is kept (the error names it) until the next writer of `out` sweeps it.
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
        self._state = "open"  # -> committed | aborted | kept (commit failed with out half-replaced)
        self._marker = json.dumps({**processes.identity(), "out": self.out}).encode()
        self._heartbeat: _Heartbeat | None = None
        self._begin()

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

    # -- staging: created with its marker, kept alive by a heartbeat, swept when abandoned

    def _begin(self) -> None:
        marker = posixpath.join(self._staging_path, STAGING_MARKER)
        if self.local:
            os.makedirs(self._staging_path)
            with open(marker, "wb") as f:
                f.write(self._marker)
            beat = lambda: os.utime(marker)  # noqa: E731
        else:
            storage.retrying("writing", self.uri(STAGING_MARKER), lambda: self.fs.pipe_file(marker, self._marker))
            beat = lambda: self.fs.pipe_file(marker, self._marker)  # noqa: E731
        self._heartbeat = _Heartbeat(beat, HEARTBEAT_S)
        try:
            self._sweep(now=_mtime(self.fs, marker))
        except Exception as e:  # cleaning up after others must never stop this write
            log.warning("could not sweep abandoned staging beside %s: %s: %s", self.out, type(e).__name__, e)

    def _sweep(self, now: float | None) -> None:
        mine = posixpath.basename(self._staging_path)
        for name in storage.listdir(self._uri(self._parent)):
            path = posixpath.join(self._parent, name)
            if name.startswith(self._prefix) and name != mine and self._abandoned(path, now):
                log.info("removing %s: staging of %s left by a writer that is gone", self._uri(path), self.out)
                try:
                    self.fs.rm(path, recursive=True)
                except FileNotFoundError:  # another writer swept it first
                    pass

    def _uri(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def _abandoned(self, path: str, now: float | None) -> bool:
        try:
            holder = json.loads(self.fs.cat_file(posixpath.join(path, STAGING_MARKER)))
        except (OSError, ValueError):
            holder = None  # a writer killed before its marker, or `out` set aside by a local commit
        if isinstance(holder, dict) and (holder.get("released") or processes.gone(holder)):
            return True
        times = [_mtime(self.fs, p, info) for p, info in self.fs.find(path, detail=True, withdirs=True).items()]
        times = [t for t in times if t is not None]
        return bool(times) and now is not None and now - max(times) > STALE_AFTER_S

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
            self.written += [n for n in os.listdir(self._staging_path) if n != STAGING_MARKER]
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
        """Move the staged checkpoint into place at `out` (see the class docstring); returns `out`."""
        if self._state != "open":
            raise RuntimeError(f"commit of {self.out} after it was {self._state}")
        if self.local:
            self._stop_heartbeat()
            os.remove(posixpath.join(self._staging_path, STAGING_MARKER))
            self._swap_local()
        else:
            self._commit_remote()
            self._stop_heartbeat()
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

    def commit_steps(self) -> list[tuple[str, str]]:
        """The object-store commit as [(action, file name)], action "delete" (from `out`) or
        "copy" (from staging to `out`), in the order the class docstring gives."""
        new = sorted(set(self.written), key=lambda n: (n == CONFIG_NAME, n == INDEX_NAME, n))
        old = storage.listdir(self.out) if self.replace else []
        steps = [("delete", CONFIG_NAME)] if CONFIG_NAME in old else []
        steps += [("copy", n) for n in new if n != CONFIG_NAME]
        steps += [("delete", n) for n in old if n not in new and n != CONFIG_NAME]
        steps += [("copy", n) for n in new if n == CONFIG_NAME]
        return steps

    def _commit_remote(self) -> None:
        touched = False
        try:
            for step in self.commit_steps():
                touched = True
                self._apply(step)
        except BaseException as e:
            if not touched:
                raise
            self._state = "kept"
            self._stop_heartbeat()
            self._release()
            if isinstance(e, Exception):
                raise storage.StorageError(
                    f"replacing {self.out} failed midway ({type(e).__name__}: {e}); {self.out} holds no "
                    f"config.json now and is no checkpoint. The new checkpoint is complete at {self.staging}; "
                    "writing the output again (rerunning the stage) replaces both"
                ) from e
            raise

    def _apply(self, step: tuple[str, str]) -> None:
        action, name = step
        target = posixpath.join(self.path, name)
        if action == "delete":
            storage.retrying("deleting", storage.join(self.out, name), lambda: self.fs.rm(target, recursive=True))
        else:
            source = posixpath.join(self._staging_path, name)
            storage.retrying("copying to", storage.join(self.out, name), lambda: self.fs.copy(source, target))

    def _release(self) -> None:
        """Mark staging as nobody's, so that the next writer of `out` removes it at once."""
        released = json.dumps({**json.loads(self._marker), "released": True}).encode()
        try:
            self.fs.pipe_file(posixpath.join(self._staging_path, STAGING_MARKER), released)
        except Exception as e:
            log.warning("could not mark %s as released: %s", self.staging, e)

    def abort(self) -> None:
        """Remove the staged files; `out` is as it was."""
        if self._state in ("committed", "aborted", "kept"):
            return
        self._stop_heartbeat()
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

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


class _Heartbeat:
    """Calls `beat` every `every` seconds on a daemon thread until `stop`."""

    def __init__(self, beat, every: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(beat, every), name="elo-ray-staging-heartbeat", daemon=True)
        self._thread.start()

    def _run(self, beat, every: float) -> None:
        while not self._stop.wait(every):
            try:
                beat()
            except Exception as e:  # a missed beat only makes the staging look older
                log.warning("staging heartbeat failed: %s: %s", type(e).__name__, e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _mtime(fs, path: str, info: dict | None = None) -> float | None:
    """Modification time of `path` in seconds since the epoch, on the storage's clock."""
    import datetime

    if info is None:
        if not storage.is_local(fs):
            fs.invalidate_cache(path)
        info = fs.info(path)
    value = info.get("mtime") or info.get("LastModified") or info.get("updated")
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    return float(value) if isinstance(value, (int, float)) else None
