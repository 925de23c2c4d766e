"""The start-up errors of the model, apart from ``embed`` so that naming them never imports torch
(the CLI and the service catch them before, or without, loading a model); and ``describe``, how any
exception is put in one line of a log field or a message."""


def describe(exc: BaseException) -> str:
    """``TypeName: the first line of its message`` (just the type name when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class ModelLoadError(Exception):
    """The model cannot be loaded; the message says which model and what to do."""


class DimensionError(Exception):
    """The configured ``dimension`` is one the model cannot produce."""


class NoTextTower(Exception):
    """The loaded model cannot embed text (no text tower, or no tokenizer): text queries are impossible."""
