"""One writer per store folder: an ``fcntl.flock`` on ``OUT/.capture.lock`` held for a whole capture.

The kernel drops the lock when its holder exits, however it exits, so a killed capture never
leaves a stale lock (its lock file may stay behind, holding its pid, and is reused). A second
capture into a locked folder fails at once with a one-line :class:`StoreLockError` naming the
holder's pid. The holder removes the lock file when it is done; a writer that opened the file
just before that notices (the path no longer names its file) and opens it again.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".capture.lock"


class StoreLockError(ValueError):
    """The store folder cannot be locked for writing: another capture holds it, or it cannot be created."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def _acquire(path: Path, root: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise StoreLockError(f"another capture is writing into {root} (pid {pid}); "
                                 f"wait for it or choose another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the previous holder removed the file after we opened it: take the new one


@contextmanager
def store_lock(root: str | Path) -> Iterator[Path]:
    """Create ``root`` if needed and hold its capture lock for the ``with`` block.

    A folder this call created is removed again when it is still empty at the end (a capture
    that failed before writing anything leaves no folder behind).
    """
    root = Path(root)
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreLockError(f"cannot create --out {root}: {exc.strerror}; choose a writable folder") from None
    path = root / LOCK_NAME
    fd = _acquire(path, root)
    try:
        yield root
    finally:
        path.unlink(missing_ok=True)  # while still holding the lock (see the module docstring)
        os.close(fd)
        if created:
            try:
                root.rmdir()
            except OSError:  # not empty: the store stays
                pass
