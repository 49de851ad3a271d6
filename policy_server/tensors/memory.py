"""Keep freed tensor memory returnable to the OS while a merge streams tensor by tensor.

glibc serves allocations above ``M_MMAP_THRESHOLD`` with their own ``mmap`` (given back to the
OS on free) and the rest from the heap. By default the threshold is *dynamic*: freeing an mmapped
block raises it to that block's size (up to 32 MiB), after which every tensor below it comes
from the heap, where freed space is only returned from the top. A streaming admission allocates
and frees thousands of such tensors with interleaved lifetimes, and its resident memory grew by
about one core's worth (0.9 GiB on a Qwen2-0.5B-shaped checkpoint: 2.4 GiB peak instead of 1.1)
before the process ended. Setting the threshold explicitly turns the dynamic rule off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3
#: tensors above 1 MiB get their own mapping (a streamed tensor is 1-30 MiB)
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.lru_cache(maxsize=1)
def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` for this process (once). Returns False where it
    does not apply (not glibc, e.g. musl or macOS): nothing changes there."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))
