"""Words in rayseg's own lines: counts with the right singular or plural noun."""

from __future__ import annotations

IRREGULAR = {"class": "classes", "batch": "batches", "process": "processes"}


def plural(n: int, noun: str) -> str:
    """`1 worker`, `2 workers`, `1 class`, `0 classes`."""
    return f"{n} {noun if n == 1 else IRREGULAR.get(noun, noun + 's')}"
