"""The layer sets `elo-ray search` compares: parsed from `--candidates`, from `search.candidates`,
or derived from the model's depth.

A candidate keeps the indices as the user wrote them (`[0, -1]`, what `--set pretrain.layers=`
takes) and the ones they mean in this model (`(0, 31)`), which name its folder
(`search/layers-0-31/`) and decide which candidates are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from elo_ray import surgery


class CandidateError(ValueError):
    """A candidate list that cannot be searched; the message names the candidate and what to write."""


@dataclass(frozen=True)
class Candidate:
    """One layer set: as given, and as indices into the model's decoder layers."""

    given: tuple[int, ...]
    layers: tuple[int, ...]

    @property
    def name(self) -> str:
        """The folder (and run id) of its trial: `layers-0-31`."""
        return "layers-" + "-".join(map(str, self.layers))

    @property
    def set_line(self) -> str:
        """The override that makes a run detach these layers."""
        return f"--set pretrain.layers=[{','.join(map(str, self.given))}]"


def parse(text: str) -> list[list[int]]:
    """`"0,-1; 0,1; -2,-1"` -> [[0, -1], [0, 1], [-2, -1]]."""
    out = []
    for part in text.split(";"):
        if not part.strip():
            continue
        try:
            out.append([int(x) for x in part.replace(" ", "").split(",") if x])
        except ValueError:
            raise CandidateError(
                f"--candidates: {part.strip()!r} is not a list of layer indices; write e.g. \"0,-1; 0,1; -2,-1\""
            ) from None
    if not out:
        raise CandidateError("--candidates names no layer set; write e.g. \"0,-1; 0,1; -2,-1\"")
    return out


def default(num_layers: int) -> list[list[int]]:
    """What a new model is searched over: first + last (the paper's choice), the first two, the
    last two, the middle pair (the paper's worst) and first + middle + last."""
    mid = num_layers // 2
    return [[0, -1], [0, 1], [-2, -1], [mid - 1, mid], [0, mid, -1]]


def resolve(given: list[list[int]], num_layers: int) -> list[Candidate]:
    """Candidates in the given order, each checked against the model's depth; a layer set named
    twice (`0,-1` and `0,31` in a 32-layer model) is searched once."""
    out: dict[tuple[int, ...], Candidate] = {}
    for layers in given:
        in_order = sorted(layers, key=lambda i: i % num_layers)  # the order the ELO model runs them
        try:
            resolved = surgery.validate_layers(num_layers, in_order)
        except surgery.SurgeryError as e:
            raise CandidateError(f"candidate {','.join(map(str, layers)) or '[]'}: {e}") from None
        out.setdefault(resolved, Candidate(tuple(in_order), resolved))
    return list(out.values())
