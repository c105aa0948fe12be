"""Where elo-ray reads and writes: local paths and object-storage URIs, through fsspec.

Rules, kept in this one module:
- A location is a string: a local path (`/data/run`, `runs/x`) or a URI with a scheme
  (`s3://bucket/prefix`, `gs://bucket/prefix`, `file:///abs/path`).
- S3 endpoint and credentials come from the standard AWS environment variables
  (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), never from job specs, so that no credential
  is ever written into a manifest, a log line or an error message.
- Writes that must not be seen half-done go through `write_bytes` (local: temp file + rename;
  object stores: a single PUT, which is atomic).
- `create_exclusive` writes an object only if none is there, atomically where the store offers
  it (local files, S3, GCS); the run lease (lease.py) rests on it.
"""

from __future__ import annotations

import os
import posixpath
import time
import uuid
from typing import Callable, Iterable, TypeVar

import fsspec
from fsspec.core import url_to_fs


class StorageError(RuntimeError):
    """A storage location cannot be read or written; the message names the URI."""


# Attempts for each storage call before giving up; the wait doubles from RETRY_WAIT_S.
RETRIES = 4
RETRY_WAIT_S = 0.5
T = TypeVar("T")


def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError)
    try:  # s3fs lets botocore's connection errors through unwrapped
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError

        errors += (BotoConnectionError, HTTPClientError)
    except ImportError:
        pass
    return errors


def retrying(what: str, uri: str, fn: Callable[[], T]) -> T:
    """Run `fn`, retrying transient failures (connection, timeout, 5xx); then StorageError.

    Missing objects and permission errors are not transient and raise at once.
    """
    wait = RETRY_WAIT_S
    for attempt in range(1, RETRIES + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, StorageError):
            raise
        except _transient_errors() as e:
            if attempt == RETRIES:
                raise StorageError(
                    f"{what} {uri} failed after {RETRIES} attempts: {type(e).__name__}: {e}. "
                    "Check that the storage endpoint is reachable and the credentials in the "
                    "environment allow this."
                ) from e
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def has_scheme(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it."""
    try:
        return url_to_fs(uri)
    except (ImportError, ValueError) as e:
        scheme = uri.split("://", 1)[0]
        raise StorageError(
            f"cannot open {uri!r}: {e}. For {scheme}:// install its fsspec backend "
            f"(s3fs for s3://, gcsfs for gs://: pip install 'elo-ray[gcs]')."
        ) from e


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    if has_scheme(uri) or uri.startswith("file://"):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return retrying("checking", uri, lambda: fs.exists(path))


def location(uri: str) -> str:
    """One spelling of the place `uri` names, so that two spellings of it compare equal: local
    paths absolute with symlinks resolved (`file://` dropped), others `protocol://path` with no
    trailing slash."""
    fs, path = filesystem(uri)
    if is_local(fs):
        return os.path.realpath(path)
    return fs.unstrip_protocol(path.rstrip("/"))


def listdir(uri: str, *, files_only: bool = False) -> list[str]:
    """Names (not paths) directly under `uri` (with `files_only`, of files only); empty when it
    does not exist. Object-store listings are read afresh, never from fsspec's listing cache."""
    fs, path = filesystem(uri)
    if not is_local(fs):
        fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return sorted(
        posixpath.basename(p["name"].rstrip("/"))
        for p in fs.ls(path, detail=True)
        if not files_only or p.get("type") != "directory"
    )


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        return retrying("reading", uri, lambda: fs.cat_file(path))
    except FileNotFoundError as e:
        raise StorageError(f"{uri} does not exist") from e


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object so that readers see either nothing or all of it."""
    fs, path = filesystem(uri)
    if is_local(fs):
        os.replace(_complete_temp_file(path, data), path)
        return
    retrying("writing", uri, lambda: fs.pipe_file(path, data))


def _complete_temp_file(path: str, data: bytes) -> str:
    """`data` written and synced to a new file beside `path`, ready to be renamed or linked into place."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


# Stores whose fsspec backend writes "only if absent" in one request (see create_exclusive).
EXCLUSIVE_CREATE = ("file", "local", "s3", "s3a", "gs", "gcs")


def create_exclusive(uri: str, data: bytes) -> bool:
    """Write a whole object at `uri` only if nothing is there; True when this call created it.

    One atomic step on each store: local, a complete temp file hard-linked to the name (the link
    fails when the name exists, and readers never see a partial file); S3, PutObject with
    `If-None-Match: *` (s3fs's mode="create"; a concurrent conflict, 409, is retried and then
    answers 412); GCS, `ifGenerationMatch=0` (gcsfs's mode="create"). Other stores raise
    StorageError rather than risk an overwrite.
    """
    fs, path = filesystem(uri)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if not set(protocols) & set(EXCLUSIVE_CREATE):
        raise StorageError(f"{uri}: {protocols[0]}:// cannot write only-if-absent; use a local path, s3:// or gs://")
    if is_local(fs):
        return _link_exclusive(path, data)

    def create() -> bool:
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    return retrying("creating", uri, create)


def _link_exclusive(path: str, data: bytes) -> bool:
    tmp = _complete_temp_file(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def remove(uri: str) -> None:
    """Remove a file or a whole tree; nothing happens when it does not exist."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def upload(local_dir: str, uri: str) -> None:
    """Copy a local directory tree to `uri` (which may be local)."""
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        for name in files:
            dest = posixpath.join(path, name) if rel == "." else posixpath.join(path, rel, name)
            fs.put_file(os.path.join(root, name), dest)


def download(uri: str, local_dir: str, names: Iterable[str] | None = None) -> str:
    """Copy the files under `uri` (or only `names`) into `local_dir`; returns `local_dir`."""
    fs, path = filesystem(uri)
    os.makedirs(local_dir, exist_ok=True)
    for name in names if names is not None else listdir(uri):
        fs.get_file(posixpath.join(path, name), os.path.join(local_dir, name))
    return local_dir


def pyarrow_filesystem(uri: str):
    """(pyarrow filesystem, path) for Ray Train's RunConfig and Ray Data readers.

    Ray wants `storage_path` without scheme when a filesystem is given; the fsspec
    filesystem is wrapped so that S3 settings come from the same place as everywhere else.
    """
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if is_local(fs):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
