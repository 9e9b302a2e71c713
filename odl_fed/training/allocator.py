"""The C allocator of a process that trains or aggregates: free pages handed back, and where glibc maps
large blocks on their own.

glibc keeps freed heap pages resident, so a process's resident size (what psutil reads, and what a
board's kernel counts) keeps what it no longer uses; :func:`release_free_memory` hands it back
(``malloc_trim``). Both the client's :class:`~odl_fed.training.memory_guard.MemoryGuard` and the server
use it.

glibc's ``mmap`` threshold is dynamic: it starts at :data:`LARGE_BLOCK` and rises (up to
:data:`LARGEST_THRESHOLD`) each time a mapped block is freed, after which blocks of that size stay in
the heap, resident: the server that receives each round's replies (MBs each) grew by hundreds of MB
that way. :func:`mmap_threshold` sets it for a scope. glibc has no call that gives its dynamic mode
back once a threshold was set, so a scope only changes anything in a process that has said it owns its
allocator (:func:`own_process`): the ServerApp's own process in a deployment, and the ``odl-fed``
command. A caller that imports the library (a notebook, a test) keeps glibc's dynamic mode.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

__all__ = ["release_free_memory", "mmap_threshold", "own_process", "owns_process", "LARGE_BLOCK",
           "LARGEST_THRESHOLD"]


def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back or set
        return None


_MALLOC_TRIM = _libc_function("malloc_trim")
_MALLOPT = _libc_function("mallopt")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_BLOCK = 128 * 1024  # glibc's own starting threshold
LARGEST_THRESHOLD = 32 * 2**20  # where glibc's dynamic threshold stops rising (64-bit)

# This process's allocator settings: whether it may change them, and the threshold it last set.
_process = {"owned": False, "threshold": None}


def own_process() -> None:
    """Say that this process is the product's own (a server process, the ``odl-fed`` command), so that
    :func:`mmap_threshold` may set glibc's threshold for good."""
    _process["owned"] = True


def owns_process() -> bool:
    return bool(_process["owned"])


def release_free_memory() -> bool:
    """Return the allocator's free pages to the system; False where the C library cannot."""
    return bool(_MALLOC_TRIM is not None and _MALLOC_TRIM(0) is not None)


@contextlib.contextmanager
def mmap_threshold(size: int) -> Iterator[bool]:
    """While active, allocations of ``size`` bytes or more are mapped on their own and given back to the
    system when freed; on exit the threshold of the enclosing scope, and free pages handed back.

    Yields False, changing nothing, where the C library cannot (not glibc) or the process has not
    claimed its allocator (:func:`own_process`). Leaving the outermost scope leaves the threshold at
    :data:`LARGEST_THRESHOLD`, where glibc's dynamic threshold would have risen to (glibc cannot be put
    back in its dynamic mode): which is why only a process of the product's own sets it.
    """
    previous = _process["threshold"]
    done = _process["owned"] and _MALLOPT is not None and _MALLOPT(M_MMAP_THRESHOLD, size) == 1
    if done:
        _process["threshold"] = size
    try:
        yield done
    finally:
        if done:
            _process["threshold"] = previous
            _MALLOPT(M_MMAP_THRESHOLD, LARGEST_THRESHOLD if previous is None else previous)
            release_free_memory()
