"""Is llama.cpp here, and where: the one place the rest of LayerLab asks.

llama.cpp is built once per machine by :mod:`engine.llamacpp.build` (``make
install`` runs it).  Everything that needs it calls :func:`require`, which
returns the build folder or raises :class:`LlamaCppUnavailable` with the
reason a user can act on (not built yet, the build failed and where its log
is, the Python binding missing).  The product works without it: the pages show
llama.cpp features as unavailable with :func:`status`'s reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.llamacpp import build


class LlamaCppUnavailable(ValueError):
    """llama.cpp is not usable on this machine; the message says why and what to run."""


@dataclass(frozen=True)
class LlamaCppStatus:
    """``available``: the libraries, tools and binding are there; ``reason``: why not (empty when available)."""

    available: bool
    reason: str
    home: Path
    version: str = build.BINDING_VERSION


def status() -> LlamaCppStatus:
    """Whether llama.cpp can be used here, without loading anything."""
    home = build.home()
    if build.failure_file().exists():
        why = build.failure_file().read_text().strip().splitlines()[0]
        return LlamaCppStatus(False, f"the llama.cpp build failed ({why}); log: {home / 'build.log'}. "
                              "Run `make llamacpp` to try again.", home)
    if not build.stamp().exists():
        return LlamaCppStatus(False, "llama.cpp is not built on this machine yet: run `make llamacpp` "
                              "(once per machine, about 10 minutes).", home)
    missing = [t for t in build.TOOLS if not (home / "bin" / t).exists()]
    if missing or not (home / "lib" / "libggml-base.so").exists():
        return LlamaCppStatus(False, f"the llama.cpp build in {home} is incomplete "
                              f"({', '.join(missing) or 'libggml-base.so'} missing): run `make llamacpp`.", home)
    if not build._binding_installed():
        return LlamaCppStatus(False, f"llama-cpp-python {build.BINDING_VERSION} is not installed in this Python: "
                              "run `make llamacpp`.", home)
    return LlamaCppStatus(True, "", home)


def require() -> Path:
    """The build folder (``bin/``, ``lib/``), or :class:`LlamaCppUnavailable` with the reason."""
    found = status()
    if not found.available:
        raise LlamaCppUnavailable(f"llama.cpp is unavailable: {found.reason}")
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(found.home / "lib"))
    return found.home


def tool(name: str) -> Path:
    """Path of one of llama.cpp's command-line tools (``llama-quantize``, ``llama-perplexity``, ``llama-imatrix``)."""
    if name not in build.TOOLS:
        raise ValueError(f"Unknown llama.cpp tool '{name}'; built: {', '.join(build.TOOLS)}.")
    return require() / "bin" / name
