"""Start ``fn(rank, *args)`` in N gloo processes on CPU, as torchrun would; failures name what each rank printed.

Each process writes its standard error (Python's and the C++ libraries') to ``<logs>/rank-<r>.log``
and dumps every thread's Python stack there on a fatal signal (faulthandler). When a process
fails, the error raised here carries the original message and the end of every rank's log, so a
rank killed by a signal (a SIGABRT from a C++ ``terminate``, say) says why in the test report.
"""

from __future__ import annotations

import faulthandler
import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

LOG_TAIL = 4000  # characters of each rank's log in an error


def free_port() -> int:
    """A TCP port on 127.0.0.1 free a moment ago (for rendezvous and test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, logs: str, fn: Callable, args: tuple) -> None:
    log = open(Path(logs) / f"rank-{rank}.log", "a", buffering=1)  # noqa: SIM115  (open until the process ends)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    fn(rank, *args)


class RanksFailed(RuntimeError):
    pass


def spawn_ranks(fn: Callable, args: tuple, logs: Path, world: int = 2) -> None:
    """Run ``fn(rank, *args)`` in ``world`` processes; raise :class:`RanksFailed` with the ranks' logs if one fails.

    ``fn`` must be a module-level function (the processes are spawned, not forked).
    """
    logs.mkdir(parents=True, exist_ok=True)
    try:
        mp.spawn(_rank_main, args=(world, free_port(), str(logs), fn, args), nprocs=world, join=True)
    except ProcessException as exc:
        tails = []
        for r in range(world):
            path = logs / f"rank-{r}.log"
            text = path.read_text(errors="replace") if path.exists() else "(no log)"
            tails.append(f"--- rank {r} stderr, last {LOG_TAIL} characters ---\n{text[-LOG_TAIL:]}")
        raise RanksFailed("\n".join([str(exc), *tails])) from exc
