"""tests/ranks.py: a rank that dies says why in the test report (its stderr and faulthandler's stacks)."""

from __future__ import annotations

import os
import sys

import pytest

from tests.ranks import RanksFailed, spawn_ranks


def _abort_on_rank_1(rank: int, word: str) -> None:
    print(f"rank {rank} says {word}", file=sys.stderr, flush=True)
    if rank == 1:
        os.abort()


def test_a_rank_killed_by_a_signal_brings_its_stderr_and_stack(tmp_path):
    with pytest.raises(RanksFailed) as err:
        spawn_ranks(_abort_on_rank_1, ("hello",), logs=tmp_path / "logs")
    text = str(err.value)
    assert "process 1 terminated with signal SIGABRT" in text
    assert "rank 1 says hello" in text and "Fatal Python error: Aborted" in text and "_abort_on_rank_1" in text
    assert "--- rank 0 stderr" in text  # rank 0 may be stopped before it writes anything
