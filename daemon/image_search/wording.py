"""Counts in messages: ``counted(1, "byte")`` is "1 byte", ``counted(70000, "byte")`` "70,000 bytes"."""

from __future__ import annotations


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """``count`` (thousands separated) and its unit, singular for exactly one; ``plural`` where adding
    an s is not the plural ("query", "queries")."""
    return f"{count:,} {singular if count == 1 else plural or singular + 's'}"
