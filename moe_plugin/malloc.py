"""Keep freed large CPU blocks in the process heap (glibc's ``mallopt``).

A training step on a CPU allocates its large tensors afresh: the optimizer
wrapper drops every gradient (``zero_grad(set_to_none=True)``), so a soft MoE
layer's expert gradients (174 MB per step for MoE Jetpack's 98 + 196
experts) and its activations are allocated again in the next step. glibc
serves every block above its mmap threshold (128 KiB, raised dynamically up
to 32 MiB) with a fresh ``mmap`` and returns it with ``munmap``: each page
then faults on first touch, and filling a 58 MB weight gradient from a
batched matmul costs 4-8x the matmul (measured here: 46-60 ms against 5-7 ms
for ``[98, 192, 768]``). With a high mmap threshold the blocks come from the
heap and are reused from one step to the next; with a high trim threshold
the heap keeps them when they are freed.

The price: the process keeps its peak heap instead of returning freed
memory to the system. GPU memory is not affected (CUDA has its own caching
allocator). :func:`keep_freed_memory` is what ``tools/train.py`` and the
benchmarks call; ``MOE_PLUGIN_KEEP_FREED_MEMORY=0`` turns it off there.
"""
import ctypes
import ctypes.util
import os
import sys

#: ``mallopt`` parameters (glibc's ``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: The largest block still served from the heap by default: 1 GiB.
DEFAULT_THRESHOLD = 1 << 30
#: The environment variable that turns :func:`keep_freed_memory` off (0).
ENV_SWITCH = 'MOE_PLUGIN_KEEP_FREED_MEMORY'


def _glibc():
    """The C library if it is glibc (has ``mallopt``), else None."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    except OSError:
        return None
    if not hasattr(libc, 'gnu_get_libc_version') or not hasattr(
            libc, 'mallopt'):
        return None  # musl and others: no glibc tunables to set
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve blocks up to ``threshold`` bytes from the heap and keep them.

    Sets glibc's mmap threshold and trim threshold to ``threshold``, for the
    rest of the process. A no-op (returns False) on other C libraries and
    operating systems, or when ``MOE_PLUGIN_KEEP_FREED_MEMORY=0``.

    Args:
        threshold (int): bytes, in ``[128 KiB, 2 GiB)``. Defaults to 1 GiB.

    Returns:
        bool: whether glibc took both settings.
    """
    if not 128 * 1024 <= threshold < 2**31:
        raise ValueError(
            f'threshold must be in [131072, 2**31) bytes, got {threshold}')
    if os.environ.get(ENV_SWITCH, '1').strip() in ('0', 'false', 'False'):
        return False
    libc = _glibc()
    if libc is None:
        return False
    trim = libc.mallopt(M_TRIM_THRESHOLD, threshold)
    mmap = libc.mallopt(M_MMAP_THRESHOLD, threshold)
    return bool(trim and mmap)
