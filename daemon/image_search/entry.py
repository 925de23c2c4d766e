"""The console script ``image-search``: Ctrl-C while the program's modules load (about half a second)
ends it as Ctrl-C ends it later, exit 130 and no traceback; ``cli.main`` does the rest."""

from __future__ import annotations


def main() -> int:
    try:
        from .cli import main as run

        return run()
    except KeyboardInterrupt:  # before cli.main could handle it: its imports, its argument parsing
        return 130
