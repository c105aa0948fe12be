"""The search's answer: candidates ranked by what their short ELO pretraining did, as markdown,
JSON and a plot under `{root}/{run_id}/search/`.

Per candidate, from its trial's manifests: held-out perplexity of the base and of the merged
model per language (eval), the change in the target languages (geometric mean over them when
there are several) and in English, the seconds of pretraining and merging, and the parameters
it trains (its layers). Ranked by the target change, lowest first; failed candidates last, with
their error. Beside it the probe's rank, and how well the two rankings agree (Spearman's rho and
Kendall's tau over the candidates that finished; at least three are needed). The plot and the
correlation need the `search` extra (matplotlib, scipy); without it they are left out, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass

from elo_ray import storage
from elo_ray.search import probe
from elo_ray.layer_sets import Candidate
from elo_ray.search.trials import TrialOutcome

log = logging.getLogger(__name__)
FILES = ("ranking.md", "ranking.json", "ranking.png")
MISSING_EXTRA = "needs the search extra: pip install 'elo-ray[search]'"


@dataclass
class Row:
    """One candidate's line of the ranking."""

    layers: list[int]  # indices into the model's layers
    given: list[int]  # as written (what --set pretrain.layers= takes)
    name: str
    error: str | None
    reused: bool
    base: dict[str, float]  # held-out perplexity per language
    merged: dict[str, float]
    target_change: float | None  # merged / base - 1 (geometric mean over the target languages)
    english_change: float | None
    seconds: float | None  # pretrain + merge, as they ran (a reused trial: when it ran)
    trained_params: int
    probe_score: float | None = None
    probe_english: float | None = None
    rank: int | None = None
    probe_rank: int | None = None

    @property
    def set_line(self) -> str:
        return Candidate(tuple(self.given), tuple(self.layers)).set_line


def _change(base: dict[str, float], merged: dict[str, float], langs: list[str]) -> float | None:
    langs = [lang for lang in langs if lang in base and lang in merged]
    if not langs:
        return None
    return math.exp(sum(math.log(merged[lang] / base[lang]) for lang in langs) / len(langs)) - 1


def build(outcomes: list[TrialOutcome], targets: list[str], layer_params: int,
          norms: dict[str, list[float]] | None = None) -> list[Row]:
    """The ranked rows: finished candidates by target change, then the failed ones."""
    rows = []
    for o in outcomes:
        c, m = o.candidate, o.manifests
        ppl = m["eval"].metrics.get("perplexity", {}) if "eval" in m and o.error is None else {}
        base, merged = ppl.get("base", {}), ppl.get("merge", {})
        seconds = sum(m[s].metrics.get("seconds", 0.0) for s in ("pretrain", "merge") if s in m) if o.error is None else None
        row = Row(list(c.layers), list(c.given), c.name, o.error, o.reused, base, merged,
                  _change(base, merged, targets), _change(base, merged, ["en"]), seconds,
                  len(c.layers) * layer_params)
        if norms:
            row.probe_score = probe.score(norms, c.layers, [t for t in targets if t in norms])
            row.probe_english = probe.score(norms, c.layers, ["en"]) if "en" in norms else None
        rows.append(row)
    done = sorted((r for r in rows if r.error is None and r.target_change is not None),
                  key=lambda r: (r.target_change, r.english_change or 0.0))
    for i, r in enumerate(done, 1):
        r.rank = i
    for i, r in enumerate(sorted((r for r in done if r.probe_score is not None), key=lambda r: -r.probe_score), 1):
        r.probe_rank = i
    return done + [r for r in rows if r not in done]


def agreement(rows: list[Row]) -> dict | None:
    """Rank correlation of the probe's ranking with the trained one over the finished candidates
    (1: the same order), or None with fewer than three."""
    pairs = [(r.rank, r.probe_rank) for r in rows if r.rank is not None and r.probe_rank is not None]
    if len(pairs) < 3:
        return None
    try:
        from scipy import stats
    except ImportError:
        return {"candidates": len(pairs), "missing": MISSING_EXTRA}

    trained, probed = zip(*pairs)
    return {"candidates": len(pairs), "spearman": float(stats.spearmanr(trained, probed).statistic),
            "kendall": float(stats.kendalltau(trained, probed).statistic)}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _ppl(row: Row, langs: list[str]) -> str:
    return "; ".join(f"{lang} {row.base[lang]:,.1f} → {row.merged[lang]:,.1f}" for lang in langs
                     if lang in row.base and lang in row.merged) or "-"


def markdown(rows: list[Row], info: dict) -> str:
    targets = info["targets"]
    lines = [
        f"# Layer search of run {info['run_id']}",
        "",
        f"{len(rows)} candidate layer sets of the {info['num_layers']}-layer base, each: ELO pretraining on "
        f"{info['max_tokens']:,} tokens of pretrain.data, merge, held-out perplexity ({', '.join(info['languages'])}). "
        f"Ranked by the change of target perplexity ({', '.join(targets)}), lower is better.",
        "",
        "| rank | layers | target perplexity, base → merged | target change | English change | time s "
        "| trained params | probe rank | |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.error is not None:
            lines.append(f"| - | {', '.join(map(str, r.layers))} | failed: {r.error.replace('|', '/')} | | | | "
                         f"{r.trained_params / 1e6:.2f}M | | |")
            continue
        lines.append(
            f"| {r.rank} | {', '.join(map(str, r.layers))} | {_ppl(r, targets)} | {_pct(r.target_change)} | "
            f"{_pct(r.english_change)} | {r.seconds:.0f} | {r.trained_params / 1e6:.2f}M | "
            f"{r.probe_rank if r.probe_rank is not None else '-'} | {'reused' if r.reused else ''} |")
    best = next((r for r in rows if r.rank == 1), None)
    lines += ["", f"Use: `{best.set_line}`" if best else "No candidate finished.", ""]
    agree = info.get("agreement")
    if info.get("probe_error"):
        lines += [f"Probe: failed ({info['probe_error']}).", ""]
    elif agree and "missing" in agree:
        lines += [f"Probe: its rank correlation with the trained ranking {agree['missing']}.", ""]
    elif agree:
        lines += [f"Probe (gradient norms of the base, trains nothing; elo_ray/search/probe.py): Spearman's rho "
                  f"{agree['spearman']:+.2f}, Kendall's tau {agree['kendall']:+.2f} between its ranking and the "
                  f"trained one over {agree['candidates']} candidates (1: the same order).", ""]
    return "\n".join(lines)


def plot(rows: list[Row], info: dict, path: str) -> None:
    """Target and English perplexity change per finished candidate, best at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.error is None]
    labels = [f"{', '.join(map(str, r.layers))} ({r.seconds:.0f} s)" for r in done]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(done) + 1.6), squeeze=False)
    for ax, values, title in (
        (axes[0][0], [r.target_change for r in done], f"target perplexity change ({', '.join(info['targets'])})"),
        (axes[0][1], [r.english_change for r in done], "English perplexity change"),
    ):
        values = [100 * v if v is not None else 0.0 for v in values]
        ax.barh(range(len(done)), values, color=["#2e8540" if v <= 0 else "#c44e52" for v in values])
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:+.1f}%", va="center", fontsize=8)
        ax.set_yticks(range(len(done)), labels if ax is axes[0][0] else [""] * len(done))
        ax.invert_yaxis()
        ax.axvline(0, color="#555555", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("% vs the base (lower is better)")
        ax.margins(x=0.2)
    fig.suptitle(f"layer search of {info['run_id']}: {info['max_tokens']:,} tokens per candidate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(search_uri: str, rows: list[Row], info: dict) -> dict[str, str]:
    """ranking.md, ranking.json and ranking.png under `search_uri`; their URIs by name."""
    uris = {name: storage.join(search_uri, name) for name in FILES}
    best = next((r for r in rows if r.rank == 1), None)
    record = {**info, "best": {"layers": best.layers, "set": best.set_line} if best else None,
              "candidates": [asdict(r) for r in rows]}
    storage.write_text(uris["ranking.json"], json.dumps(record, indent=1))
    storage.write_text(uris["ranking.md"], markdown(rows, info))
    if importlib.util.find_spec("matplotlib") is None:
        log.warning(f"search: no ranking.png: the plot {MISSING_EXTRA}")
        del uris["ranking.png"]
        return uris
    if any(r.error is None for r in rows):
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "ranking.png")
            plot(rows, info, local)
            with open(local, "rb") as f:
                storage.write_bytes(uris["ranking.png"], f.read())
    else:
        del uris["ranking.png"]
    return uris
