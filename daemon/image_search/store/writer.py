"""Rows written beside the caller: ``RowWriter``, a thread and a connection of its own.

The indexer embeds the next batch while this one's rows travel. Batches that queue up while one is
being written go together, in one transaction (group commit): when the model is faster than the
database, the per-transaction costs (a commit's flush, the staging table's reset, a statement's
planning: about 1.5 ms here, a tenth of a millisecond per row of a 16-row batch) are paid once for
several batches. When the database keeps up, each batch is its own transaction, as before.

Every write is a ``Ticket``: done once its transaction committed or failed. A failure (the database
gone, a row refused) fails every ticket of that transaction, and nothing of it is kept: its rows and
what each ticket writes after them (``then``: the paths of copies, the paths that left) share the
transaction. A transaction that PostgreSQL rolled back because it conflicted with another (a deadlock
with another service's write) is written again first (``Session.retrying``). A lost database fails what
is queued behind at once; the writer reconnects before the next write. The caller learns of a failure on
its own thread, from the tickets (the service: which batches go back to pending) or from
``raise_failure`` and ``flush`` (``index``: the first failure, once).

What a queued ticket will write is not in the database yet: the caller asks ``touches`` before it reads
rows that a queued ticket might change (its hashes and paths), and ``flush``-es first if so.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .connection import DatabaseUnavailable
from .embeddings import EmbeddingRow, EmbeddingStore

# Rows in one transaction at most, when tickets are grouped (about 4 MB of 1024-d vectors).
MAX_ROWS_PER_TRANSACTION = 1024
# Tickets waiting behind the one being written at most; ``submit`` waits for room beyond that, so memory
# stays bounded when the database is slower than the model.
MAX_QUEUED = 4


@dataclass(eq=False)
class Ticket:
    """One write: ``rows`` upserted, then ``then`` (further writes that need those rows: the paths of their
    copies, the paths that left them) on the writer's store. ``keys``: every hash and path it writes."""

    rows: Sequence[EmbeddingRow]
    keys: frozenset[str]
    then: Callable[[EmbeddingStore], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    @property
    def written(self) -> bool:
        """Committed (False while queued, and for good once it failed)."""
        return self.done.is_set() and self.error is None


class RowWriter:
    """Writes ``Ticket``s in order on a store of its own (``EmbeddingStore.sibling``), on its own thread."""

    def __init__(self, store: EmbeddingStore) -> None:
        self._store = store.sibling()
        self._cond = threading.Condition()
        self._queue: deque[Ticket] = deque()
        self._active: list[Ticket] = []
        self._failure: BaseException | None = None  # the first failure ``raise_failure`` did not raise yet
        self._closing = False
        self._broken = False
        self.transactions = 0  # committed (a group of tickets is one)
        self._thread = threading.Thread(target=self._run, name="row-writer", daemon=True)
        self._thread.start()

    def submit(self, rows: Sequence[EmbeddingRow], *, keys: Iterable[str],
               then: Callable[[EmbeddingStore], None] | None = None) -> Ticket:
        """Queue a write; waits while the queue is full. An earlier failure is not raised here: the caller
        asks (``raise_failure``, ``flush``) or reads its tickets, whichever it uses, never both."""
        ticket = Ticket(rows, frozenset(keys), then)
        with self._cond:
            if self._closing:
                raise RuntimeError("the row writer is closed")
            while len(self._queue) >= MAX_QUEUED:
                self._cond.wait()
            self._queue.append(ticket)
            self._cond.notify_all()
        return ticket

    def touches(self, keys: Iterable[str]) -> bool:
        """Whether a ticket not yet done writes any of ``keys`` (hashes, paths)."""
        wanted = set(keys)
        with self._cond:
            return any(not ticket.keys.isdisjoint(wanted) for ticket in (*self._active, *self._queue))

    def raise_failure(self) -> None:
        """Raise the first write failure not raised yet (later ones until then are not raised: their
        tickets say so)."""
        with self._cond:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def wait(self) -> None:
        """Wait until every ticket submitted so far is done (committed or failed)."""
        with self._cond:
            while self._queue or self._active:
                self._cond.wait()

    def flush(self) -> None:
        """``wait``, then ``raise_failure``."""
        self.wait()
        self.raise_failure()

    def close(self) -> None:
        """Write what is queued (a failure is not raised here: its tickets say so), then let the connection go."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._store.close()

    # --- the writer's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                self._active = self._take_group()
                self._cond.notify_all()  # room in the queue
            self._write(self._active)
            with self._cond:
                self._active = []
                self._cond.notify_all()

    def _take_group(self) -> list[Ticket]:
        group = [self._queue.popleft()]
        rows = len(group[0].rows)
        while self._queue and rows + len(self._queue[0].rows) <= MAX_ROWS_PER_TRANSACTION:
            rows += len(self._queue[0].rows)
            group.append(self._queue.popleft())
        return group

    def _write_once(self, group: list[Ticket]) -> None:
        with self._store.session.transaction():  # the rows and what follows them: all or nothing
            self._store.upsert([row for ticket in group for row in ticket.rows])
            for ticket in group:
                if ticket.then is not None:
                    ticket.then(self._store)

    def _write(self, group: list[Ticket]) -> None:
        try:
            if self._broken:
                self._store.reconnect()  # raises DatabaseUnavailable while it is still away
                self._broken = False
            self._store.prepare_writes()
            self._store.session.retrying(lambda: self._write_once(group))  # again after a deadlock's rollback
            self.transactions += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            self._broken = isinstance(exc, DatabaseUnavailable)
            if self._broken:  # what is queued behind would wait on the same outage: it fails now
                with self._cond:
                    group.extend(self._queue)
                    self._queue.clear()
            for ticket in group:
                ticket.error = exc
            with self._cond:
                self._failure = self._failure or exc
        finally:
            for ticket in group:
                ticket.done.set()
