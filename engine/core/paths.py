"""Where LayerLab keeps runtime data."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # engine/core/paths.py -> the project


def cache_root() -> Path:
    """Runtime data folder: ``$LAYERLAB_CACHE`` if set, else ``cache/`` in the project."""
    root = Path(os.environ.get("LAYERLAB_CACHE", PROJECT_ROOT / "cache"))
    root.mkdir(parents=True, exist_ok=True)
    return root


class FolderExistsError(ValueError):
    """A save would overwrite an existing folder the user did not ask to replace."""


def unused_folder(folder: Path) -> Path:
    """``folder`` if it does not exist yet, else the first free ``folder-2``, ``folder-3``..."""
    folder = Path(folder)
    candidate, n = folder, 1
    while candidate.exists():
        n += 1
        candidate = folder.with_name(f"{folder.name}-{n}")
    return candidate


@contextmanager
def atomic_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success it replaces ``target`` in one rename.

    A crash or an interruption inside the block leaves the old ``target`` (or
    none) and removes the staging folder: never a half-written model.  An
    existing non-empty ``target`` is refused (:class:`FolderExistsError`)
    unless ``overwrite``.
    """
    target = Path(target)
    if not overwrite and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FolderExistsError(f"'{target}' already exists and is not empty; choose another folder "
                                "or allow overwriting.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        _usual_modes(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _process_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` would, for every thread, for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _usual_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir`` / ``open`` would (umask applied): the
    staging folder is private (``mkdtemp``: 0700), and some writers use private temporary files (0600)."""
    umask = _process_umask()
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one rename.

    Write the file to the yielded path; an exception inside the block leaves
    the old ``target`` (or none) and removes the temporary file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        yield Path(temp)
        os.replace(temp, target)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
