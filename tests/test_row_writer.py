"""Rows written beside the indexer (``store.writer.RowWriter``): every ticket committed in order, tickets
that queue up while one is written go together in one transaction, a failed write fails its tickets and
is told once while the next ones are written, a lost connection fails what waits behind it and is
replaced, and the caller can ask
whether a queued write touches a hash or a path before reading it."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from image_search.store import Database, DatabaseUnavailable, EmbeddingRow, EmbeddingStore
from image_search.store.writer import RowWriter
from tests.support.db import empty_store, raw

pytestmark = pytest.mark.integration

DIM = 8
DATABASE_CONFIG = {"dimension": DIM}  # the module's database (the ``database`` fixture, conftest.py)


def row(i: int, dim: int = DIM) -> EmbeddingRow:
    vector = np.zeros(dim, dtype=np.float32)
    vector[i % dim] = 1.0
    return EmbeddingRow(f"/img/{i}.png", f"{i}.png", f"h{i:06d}", f"/processed/{i}.png.jpg", 10, i, "m", vector)


def stored_hashes(database: Database) -> list[str]:
    return [h for (h,) in raw(database, "SELECT file_hash FROM image_embeddings ORDER BY file_hash")]


@pytest.fixture
def store(database: Database) -> Iterator[EmbeddingStore]:
    with empty_store(database, DIM) as s:
        yield s


@pytest.fixture
def writer(store: EmbeddingStore) -> Iterator[RowWriter]:
    w = RowWriter(store)
    yield w
    w.close()


def held(writer: RowWriter, first: EmbeddingRow) -> tuple:
    """Submit ``first`` and hold the writer inside its write (rows committed, its ``then`` waiting) until
    the returned event is set; that ticket, the event."""
    inside, release = threading.Event(), threading.Event()

    def hold(_store: EmbeddingStore) -> None:
        inside.set()
        release.wait(30)

    ticket = writer.submit([first], keys={first.file_hash}, then=hold)
    assert inside.wait(30)
    return ticket, release


def test_tickets_queued_while_one_is_written_are_committed_together_in_order(writer, database) -> None:
    first, release = held(writer, row(0))
    later = [writer.submit([row(i)], keys={f"h{i:06d}", f"/img/{i}.png"}) for i in (1, 2, 3)]
    assert writer.touches({"/img/2.png"}) and not writer.touches({"/img/9.png"})
    assert not any(t.written for t in [first, *later])
    release.set()
    writer.flush()
    assert all(t.written for t in [first, *later])
    assert stored_hashes(database) == ["h000000", "h000001", "h000002", "h000003"]
    assert writer.transactions == 2  # the first alone, the three that waited behind it as one
    assert not writer.touches({"/img/2.png"})
    # Each row's path is a path of its content, as a direct upsert leaves it.
    assert raw(database, "SELECT count(*) FROM image_paths")[0][0] == 4


def test_a_refused_row_fails_its_group_is_told_once_and_the_next_write_lands(writer, database) -> None:
    _, release = held(writer, row(0))
    refused = writer.submit([row(1, dim=DIM + 1)], keys=set())  # not the table's dimension
    grouped = writer.submit([row(2)], keys=set())  # written in the refused one's transaction
    release.set()
    writer.wait()
    assert refused.error is not None and not refused.written
    assert grouped.error is refused.error and not grouped.written
    # The next write is taken whatever went before: a caller that reads its tickets (the service) is
    # not told twice; one that asks is told, once.
    after = writer.submit([row(3)], keys=set())
    with pytest.raises(Exception, match="dimension"):
        writer.raise_failure()
    writer.raise_failure()
    writer.flush()
    assert after.written
    assert stored_hashes(database) == ["h000000", "h000003"]  # nothing of the failed transaction was kept


def test_a_lost_connection_fails_what_is_queued_at_once_and_the_next_write_reconnects(writer, database) -> None:
    held_write, release = held(writer, row(0))  # its rows and its ``then`` share a transaction
    backend = writer._store.session.conn.get_backend_pid()  # noqa: SLF001 - the writer's own connection
    raw(database, "SELECT pg_terminate_backend(%s)", (backend,))
    lost = writer.submit([row(i) for i in range(1, 1001)], keys=set())
    behind = writer.submit([row(i) for i in range(1001, 1101)], keys=set())  # a transaction of its own (> 1,024 rows)
    release.set()
    writer.wait()
    assert isinstance(held_write.error, DatabaseUnavailable)
    # Failed with it, not after reconnects of their own on a lost database.
    assert lost.error is held_write.error and behind.error is held_write.error
    with pytest.raises(DatabaseUnavailable):
        writer.raise_failure()
    again = writer.submit([row(1)], keys=set())
    writer.flush()
    assert again.written
    assert stored_hashes(database) == ["h000001"]  # nothing of the transaction the connection took with it


def test_a_write_whose_follow_up_fails_keeps_none_of_its_rows_and_the_next_one_lands(writer, database) -> None:
    """The rows and what a ticket writes after them share one transaction; the session's staging table,
    made in a transaction of its own, outlives the failed one (this is the connection's first write)."""
    def fail(_store: EmbeddingStore) -> None:
        raise RuntimeError("a follow-up write that fails")

    failed = writer.submit([row(5)], keys=set(), then=fail)
    writer.wait()
    assert isinstance(failed.error, RuntimeError) and stored_hashes(database) == []
    with pytest.raises(RuntimeError, match="follow-up"):
        writer.raise_failure()
    after = writer.submit([row(6)], keys=set())
    writer.flush()
    assert after.written and stored_hashes(database) == ["h000006"]


def test_a_write_rolled_back_for_a_deadlock_is_written_again_and_lands(writer, database) -> None:
    """PostgreSQL ends a deadlock by rolling back one side (SQLSTATE 40P01, as when two services record
    copies of several pictures in opposite orders). That side's rows are written again, not failed as if
    the database were lost, and the writer does not reconnect for it."""
    tries: list[int] = []

    def loses_a_deadlock_once(store: EmbeddingStore) -> None:
        tries.append(1)
        if len(tries) == 1:
            with store.session.transaction() as cur:
                cur.execute("DO $$ BEGIN RAISE EXCEPTION 'deadlock detected (test)' "
                            "USING ERRCODE = 'deadlock_detected'; END $$")

    connection = writer._store.session.conn  # noqa: SLF001 - the same connection before and after
    ticket = writer.submit([row(1)], keys={"h000001"}, then=loses_a_deadlock_once)
    writer.wait()
    assert ticket.written and len(tries) == 2
    assert writer._store.session.conn is connection  # noqa: SLF001
    assert stored_hashes(database) == ["h000001"]

