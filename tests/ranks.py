"""Ranks of one data plan read at once, on threads, as Ray Train workers read them."""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def each_rank(n: int, read: Callable[[int], T]) -> list[T]:
    """`read(rank)` for ranks 0..n-1 concurrently; their results in rank order, or the first error."""
    out: list = [None] * n
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            out[rank] = read(rank)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out
