"""glibc allocator settings for the ``routesae`` command: reuse freed memory instead of fresh pages.

Under glibc's defaults, tensors of a few MB (activations of a batch, a ``[4096, M]`` pre-activation
matrix) are mapped fresh and returned on every allocation, and each fresh page costs a page fault.
:func:`tune_malloc` asks the allocator to serve blocks under 32 MiB from its heap and to keep up to
512 MiB of freed memory for reuse: analyze-routing on the demo MoE ran about 12% faster, its system
time falling from 4-6 s to 1-2 s (docs/RESULTS.md). The command calls it once at start; the Python
API never does (a notebook's process is its owner's). It changes nothing where:

- ``ROUTESAE_MALLOC=0`` is set, or any ``MALLOC_*`` variable (the user tunes glibc themselves);
- the C library is not glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
SETTINGS = ((M_MMAP_THRESHOLD, 32 * 2**20), (M_TRIM_THRESHOLD, 512 * 2**20), (M_TOP_PAD, 64 * 2**20))


def tune_malloc() -> bool:
    """Apply :data:`SETTINGS` with ``mallopt``; True when glibc took all of them."""
    if os.environ.get("ROUTESAE_MALLOC", "1") == "0" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only; musl and others raise AttributeError)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in SETTINGS)
