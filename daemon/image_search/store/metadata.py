"""The metadata columns of ``image_embeddings`` (migration 0005): how a ``PictureMetadata`` and a folder
are written (binary COPY, the relink's UPDATE, the metadata migration 0006) and read back into a hit."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import psycopg2.extras
import structlog

from ..metadata import PictureMetadata, camera_name
from ..names import escape
from . import schema

if TYPE_CHECKING:
    from .embeddings import EmbeddingStore

log = structlog.get_logger("image_search.store")

METADATA_STEP = 6  # migrations/0006_metadata_from_headers.py

# In the order of ``metadata_values`` and ``copy_fields``; folder last.
COLUMNS = ("taken_at", "taken_at_offset_minutes", "camera_make", "camera_model", "width", "height", "format", "folder")
COLUMN_LIST = ", ".join(COLUMNS)
STAGING_DDL = ("taken_at TIMESTAMPTZ, taken_at_offset_minutes INTEGER, camera_make TEXT, camera_model TEXT, "
               "width INTEGER, height INTEGER, format TEXT, folder TEXT")
UPSERT_SET = ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS)
# How ``taken_at`` is read back: seconds since 1970 (numeric), made a datetime by ``taken_at_of``. Never
# as a timestamptz: psycopg2 parses that in the session's time zone and fails the whole statement on a
# year outside 1-9999, which one row can hold (10000-01-01 in UTC, as earlier versions stored
# "9999:12:31 23:59:59" at -14:00) or a session's zone can make of a good one (9999-12-31 23:59 UTC
# is year 10000 in Pacific/Kiritimati).
TAKEN_AT_SECONDS = "extract(epoch FROM taken_at)"
# What a hit reads, after its own columns (``hit_fields``).
HIT_COLUMNS = f"{TAKEN_AT_SECONDS}, taken_at_offset_minutes, camera_make, camera_model, width, height, format"
# A representative's path takes its row's folder where it has none (written before 0006 filled the row's).
FILL_PATH_FOLDERS = """
UPDATE image_paths AS p SET folder = e.folder FROM image_embeddings AS e
WHERE p.file_path = e.file_path AND p.file_hash = e.file_hash AND p.folder IS NULL AND e.folder IS NOT NULL
"""
UPDATE_ALL = ("UPDATE image_embeddings SET " + ", ".join(f"{c} = %s" for c in COLUMNS) + " WHERE file_hash = %s")
FILL = """
UPDATE image_embeddings AS e SET taken_at = v.taken_at, taken_at_offset_minutes = v.taken_at_offset_minutes,
    camera_make = v.camera_make, camera_model = v.camera_model, width = v.width, height = v.height,
    format = v.format, folder = v.folder
FROM (VALUES %s) AS v(file_hash, taken_at, taken_at_offset_minutes, camera_make, camera_model, width, height,
                      format, folder)
WHERE e.file_hash = v.file_hash
"""
FILL_TEMPLATE = "(%s, %s::timestamptz, %s::integer, %s, %s, %s::integer, %s::integer, %s, %s)"

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NULL = struct.pack("!i", -1)


@dataclass(frozen=True)
class MetadataUpdate:
    """What the metadata migration writes into one row: its folder, and its header's metadata (None
    when the file could not be read as it was stored: only the folder is written)."""

    folder: str | None
    metadata: PictureMetadata | None


def metadata_values(metadata: PictureMetadata | None, folder: str | None) -> tuple[Any, ...]:
    """The values of ``COLUMNS`` for one row; folder escaped as every stored path is."""
    stored_folder = escape(folder) if folder is not None else None
    if metadata is None:
        return (None,) * 7 + (stored_folder,)
    return (metadata.taken_at, metadata.offset_minutes, metadata.camera_make, metadata.camera_model,
            metadata.width, metadata.height, metadata.format, stored_folder)


def copy_fields(metadata: PictureMetadata | None, folder: str | None) -> bytes:
    """``COLUMNS`` in binary COPY form: timestamptz as int64 microseconds since 2000-01-01 UTC, int4,
    UTF-8 text, NULL as length -1."""
    out = []
    for column, value in zip(COLUMNS, metadata_values(metadata, folder)):
        if value is None:
            out.append(_NULL)
        elif column == "taken_at":
            delta = value - _PG_EPOCH
            micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
            out.append(struct.pack("!iq", 8, micros))
        elif isinstance(value, int):
            out.append(struct.pack("!ii", 4, value))
        else:
            data = str(value).encode("utf-8")
            out.append(struct.pack("!i", len(data)) + data)
    return b"".join(out)


def fill_metadata(cur, supplied: dict[str, MetadataUpdate]) -> int:
    """Write each supplied row's metadata and folder (by file_hash); the rows updated."""
    values = [(file_hash, *metadata_values(update.metadata, update.folder)) for file_hash, update in supplied.items()]
    if not values:
        return 0
    psycopg2.extras.execute_values(cur, FILL, values, template=FILL_TEMPLATE, page_size=10_000)
    cur.execute(FILL_PATH_FOLDERS)  # the folder filter reads every path's (store.filters)
    return len(values)


def taken_at_of(seconds: Decimal | float | None, path: str) -> datetime | None:
    """The date taken of the row of ``path`` (its stored text) from ``TAKEN_AT_SECONDS``, in UTC; None
    without one, and for a value no datetime holds (one line: a search never fails on one row's date)."""
    if seconds is None:
        return None
    try:
        return _UNIX_EPOCH + timedelta(microseconds=int(Decimal(seconds) * 1_000_000))
    except (ArithmeticError, OverflowError, ValueError):  # beyond years 1-9999, or infinity
        log.warning("stored_date_unreadable", path=path, seconds_since_1970=str(seconds),
                    reason="outside years 1-9999: read as no date")
        return None


def taken_at_text(taken_at: datetime | None, offset_minutes: int | None) -> str | None:
    """ISO 8601: with the picture's own offset where its file gave one; else the service's local time,
    without an offset (the time as the camera's clock showed it)."""
    if taken_at is None:
        return None
    try:
        if offset_minutes is not None:
            return taken_at.astimezone(timezone(timedelta(minutes=offset_minutes))).isoformat()
        return taken_at.astimezone().replace(tzinfo=None).isoformat()
    except (OverflowError, ValueError):  # that zone would move it past year 9999 (or before 1): UTC says it
        return taken_at.astimezone(timezone.utc).isoformat()


def hit_fields(row: tuple[Any, ...], path: str) -> dict[str, Any]:
    """A hit's metadata from the ``HIT_COLUMNS`` of the row of ``path`` (its stored text)."""
    seconds, offset, make, model, width, height, fmt = row
    return {"taken_at": taken_at_text(taken_at_of(seconds, path), offset), "camera": camera_name(make, model),
            "width": width, "height": height, "format": fmt}


def needs_metadata_migration(store: EmbeddingStore) -> bool:
    """True while the rows of an earlier version wait for their metadata (step 0006). Asked of the
    database each time: another service sharing it may have migrated it meanwhile."""
    return store.has_table and not schema.is_applied(store.session.conn, METADATA_STEP)


def migrate_metadata(store: EmbeddingStore, updates: dict[str, MetadataUpdate]) -> int:
    """Supply the metadata step its input (file_hash -> ``MetadataUpdate``: ``sync.migrate_metadata``
    reads the headers) and apply it, in one transaction under the schema lock; the rows updated (0 when
    another service did it first)."""
    done = schema.migrate(store.session.conn, dimension=store.dimension, supplied={METADATA_STEP: updates})
    return int(done.get(METADATA_STEP) or 0)
