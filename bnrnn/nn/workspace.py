"""Reuse of the large per-sequence buffers of the CPU fast path across training steps.

A seqMNIST BN-LSTM step fills several (T, B, 4H) float buffers of 80 MB each. Fresh from the
allocator, such a buffer is fresh pages from the kernel (glibc serves anything this large
with mmap and unmaps it on free), and faulting them in cost more than the arithmetic written
into them (docs/performance.md, "Measurements behind the code's thresholds").
This pool hands out views of buffers kept from earlier steps once nothing references them
any more (no saved tensor, no output a caller still holds), and allocates otherwise.

Buffers are kept by size, not by shape: a request takes the smallest idle buffer that holds
it. Padded batches of variable length (``task=ptb_sentences``) ask for a new shape at almost
every call; kept per shape, the pool grew to 10 GB within 500 steps and the kernel's OOM
killer ended the run. ``MAX_KEPT_BYTES`` bounds the pool: idle buffers are dropped, the
largest first, to make room, and a request that would pass the bound is served outside it.
"""

from __future__ import annotations

import math
import mmap
import threading

import torch

# The kept buffers' bound, in bytes, per (dtype, device): a seqMNIST BN-LSTM step keeps
# about 0.6 GB, PTB's 1000-unit one about 1.6 GB.
MAX_KEPT_BYTES = 3 << 30
# Smaller buffers are cheap to allocate (served from the heap without page faults).
MIN_POOLED_BYTES = 1 << 20

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)

HUGE_PAGE = 2 << 20


def mapped_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in its own anonymous memory map, aligned to 2 MB and, on
    Linux, advised to use transparent huge pages.

    Own pages rather than the C allocator's: how glibc serves an 80 MB request (fresh
    mmap, or heap memory, depending on what was freed before) changed a step's time between
    otherwise identical runs (docs/performance.md). Huge pages: the buffers stream through far more
    memory than the TLB covers with 4 KB pages (a nested page walk per 4 KB in a VM).
    """
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    region = mmap.mmap(-1, nbytes + HUGE_PAGE)
    address = torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr()
    offset = -address % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
        except OSError:
            pass  # huge pages are a speed-up, never a requirement
    return torch.frombuffer(region, dtype=dtype, count=numel, offset=offset).view(shape)


class Workspace:
    """A pool of CPU buffers; :meth:`empty` is ``torch.empty`` that may return reused memory.

    A kept buffer is free when only the pool references its storage: every tensor handed
    out is a fresh view, so any live reference (a view of it, autograd's saved copy, a
    caller's output) raises the storage's use count above the pool's own.
    """

    def __init__(self) -> None:
        self.kept: dict[tuple, list[tuple[torch.Tensor, int]]] = {}
        self.lock = threading.Lock()

    @staticmethod
    def use_count(tensor: torch.Tensor) -> int:
        return _storage_use_count(tensor.untyped_storage()._cdata)

    def empty(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device."""
        numel = math.prod(shape)
        if (_storage_use_count is None or like.device.type != "cpu"
                or numel * like.element_size() < MIN_POOLED_BYTES):
            return like.new_empty(shape)
        with self.lock:
            kept = self.kept.setdefault((like.dtype, like.device), [])
            idle = [entry for entry in kept if self.use_count(entry[0]) == entry[1]]
            fitting = [base for base, _ in idle if base.numel() >= numel]
            if fitting:
                return min(fitting, key=torch.Tensor.numel)[:numel].view(shape)
            size = numel * like.element_size()
            for entry in sorted(idle, key=lambda e: -e[0].numel()):  # make room: the largest idle first
                if self.bytes_in(kept) + size <= MAX_KEPT_BYTES:
                    break
                kept.remove(entry)
            if self.bytes_in(kept) + size > MAX_KEPT_BYTES:
                return like.new_empty(shape)
            base = mapped_empty((numel,), like.dtype)
            kept.append((base, self.use_count(base)))
            return base.view(shape)

    @staticmethod
    def bytes_in(kept: list[tuple[torch.Tensor, int]]) -> int:
        return sum(base.numel() * base.element_size() for base, _ in kept)

    def clear(self) -> None:
        """Drop every kept buffer (their memory is freed once no view is left)."""
        with self.lock:
            self.kept.clear()

    def kept_bytes(self) -> int:
        with self.lock:
            return sum(base.numel() * base.element_size() for kept in self.kept.values() for base, _ in kept)


# The process's pool, shared by every layer on the fast path.
WORKSPACE = Workspace()
