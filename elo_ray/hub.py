"""Models named by their Hugging Face Hub id: `hf://ORG/NAME`, optionally `@REVISION` (a branch,
tag or commit; default `main`).

Files come through huggingface_hub into the Hugging Face cache of the machine that asks (HF_HOME
or HF_HUB_CACHE), with the environment users already set: HF_TOKEN for gated and private models,
HF_HUB_OFFLINE=1 to use only what is cached, HF_ENDPOINT for a mirror. Only what elo-ray reads
is fetched: config.json, the safetensors weights and their index, tokenizer and generation
files; never pickle weights (*.bin, *.pt).

Where the files go for a run is `locations.resolve`'s business (once per run, on the driver);
this module fetches, names the commit, and turns huggingface_hub's errors into messages that
say which id, which revision and what to do.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

PREFIX = "hf://"
# A repo id as the Hub allows it: an optional owner, a name, of letters, digits, '-', '_', '.'.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")


class HubError(ValueError):
    """A Hub model cannot be had; the message names the id and revision and what to do."""


@dataclass(frozen=True)
class HubRef:
    """A model on the Hub: its repository id and a revision (branch, tag or commit)."""

    repo_id: str
    revision: str = "main"

    def __str__(self) -> str:
        return f"{PREFIX}{self.repo_id}@{self.revision}"

    def at(self, commit: str) -> "HubRef":
        return HubRef(self.repo_id, commit)

    @property
    def cache_name(self) -> str:
        """`ORG--NAME`, as the Hugging Face cache names a model's folder."""
        return self.repo_id.replace("/", "--")


def is_hub(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(PREFIX)


def parse(uri: str) -> HubRef:
    """`hf://ORG/NAME[@REVISION]` -> HubRef; ValueError saying what a valid one looks like."""
    body = uri[len(PREFIX):] if is_hub(uri) else uri
    repo_id, _, revision = body.partition("@")
    if not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id or (body.count("@") > 1):
        raise ValueError(
            f"{uri!r} is not a Hub model id; write hf://ORG/NAME or hf://ORG/NAME@REVISION, "
            "e.g. hf://meta-llama/Llama-3.1-8B@main"
        )
    if "@" in body and not revision:
        raise ValueError(f"{uri!r} has an empty revision after '@'; name a branch, tag or commit, or drop the '@'")
    return HubRef(repo_id, revision or "main")


def download(ref: HubRef, patterns: list[str]) -> str:
    """The local snapshot folder of `ref` holding the files matching `patterns` (fetched into
    this machine's Hugging Face cache unless already there); its name is the commit."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns)
    except Exception as e:  # huggingface_hub's errors, each turned into what to do
        raise HubError(_explain(ref, e)) from e


def commit_of(snapshot_dir: str) -> str:
    """The commit a snapshot folder holds (`.../snapshots/<commit>`)."""
    return os.path.basename(os.path.normpath(snapshot_dir))


def _explain(ref: HubRef, e: Exception) -> str:
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    where = f"{PREFIX}{ref.repo_id}@{ref.revision}"
    if isinstance(e, hf.GatedRepoError):
        return (f"{where}: {ref.repo_id} is gated; accept its license on https://huggingface.co/{ref.repo_id} "
                "and set HF_TOKEN to a token of that account on every machine that runs the driver")
    if isinstance(e, hf.RepositoryNotFoundError):
        return (f"{where}: no model repository {ref.repo_id} on the Hub (or it is private and HF_TOKEN "
                "does not grant access); check the id")
    if isinstance(e, hf.RevisionNotFoundError):
        return f"{where}: {ref.repo_id} has no revision {ref.revision!r}; name one of its branches, tags or commits"
    if isinstance(e, hf.HFValidationError):
        return f"{where}: not a valid Hub id or revision ({e})"
    if isinstance(e, (hf.LocalEntryNotFoundError, hf.IncompleteSnapshotError)):
        cached = _cached_revisions(ref, constants.HF_HUB_CACHE)
        held = (f"; the cache holds {ref.repo_id} at {', '.join(cached)}" if cached
                else f"; the cache ({constants.HF_HUB_CACHE}) does not hold {ref.repo_id}")
        if constants.is_offline_mode():
            return (f"{where}: not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading{held}. "
                    f"Fetch it once where the Hub is reachable (hf download {ref.repo_id} --revision "
                    f"{ref.revision}) or unset HF_HUB_OFFLINE")
        return f"{where}: the Hub cannot be reached and the files are not cached{held} ({type(e).__name__}: {e})"
    return f"{where}: {type(e).__name__}: {e}"


def _cached_revisions(ref: HubRef, cache: str) -> list[str]:
    """The branches/tags (refs) and commits (snapshots) the cache holds of `ref`'s repository."""
    folder = os.path.join(cache, f"models--{ref.cache_name}")
    found = []
    for sub in ("refs", "snapshots"):
        path = os.path.join(folder, sub)
        if os.path.isdir(path):
            found += sorted(os.listdir(path))
    return found
