"""routesae.malloc: the command's glibc settings, and when it leaves the allocator alone (the speed it
buys is measured in docs/RESULTS.md, not here: page-fault counts of a small process vary run to run)."""

from __future__ import annotations

import ctypes
import os
import sys

import pytest

from routesae import malloc


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


def test_tune_malloc_applies_on_glibc_and_stays_off_when_asked(monkeypatch):
    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("ROUTESAE_MALLOC", raising=False)
    assert malloc.tune_malloc() is _glibc()
    monkeypatch.setenv("ROUTESAE_MALLOC", "0")
    assert malloc.tune_malloc() is False
    monkeypatch.delenv("ROUTESAE_MALLOC")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the user tunes glibc themselves
    assert malloc.tune_malloc() is False


def test_the_command_tunes_malloc_at_start(monkeypatch):
    from routesae import cli

    calls = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["routesae", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == [1]
