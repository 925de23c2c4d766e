"""The store's numbered migrations: one module per step, ``NNNN_name.py``, applied in number order by
``store.schema.migrate`` and recorded in ``image_search_schema`` (number, name, applied_at).

How to add one (a column, say): add the next file, e.g. ``0007_lens.py``, and nothing else::

    \"\"\"image_embeddings.lens: the lens (EXIF LensModel), NULL where unknown.\"\"\"
    NEEDS_DIMENSION = True  # it touches image_embeddings: wait until that table exists

    ADD_LENS = "ALTER TABLE image_embeddings ADD COLUMN IF NOT EXISTS lens TEXT"

    def apply(context) -> bool:
        context.cur.execute(ADD_LENS)
        return True

Every database gets it once, at the next start, under the schema lock; a new database gets it right
after its table is created. What a step module may define:

- ``apply(context) -> bool`` (required): do the step with ``context.cur`` (one transaction, under the
  schema lock; ``context.dimension`` is the embeddings' vector size). Return True once done (it is then
  recorded), False to wait for outside input (``context.supplied``, None until the caller of
  ``migrate(..., supplied={number: input})`` gives it). ``context.result`` goes back to that caller.
- ``NEEDS_DIMENSION = True``: the step touches ``image_embeddings``, so it waits until that table exists
  or the model has confirmed the dimension (the table is created then, by 0002).
- ``done_before(cur) -> bool``: True when a version older than the schema table already did the work
  (recognised from what it left, e.g. an ``image_search_meta`` marker); the step is then recorded
  without being run.

Never change a step once released: a database that applied it will not apply it again. A step must
not depend on the effect of an earlier step that may still be waiting (0003, the identity; 0006, the
metadata read from the files' headers): a waiting step does not hold back the steps after it.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

_STEP = re.compile(r"^(\d{4})_(\w+)$")


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    module: ModuleType

    @property
    def needs_dimension(self) -> bool:
        return bool(getattr(self.module, "NEEDS_DIMENSION", False))

    def done_before(self, cur: Any) -> bool:
        check: Callable[[Any], bool] | None = getattr(self.module, "done_before", None)
        return bool(check(cur)) if check is not None else False

    def apply(self, context: Any) -> bool:
        return bool(self.module.apply(context))


@cache
def discover() -> tuple[Migration, ...]:
    """Every step in this package, by number; numbered 1, 2, 3... without a gap or a twin."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        matched = _STEP.match(info.name)
        if matched:
            module = importlib.import_module(f"{__name__}.{info.name}")
            found.append(Migration(int(matched[1]), matched[2], module))
    found.sort(key=lambda step: step.number)
    numbers = [step.number for step in found]
    if numbers != list(range(1, len(found) + 1)):
        raise RuntimeError(f"the store's migrations must be numbered 1, 2, 3... without gaps or twins: {numbers}")
    return tuple(found)


_HAS_ROWS = "SELECT EXISTS (SELECT 1 FROM image_embeddings)"


def supplied_input(context: Any) -> Any | None:
    """For a step that needs outside input (0003, 0006): what it works on. ``context.supplied`` once the
    caller read the files; an empty dict for a table with no rows (nothing to do: applied at once, as on
    a new database); None while rows wait for the input (the step stays pending)."""
    if context.supplied is not None:
        return context.supplied
    context.cur.execute(_HAS_ROWS)
    return None if context.cur.fetchone()[0] else {}
