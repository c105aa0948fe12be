"""The task, group and tag names that lm-evaluation-harness task YAMLs define, read without
lm-eval's TaskManager: what `validate` checks `eval.tasks` against, in seconds.

lm-eval's TaskManager parses every YAML under its tasks directory in full, each `include:`d
template again for every file that includes it (about 14,000 files in lm-eval 0.4.13: 60-70 s on
a loaded 2-core machine). A name depends only on a few top-level keys (`task`, `group`, `tag`,
`class`, `include`), so this index reads just those, parses each template once, and names
things by lm-eval's own rules: a file with `class`, or with `task` and no `group`, defines that
task and registers its tags (its own or its templates'); a file with `group` defines the group.
Tests compare it with TaskManager's names on task directories that use each of these forms.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path

import yaml

_KEYS = frozenset({"task", "group", "tag", "class", "include"})
_SKIP_DIRS = frozenset({"__pycache__", ".ipynb_checkpoints"})  # as lm-eval skips them
_TOP_KEY = re.compile(r"""^["']?([A-Za-z_][\w-]*)["']?[ \t]*:(.*)$""")  # a key at column 0, quoted or not
# a one-line value that is a plain or quoted scalar (anything else goes to the YAML parser)
_SCALAR = re.compile(r"""^[ \t]*(?:"([^"\\]*)"|'([^']*)'|([^\s"'\[\]{}#&*!|>%@`,-][^#]*?))?[ \t]*(?:#.*)?$""")
_STR_TAG = "tag:yaml.org,2002:str"


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML with lm-eval's `!function` tag accepted (its value does not name anything)."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def lm_eval_tasks_dir() -> str | None:
    """lm-eval's own tasks directory, found without importing lm-eval; None when not installed."""
    found = importlib.util.find_spec("lm_eval")
    if found is None or not found.submodule_search_locations:
        return None
    return os.path.join(list(found.submodule_search_locations)[0], "tasks")


def _plain(value: str) -> str | None:
    """A one-line value as a string, or None when only the YAML parser can say what it is."""
    m = _SCALAR.match(value)
    if m is None:
        return None
    quoted, single, plain = m.groups()
    if plain is not None:  # `null`, `true`, `1.0` ... are not strings
        resolved = yaml.resolver.Resolver().resolve(yaml.ScalarNode, plain, (True, False))
        return plain if resolved == _STR_TAG else None
    return quoted if quoted is not None else single if single is not None else ""


def _top_keys(path: str, cache: dict[str, dict | None]) -> dict | None:
    """The name-deciding top-level keys of one YAML file (None: unreadable, as lm-eval skips it)."""
    if path in cache:
        return cache[path]
    cache[path] = None
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks: dict[str, list[str]] = {}
    current = None
    for line in lines:
        m = _TOP_KEY.match(line)
        if m:
            current = m.group(1) if m.group(1) in _KEYS else None
            if current:
                blocks[current] = [line]
        elif line[:1] not in ("", " ", "\t", "-", "#"):
            current = None  # a document marker or another construct at column 0
        elif current:
            blocks[current].append(line)
    cfg: dict = {}
    for key, block in blocks.items():
        value = _plain(_TOP_KEY.match(block[0]).group(2)) if len(block) == 1 and key != "class" else None
        if value is not None:
            cfg[key] = value if value != "" else None
            continue
        try:
            parsed = yaml.load("\n".join(block), Loader=_Loader)  # noqa: S506 - a safe loader
        except yaml.YAMLError:
            return None
        if isinstance(parsed, dict):
            cfg.update(parsed)
    cache[path] = cfg
    return cfg


def _resolved(path: str, cache: dict[str, dict | None], seen: tuple[str, ...] = ()) -> dict | None:
    """A file's keys with its `include:`s merged under them, as lm-eval merges them."""
    cfg = _top_keys(path, cache)
    if cfg is None or path in seen:
        return None
    if "include" not in cfg:
        return cfg
    merged: dict = {}
    includes = cfg["include"]
    for inc in includes if isinstance(includes, list) else [includes]:
        if not isinstance(inc, str):
            return None
        sub = _resolved(os.path.normpath(os.path.join(os.path.dirname(path), inc)), cache, (*seen, path))
        if sub is None:
            return None
        merged.update(sub)
    merged.update(cfg)
    merged.pop("include", None)
    return merged


def _names_of(cfg: dict) -> list[str]:
    """What one resolved file defines, by lm-eval's rules (class, then group, then task)."""
    if "class" in cfg or ("task" in cfg and "group" not in cfg):
        if not isinstance(cfg.get("task"), str):
            return []
        tags = cfg.get("tag") or []
        return [cfg["task"], *([tags] if isinstance(tags, str) else [t for t in tags if isinstance(t, str)])]
    if isinstance(cfg.get("group"), str):
        return [cfg["group"]]
    return []


def _walk(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        out += [os.path.join(dirpath, f) for f in files if f.endswith(".yaml")]
    return out


@functools.lru_cache(maxsize=8)
def _defined_in(root: str, _stamp: float) -> frozenset[str]:
    cache: dict[str, dict | None] = {}
    names: set[str] = set()
    for path in _walk(root):
        try:
            cfg = _resolved(path, cache)
        except (OSError, UnicodeDecodeError):
            continue
        if cfg:
            names.update(_names_of(cfg))
    return frozenset(names)


def defined_in(task_dir: str | Path) -> frozenset[str]:
    """Every task, group and tag name the YAMLs under `task_dir` define (read once per process
    while the directory is unchanged)."""
    root = os.path.abspath(task_dir)
    return _defined_in(root, os.stat(root).st_mtime)
