"""Files that survive a crash or a power loss: written to a temporary name, fsynced, then renamed over the old.

A rename alone is atomic but not durable: without the fsync before it, a power loss can leave the new name pointing
at an empty file; without the fsync of the folder after it, the rename itself can be lost.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_synced(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` and fsync it (the caller renames it, or the folder holding it, into place)."""
    with path.open("wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def replace_durably(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` atomically: a crash at any point leaves either the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable, where the platform can open a folder (not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover  (some file systems refuse fsync on a folder)
        pass
    finally:
        os.close(fd)
