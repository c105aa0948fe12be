"""The budget of a stream: how many sequences of each language every worker trains.

From the sequences each worker's shard holds (`available`, known exactly after the counting
pass), the asked shares and the data config: `max_tokens` x share, or, with `epochs`, passes
over the scarcest language (tokens / share). `on_exhausted: stop` (default) cuts the budget to
what the scarcest language holds, so no document is trained twice and the ratio stays as
asked; the cut is reported. `repeat` re-reads the short language instead (epochs > 1 always
repeats). Chat streams end when the scarcest language (relative to its share) is used once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from elo_ray.config import ChatDataConfig, DataConfig, resolve_weights
from elo_ray.data.documents import StreamKind
from elo_ray.data.sources import DataError


@dataclass(frozen=True)
class Budget:
    """Sequences per language per worker, and what the data held."""

    available: dict[str, int]  # sequences per worker each language's shard holds
    quotas: dict[str, int]  # sequences per worker each language trains
    repeat: tuple[str, ...]  # languages whose quota is more than their shard holds: read again
    note: str | None  # says when the budget was cut to what the data holds


def resolve_shares(cfg: DataConfig | ChatDataConfig, kind: StreamKind) -> dict[str, float]:
    """Normalised shares per language: tokens (pretrain, default 1:9 English) or examples (chat, default equal)."""
    languages = sorted({s.language for s in cfg.sources})
    weights = cfg.weights
    if kind is StreamKind.CHAT and weights is None:
        weights = dict.fromkeys(languages, 1.0)  # chat default: equal (paper: target:English 1:1)
    try:
        return resolve_weights(weights, languages)
    except ValueError as e:
        raise DataError(f"weights: {e}") from None


def budget_for(cfg: DataConfig | ChatDataConfig, kind: StreamKind, available: dict[str, int],
               shares: dict[str, float], world_size: int) -> Budget:
    """The budget `cfg` asks for, given the sequences per worker each language holds."""
    if kind is StreamKind.CHAT:
        total_per_worker, repeat = None, False
    elif cfg.max_tokens is not None:
        total_per_worker, repeat = cfg.max_tokens // (cfg.seq_len * world_size), cfg.on_exhausted == "repeat"
    else:  # epochs: passes over the scarcest language; more than one pass means repeating
        fits = min(available[lang] / s for lang, s in shares.items() if s > 0)
        total_per_worker = math.floor(cfg.epochs * fits + 1e-9)
        repeat = cfg.epochs > 1 or cfg.on_exhausted == "repeat"
    q, note = quotas(available, shares, total=total_per_worker, repeat=repeat)
    if sum(q.values()) == 0:
        raise DataError(f"the stream is empty: {available} sequences per worker for {world_size} workers; "
                        f"add data, lower seq_len or use fewer workers")
    again = tuple(lang for lang in sorted(q) if repeat and q[lang] > available[lang])
    return Budget(available, q, again, note)


def apportion(total: int, shares: dict[str, float]) -> dict[str, int]:
    """`total` split by `shares` (largest remainder): integers that sum to `total`."""
    exact = {lang: total * s for lang, s in shares.items()}
    out = {lang: math.floor(x) for lang, x in exact.items()}
    left = total - sum(out.values())
    for lang in sorted(exact, key=lambda lang: (-(exact[lang] - out[lang]), lang))[:left]:
        out[lang] += 1
    return out


def quotas(available: dict[str, int], shares: dict[str, float], *, total: int | None, repeat: bool) -> tuple[dict[str, int], str | None]:
    """Sequences per language per worker.

    `available`: sequences each worker's shard holds; `total`: sequences per worker asked
    (None: one pass over the scarcest language); `repeat`: a language may be read more than once.
    Returns (quotas, note), the note saying when the budget was cut to what the data holds.
    """
    used = {lang: s for lang, s in shares.items() if s > 0}
    fits = min(available[lang] / s for lang, s in used.items())  # the scarcest language decides
    asked = math.floor(fits + 1e-9) if total is None else total
    n = asked if repeat else min(asked, math.floor(fits + 1e-9))
    while True:
        q = apportion(n, used)
        if repeat or all(q[lang] <= available[lang] for lang in used):
            break
        n -= 1
    note = None
    if n < asked:
        short = min(used, key=lambda lang: available[lang] / used[lang])
        note = (f"the budget of {asked} sequences per worker was cut to {n}: {short} holds only "
                f"{available[short]} per worker (on_exhausted: stop); add {short} data, lower max_tokens, "
                f"or set on_exhausted: repeat")
    return {lang: q.get(lang, 0) for lang in shares}, note
