"""Running out of memory in the middle of a run: a clear message instead of a traceback, memory given back.

The memory plan (:mod:`engine.core.memory`) refuses runs that cannot fit
before they start, but it is an estimate, and another session or program
can take memory while a run is under way.  A run that then fails to
allocate (``torch.OutOfMemoryError`` on CUDA, ``MemoryError`` or the CPU
allocator's ``RuntimeError`` on the host) ends with :class:`RunOutOfMemory`,
a ``ValueError`` like every input error, so the UI shows its message and the
CLI exits with status 2.

Nothing is lost: runs store their record only after they finish, and
variants never write to the loaded model, so after the failure the store and
the base model are as before.  The failed run's tensors are released before
the message is raised (the new error does not chain the old one, whose
traceback would keep the run's frames, and their tensors, alive), and CUDA's
cache is emptied.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

_ALLOCATION_FAILURES = ("out of memory", "can't allocate memory", "cannot allocate memory",
                        "failed to allocate memory")


class RunOutOfMemory(ValueError):
    """A run ran out of memory part-way; nothing was stored and the loaded model is unchanged."""


def is_allocation_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation (CUDA or host), not some other runtime error."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error).lower() for text in _ALLOCATION_FAILURES)


def out_of_memory_message(what: str, error: BaseException) -> str:
    """What happened, that nothing was lost, and what to change."""
    device = "the GPU" if isinstance(error, torch.OutOfMemoryError) or "cuda" in str(error).lower() else "the CPU"
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return (f"{what} ran out of memory on {device} part-way ({detail}). Nothing was stored and the loaded model "
            "is unchanged. To fit: use fewer or shorter calibration and evaluation windows, fewer levels or "
            "candidates, or free memory (close other sessions or programs); the memory line above the button "
            "estimates the run's peak.")


def release_memory() -> None:
    """Collect the failed run's garbage and hand CUDA's cached blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_DEPTH: ContextVar[int] = ContextVar("explained_out_of_memory_depth", default=0)


def explain_out_of_memory(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: an allocation failure inside the function becomes :class:`RunOutOfMemory` (see the module
    docstring); every other error passes through unchanged.  ``what``: the work, e.g. ``"The slicing run"``.

    Decorated functions call each other (a run measures dense, computes scores...): only the outermost one
    converts, so the message names what the user started and the memory is released once every frame of it
    has unwound.
    """
    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            token = _DEPTH.set(_DEPTH.get() + 1)
            try:
                if _DEPTH.get() > 1:  # inside another decorated call: it converts
                    return function(*args, **kwargs)
                try:
                    return function(*args, **kwargs)
                except (RuntimeError, MemoryError) as error:
                    if not is_allocation_failure(error):
                        raise
                    message = out_of_memory_message(what, error)
            finally:
                _DEPTH.reset(token)
            # outside the except block: the error, its traceback and the run's frames are gone by now
            release_memory()
            raise RunOutOfMemory(message)
        return wrapper
    return decorate
