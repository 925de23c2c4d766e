"""The console script: Ctrl-C in the first half second, while the program's modules load, ends it with
exit 130 and no traceback, as Ctrl-C does later."""

from __future__ import annotations

import importlib.abc
import sys

import pytest

from image_search import entry


class _CtrlCWhileLoading(importlib.abc.MetaPathFinder):
    """The moment SIGINT arrives: while ``image_search.cli`` (and all it imports) is being loaded."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201  # importlib's signature
        if name == "image_search.cli":
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_the_modules_load_is_exit_130_not_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delitem(sys.modules, "image_search.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_CtrlCWhileLoading(), *sys.meta_path])
    assert entry.main() == 130
    assert capsys.readouterr() == ("", "")


def test_the_script_runs_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["image-search", "--help"])
    with pytest.raises(SystemExit) as done:
        entry.main()
    assert done.value.code == 0
