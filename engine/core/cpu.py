"""CPU thread control for the few kernels that run faster on one thread."""

from __future__ import annotations

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
