"""The start-up errors of the model, apart from ``embed`` so that naming them never imports torch
(the CLI and the service catch them before, or without, loading a model)."""


class ModelLoadError(Exception):
    """The model cannot be loaded; the message says which model and what to do."""


class DimensionError(Exception):
    """The configured ``dimension`` is one the model cannot produce."""


class NoTextTower(Exception):
    """The loaded model cannot embed text (no text tower, or no tokenizer): text queries are impossible."""
