"""Importing the scripts of analyses/ (a folder of scripts, not a package) from the tests."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

import pytest

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


@contextlib.contextmanager
def analyses_on_path():
    """analyses/ first on ``sys.path`` inside the block (its scripts import each other by name)."""
    sys.path.insert(0, str(ANALYSES))
    try:
        yield
    finally:
        sys.path.remove(str(ANALYSES))


def import_script(name: str):
    """``analyses/NAME.py`` as a module (analyses/ is on the path only while it is imported)."""
    with analyses_on_path():
        return importlib.import_module(name)


def script_fixture(name: str):
    """A module-scoped fixture yielding ``analyses/NAME.py``, analyses/ on the path meanwhile, forgotten after."""

    @pytest.fixture(scope="module")
    def fixture():
        with analyses_on_path():
            try:
                yield importlib.import_module(name)
            finally:
                sys.modules.pop(name, None)

    return fixture
