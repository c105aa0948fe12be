"""Rows: one method run under one setting of the size preset, and the results file they append to.

A row is a method (`methods.METHODS`) and the preset's fields it changes (`--set FIELD=VALUE`).
Its key is what it computes from, so a rerun skips every row already in results.json (the
matrix is resumable: a crash loses at most the row in flight), and `--set cp_lr=3e-4` on a
preset whose cp_lr is 3e-4 is the preset's own row. The named matrices (`--matrix`) are the row
lists of the published experiments.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path

from replicate.experiment import Size

# A field's old name -> its name now (the error tells a user of the old name what to write).
RENAMED = {"base_ja_share": "base_target_share"}

# Fields full fine-tuning (and LoRA) do not read: an ELO row's full-FT reference is the full row
# whose other changes are the same (same base, same tokens, same mix).
ELO_ONLY_FIELDS = ("elo_lr", "align_share", "align_en_share", "align_lr")


def parse_overrides(size: Size, overrides: list[str]) -> dict:
    """`FIELD=VALUE` items as {field: value}, each value parsed as the field's type; errors name
    the item and the fields there are."""
    hints = typing.get_type_hints(Size)
    fields = [f.name for f in dataclasses.fields(size)]
    changes = {}
    for item in overrides:
        name, sep, raw = item.partition("=")
        if name in RENAMED:
            raise ValueError(f"{item!r}: {name} was renamed {RENAMED[name]}")
        if not sep or name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            raise ValueError(f"{item!r}: expected FIELD=VALUE with FIELD one of the preset's fields"
                             + (f"; did you mean {close[0]}?" if close else f" ({', '.join(fields)})"))
        kinds = [k for k in typing.get_args(hints[name]) or (hints[name],) if k is not type(None)]
        optional = type(None) in typing.get_args(hints[name])
        try:
            if raw.lower() == "none":
                if not optional:
                    raise ValueError("this field cannot be None")
                changes[name] = None
            else:
                kind = kinds[0]
                changes[name] = int(float(raw)) if kind is int else kind(raw)
        except ValueError as e:
            raise ValueError(f"{item!r}: {name} takes {hints[name]}: {e}") from None
    return changes


def with_overrides(size: Size, overrides: list[str]) -> Size:
    """`size` with `FIELD=VALUE` overrides."""
    return dataclasses.replace(size, **parse_overrides(size, overrides))


def changes_from(preset: Size, size: Size) -> dict:
    """The fields where `size` differs from `preset`, in field order."""
    return {f.name: getattr(size, f.name) for f in dataclasses.fields(size)
            if getattr(size, f.name) != getattr(preset, f.name)}


@dataclass(frozen=True)
class Row:
    """One method under one setting: `overrides` on top of the preset."""

    method: str
    overrides: tuple[str, ...] = ()

    def size(self, preset: Size) -> Size:
        return with_overrides(preset, list(self.overrides))

    def changes(self, preset: Size) -> dict:
        return changes_from(preset, self.size(preset))


def row_key(method: str, changes: dict, middle_layers: tuple[int, int] | None = None) -> str:
    """What a row computes from, as a string (the size name, target, seed and device are the
    results file's own)."""
    return json.dumps({"method": method, "changes": changes, "middle_layers": middle_layers}, sort_keys=True)


def command(header: dict, method: str, changes: dict, middle_layers=None) -> str:
    """The command that runs this row alone into the same results folder."""
    parts = ["benchmarks/replicate.py", "--size", header["size_name"], "--target", header["target"]]
    if header["device"] != "cpu":
        parts += ["--device", header["device"]]
    if header.get("seed"):
        parts += ["--seed", str(header["seed"])]
    parts += ["--methods", method]
    if middle_layers and method == "elo-middle":
        parts += ["--middle-layers", ",".join(map(str, middle_layers))]
    parts += [f"--set {k}={v:g}" if isinstance(v, float) else f"--set {k}={v}" for k, v in changes.items()]
    return " ".join(parts)


def setting_label(changes: dict) -> str:
    """A row's setting in a table: its changes, or "preset"."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changes.items()) or "preset"


def full_reference_changes(changes: dict) -> dict:
    """The changes of the full fine-tuning row that an ELO row with `changes` compares with."""
    return {k: v for k, v in changes.items() if k not in ELO_ONLY_FIELDS}


# The published row lists, in the order they run (the most telling rows first).
_SWEEP = [Row("elo", ("en_share=0",)), Row("elo", ("en_share=0.5",)), Row("elo", ("en_share=0.9",))]
_ENGLISH = [
    Row("elo", ("elo_lr=1e-4",)), Row("elo", ("elo_lr=3e-5",)), Row("elo", ("align_share=0.2",)),
    Row("elo", ("align_en_share=0.5",)),
    Row("full", ("base_target_share=0.05",)), Row("elo", ("base_target_share=0.05",)),
    Row("full", ("num_layers=24",)), Row("elo", ("num_layers=24",)),
]
# Two of the single changes that helped English most, together (after they had run alone).
_COMBINED = [Row("elo", ("align_share=0.2", "align_en_share=0.5")), Row("elo", ("elo_lr=3e-5", "align_en_share=0.5"))]
MATRICES = {
    "paper": [Row("full"), Row("lora"), Row("elo"), Row("elo-middle")],
    "ratio": [Row("full"), Row("elo"), *_SWEEP],
    "english": [Row("full"), Row("elo"), *_ENGLISH, *_COMBINED],
    # Everything issue 16 asks for, cheapest answers to the English question first.
    "align": [Row("elo-align")],
    "all": [Row("elo"), Row("full"), *_ENGLISH[:4], *_SWEEP, *_ENGLISH[4:], Row("lora"), Row("elo-middle"),
            Row("elo-align"), *_COMBINED],
}


def _same_build(saved: dict, base: dict) -> bool:
    """The same base model: same settings and the same held-out perplexities."""
    return saved["settings"] == base["settings"] and saved["perplexity"] == base["perplexity"]


class ResultsStore:
    """results.json of one size preset, target, seed and device: the bases and the rows so far.
    Every added row is written at once (atomically), so a crash keeps what finished."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.data = {**header, "bases": {}, "rows": [], "info": {}}
        if path.is_file():
            saved = json.loads(path.read_text())
            if "rows" not in saved:
                raise ValueError(f"{path} is from an older replicate.py (no rows); move it aside or use another --out")
            clash = {k: (saved.get(k), v) for k, v in header.items() if saved.get(k) != v}
            if clash:
                raise ValueError(f"{path} holds results of another setting ({clash}: saved, asked); "
                                 "use another --out")
            self.data = saved

    def has(self, key: str) -> bool:
        return any(r["key"] == key for r in self.data["rows"])

    def add_base(self, base: dict) -> str:
        """Record a base model; returns the key its rows cite. A base built again with the same
        settings (its folder was gone: another machine) is not bit for bit the first, so one that
        came out otherwise is kept beside it as KEY.2, KEY.3, ... (`rebuild_of`: KEY), and the rows
        that ran on the first keep citing theirs."""
        bases, key = self.data["bases"], base["key"]
        builds = [k for k in bases if k == key or bases[k].get("rebuild_of") == key]
        same = next((k for k in builds if _same_build(bases[k], base)), None)
        if same is None:
            same = key if not builds else f"{key}.{len(builds) + 1}"
            bases[same] = base if same == key else {**base, "rebuild_of": key}
            self.save()
        return same

    def add_row(self, row: dict) -> None:
        self.data["rows"] = [r for r in self.data["rows"] if r["key"] != row["key"]] + [row]
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, ensure_ascii=False))
        os.replace(tmp, self.path)
