"""The C allocator in a steady state for timing, and the process's memory as the kernel counts it."""

from __future__ import annotations

import ctypes
import gc

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def steady_allocator() -> bool:
    """Make glibc reuse freed blocks of up to 32 MB (its largest fixed mmap threshold) and
    keep freed memory, so that every model is timed in the same, steady allocator state.

    torch.nn.LSTM (oneDNN on the CPU) allocates its per-sequence tensors anew each step.
    With glibc's defaults they come either from fresh pages or from reused heap memory,
    depending on what the process freed before (glibc raises its mmap threshold after large
    frees), and the same nn.LSTM step's time varied by more than 2x from one run to the
    next (docs/performance.md). Fixed this way it measures at its fast end. (Our fast path keeps its buffers in a pool and
    does not depend on it.) False where glibc is not the allocator.
    """
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def release_freed_memory() -> None:
    """Make freed memory leave the resident set, so that RSS tracks live allocations.

    glibc keeps freed blocks for reuse and raises its mmap threshold after large frees;
    a fixed threshold returns every large tensor to the system on free, and malloc_trim
    hands back the rest. A no-op where glibc is not the allocator.
    """
    libc = glibc()
    if libc is None:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)
    gc.collect()
    libc.malloc_trim(0)


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")
