"""The README's layout stays true: every import of an elo_ray module follows the rows written at
the top of the README's library section, and its two walls hold."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "elo_ray"


def layout_rows() -> list[list[str]]:
    """The rows of the README's layout block (the first ```text block of the library section)."""
    library = (REPO / "README.md").read_text().split("\n## Library\n", 1)[1]
    block = re.search(r"```text\n(.*?)```", library, re.S)
    assert block, "README.md's library section has no ```text layout block"
    return [line.split() for line in block.group(1).splitlines() if line.strip()]


def unit(module: str) -> str:
    """The layout's name of a module: a package's submodules count as the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "elo_ray"


def imports() -> dict[str, set[str]]:
    """elo_ray module -> the elo_ray modules it imports, anywhere in its code."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("elo_ray")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("elo_ray"):
                # `from elo_ray import storage` imports elo_ray.storage, not the package
                found |= {f"{node.module}.{a.name}" for a in node.names} if node.module == "elo_ray" else {node.module}
        out[module] = found
    return out


def test_the_layout_names_every_module_once():
    rows = layout_rows()
    named = [name for row in rows for name in row]
    assert len(named) == len(set(named)), named
    on_disk = {unit(m) for m in imports()} - {"elo_ray"}
    assert set(named) == on_disk, f"not in the layout: {on_disk - set(named)}; not on disk: {set(named) - on_disk}"


def test_every_module_imports_only_from_its_row_and_the_rows_above():
    row_of = {name: i for i, row in enumerate(layout_rows()) for name in row}
    row_of["elo_ray"] = -1  # the package itself (its version): imports nothing
    wrong = [f"{m} (row {row_of[unit(m)] + 1}) imports {t} (row {row_of[unit(t)] + 1})"
             for m, targets in imports().items() for t in targets
             if row_of[unit(t)] > row_of[unit(m)]]
    assert wrong == []


def test_data_and_train_never_import_each_other_and_pipeline_imports_no_stage_work():
    edges = {(unit(m), unit(t)) for m, targets in imports().items() for t in targets}
    assert ("data", "train") not in edges and ("train", "data") not in edges
    assert {t for m, t in edges if m == "pipeline"} & {"surgery", "data", "train", "evaluate", "stages"} == set()
    # the checks can fail: the code has edges across rows and into pipeline
    assert ("stages", "pipeline") in edges and ("stages", "train") in edges
