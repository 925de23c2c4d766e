"""Counts in messages read as a person would write them: "1 byte", "2 bytes", "1 failed query"."""

from __future__ import annotations

from image_search.wording import counted


def test_exactly_one_takes_the_singular_and_every_other_count_the_plural() -> None:
    assert [counted(n, "byte") for n in (0, 1, 2, 70_000)] == ["0 bytes", "1 byte", "2 bytes", "70,000 bytes"]
    assert [counted(n, "failed query", "failed queries") for n in (1, 3)] == ["1 failed query", "3 failed queries"]
