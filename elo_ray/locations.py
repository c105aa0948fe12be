"""Names become locations, once per run, before the first stage runs.

A spec may name models by `builtin:` names and Hub ids (`hf://ORG/NAME@REVISION`) and data by
`builtin:corpus/...`. `resolve(spec, run_uri)` returns a copy of the spec in which each of them
is a plain location (a local path or a storage URI), so that stages, data and training only
ever read locations. The pipeline calls it once per run, on the driver, when the first stage is
about to run (a rerun whose stages are all committed resolves nothing).

Hub models on a cluster. The Hugging Face cache of the driver is on the driver's disk, and the
stages read models on other nodes (surgery and eval as Ray tasks, the workers of a warm start).
So a Hub model's location is:
- storage.root on object storage (a cluster): the files are fetched once into the driver's
  cache and copied to `{storage.root}/_hub/ORG--NAME/<commit>/`, read from there by every node
  like any other checkpoint, through the credentials they already have. Only the driver needs
  the Hub (and HF_TOKEN); nodes that cannot reach it (private subnets, firewalls) work, the copy
  is shared by every run under that root, and it outlives the Hub repo changing or vanishing.
- storage.root local (one machine): the snapshot folder in the machine's Hugging Face cache,
  used in place (no second copy of the weights).
Either way the commit is pinned for the run in `{run}/resolved.json`: a rerun of the run (a
resume the next morning) reads the very commit the earlier stages used, even after `main` moved.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import posixpath

from elo_ray import builtin, hf_checkpoint, hub, storage
from elo_ray.config import JobSpec

log = logging.getLogger(__name__)

RESOLVED_FILE = "resolved.json"
HUB_DIR = "_hub"
MODEL_KEYS = ("model.base", "model.tokenizer", "model.instruct", "pretrain.init_from")
DATA_KEYS = ("pretrain.data", "align.data", "instruct.data")


def _get(spec: JobSpec, key: str):
    section, name = key.split(".")
    return getattr(getattr(spec, section), name)


def _set(spec: JobSpec, key: str, value) -> None:
    section, name = key.split(".")
    setattr(getattr(spec, section), name, value)


def resolve(spec: JobSpec, run_uri: str) -> JobSpec:
    """A copy of `spec` whose model, tokenizer and data locations are all plain locations.

    `model.tokenizer` is filled in (the base model's location when unset). Hub commits are
    pinned in `{run_uri}/resolved.json` (read first: a rerun keeps the run's commits)."""
    out = spec.model_copy(deep=True)
    pins_uri = storage.join(run_uri, RESOLVED_FILE)
    pins = json.loads(storage.read_text(pins_uri)) if storage.exists(pins_uri) else {}
    root = spec.storage.root
    if out.model.tokenizer is None:
        out.model.tokenizer = out.model.base
    resolved: dict[str, dict] = {}
    for key in MODEL_KEYS:
        name = _get(out, key)
        if not name:
            continue
        if hub.is_hub(name):
            pinned = pins.get(key, {}).get("commit") if pins.get(key, {}).get("name") == name else None
            tokenizer_only = key == "model.tokenizer" and name != spec.model.base
            location, commit = materialize(name, root, pinned, tokenizer_only=tokenizer_only)
            resolved[key] = {"name": name, "commit": commit, "location": location}
            log.info(f"{key}: {name} is commit {commit}" + (" (pinned for this run)" if pinned else "") + f", at {location}")
        else:
            location = builtin.resolve(name, root)
            resolved[key] = {"name": name, "location": location}
        _set(out, key, location)
    for key in DATA_KEYS:
        cfg = _get(out, key)
        if cfg is not None:
            _set(out, key, builtin.resolve_sources(cfg, root))
    out.eval.task_dirs = [builtin.resolve(d, root) for d in out.eval.task_dirs]
    if resolved != pins:
        storage.write_text(pins_uri, json.dumps(resolved, indent=2))
    return out


WEIGHT_PATTERNS = ("*.safetensors", hf_checkpoint.INDEX_NAME)  # what a Hub model's weights are (never *.bin)


def small_patterns() -> list[str]:
    """Config, weight index, tokenizer and generation files of a Hub model: everything but the weights."""
    return [hf_checkpoint.CONFIG_NAME, hf_checkpoint.INDEX_NAME, *hf_checkpoint.SIDE_FILES]


def model_patterns() -> list[str]:
    """What a model stage reads: the small files and the safetensors weights (never pickle weights)."""
    return [*small_patterns(), *WEIGHT_PATTERNS]


def materialize(name: str, storage_root: str, commit: str | None = None, tokenizer_only: bool = False) -> tuple[str, str]:
    """(location, commit) of the Hub model `name` for a run under `storage_root` (see the module
    docstring); `commit` pins the revision; `tokenizer_only` fetches no weights."""
    ref = hub.parse(name)
    if commit:
        ref = ref.at(commit)
    patterns = small_patterns() if tokenizer_only else model_patterns()
    if not storage.has_scheme(storage_root):
        folder = hub.download(ref, patterns)
        return folder, hub.commit_of(folder)
    small = hub.download(ref, small_patterns())  # names the commit without fetching weights
    commit = hub.commit_of(small)
    out = storage.join(storage_root, HUB_DIR, ref.cache_name, commit)
    markers = [".complete-model"] if not tokenizer_only else [".complete-model", ".complete-tokenizer"]
    if any(storage.exists(storage.join(out, m)) for m in markers):
        return out, commit
    folder = small if tokenizer_only else hub.download(ref.at(commit), patterns)
    _copy(folder, out, patterns)
    storage.write_text(storage.join(out, markers[-1] if tokenizer_only else markers[0]), "")
    return out, commit


def _copy(folder: str, uri: str, patterns: list[str]) -> None:
    """Upload the files of a snapshot folder that match `patterns` (a cached snapshot may hold
    more, e.g. pickle weights fetched by another tool); its files are links into the cache's
    blobs, uploaded as the files they point at."""
    fs, path = storage.filesystem(uri)
    for root, _, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        for f in files:
            if not any(fnmatch.fnmatch(f if rel == "." else f"{rel}/{f}", p) for p in patterns):
                continue
            src = os.path.realpath(os.path.join(root, f))
            dest = posixpath.join(path, f) if rel == "." else posixpath.join(path, rel, f)
            storage.retrying("uploading", storage.join(uri, rel, f), lambda: fs.put_file(src, dest))


def for_checks(name: str, storage_root: str) -> str:
    """A location `validate` can read `name`'s config and tokenizer at, fetching no weights:
    a Hub model's small files in the local cache, a builtin's built location, else `name`."""
    if hub.is_hub(name):
        return hub.download(hub.parse(name), small_patterns())
    return builtin.resolve(name, storage_root)


def check_hub_weights(name: str, folder: str) -> list[str]:
    """Problems with a Hub model's weights, checked without fetching them: the repo (or, offline,
    the cached snapshot) must hold safetensors."""
    from huggingface_hub import constants, snapshot_download

    ref = hub.parse(name).at(hub.commit_of(folder))
    if constants.is_offline_mode():
        names = os.listdir(folder)
    else:
        try:
            listing = snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=list(WEIGHT_PATTERNS),
                                        dry_run=True)
        except Exception as e:
            return [hub._explain(ref, e)]
        names = [f.filename for f in listing]
    if not any(n.endswith(".safetensors") for n in names):
        where = "the cached snapshot" if constants.is_offline_mode() else "the repository"
        return [f"{name}: {where} at commit {ref.revision} holds no *.safetensors weights; elo-ray never loads "
                "pickle weights (*.bin): pick a repository or revision with safetensors"]
    return []


def has_weight_map(folder: str) -> bool:
    """Whether a local checkpoint folder tells its tensors without the weights (an index), or holds them."""
    return any(n == hf_checkpoint.INDEX_NAME or n.endswith(".safetensors") for n in os.listdir(folder))


def checked_model(name: str, storage_root: str):
    """`validate`'s look at a model: (a location to read its small files at, its config), with
    the checks surgery makes of a checkpoint. A Hub model's weights are not fetched: its layers
    are checked from the weight index (every sharded model has one), a single-file model's
    architecture from its config. Raises with what is wrong."""
    from elo_ray import surgery

    location = for_checks(name, storage_root)
    if hub.is_hub(name):
        problems = check_hub_weights(name, location)
        if problems:
            raise hub.HubError(problems[0])
        if not has_weight_map(location):
            return location, surgery.checkpoint_config(location)
    return location, surgery.check_checkpoint(location)
