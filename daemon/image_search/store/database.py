"""The connection target: an embedded server it owns, or an external one it only connects to."""

from __future__ import annotations

from collections.abc import Callable

import psycopg2.extensions

from ..config import Config
from .connection import connect
from .embedded import EmbeddedPostgres
from .embeddings import EmbeddingStore


class Database:
    """The connection target: an embedded server it owns, or an external one it only connects to."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self.embedded = EmbeddedPostgres(cfg.embedded_data_directory) if cfg.embedded_database else None

    def connect(self) -> psycopg2.extensions.connection:
        """A new connection of its own (the fleet heartbeat's)."""
        return connect(self._cfg, self.embedded.uri if self.embedded else None)

    def open_store(self, *, dimension: int, create_table: bool = True,
                   checkpoint: Callable[[], None] = lambda: None) -> EmbeddingStore:
        """The store, its table created unless ``create_table`` is false (a start-up that reads the table
        while the model that confirms ``dimension`` is still loading). ``checkpoint``: ``EmbeddingStore``'s."""
        uri = self.embedded.uri if self.embedded else None
        store = EmbeddingStore(lambda: connect(self._cfg, uri), dimension=dimension, ef_search=self._cfg.ef_search,
                               exact_search_below=self._cfg.exact_search_below, checkpoint=checkpoint)
        if create_table:
            try:
                store.create_table()
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
