"""CPU process settings: thread control for the few kernels that run faster on one thread, and handing freed
heap memory back to the OS."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block with one torch thread when ``device`` is the CPU, then restore the count.

    Small LAPACK calls (a 576×576 ``eigh``: 2.7 s on 2 busy threads, 0.07 s on
    one) and GPTQ's thousands of tiny column ops are much faster single-threaded
    on a shared CPU.  The setting is process-wide, so a concurrent session may
    briefly run with one thread too.  Other devices are left alone.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def trim_freed_heap() -> None:
    """Hand the free pages of glibc's heap back to the OS (``malloc_trim``; a no-op elsewhere).

    Building a variant allocates and frees many tensors of a few to tens of MB (one linear at a time); glibc
    keeps such freed blocks on its heap, pinned by the small tensors that stay alive between them, so the
    process would evaluate the variant with that garbage still resident: a 4-bit preview of a 1.1B model held
    1.35x the model's bytes where 1.21x was live (``bench/scale.py``).  Called once after a variant is built;
    it costs milliseconds, unlike lowering glibc's mmap threshold for the whole process (same 1.21x, but
    every forward 16% slower from page faults).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
