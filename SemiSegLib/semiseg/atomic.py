"""Writing files so that nothing half-written is ever left in place: the content goes to a temporary
file beside the destination (same folder, so the rename stays on one file system), is flushed to disk,
then renamed over the destination in one step (``os.replace``). An interruption leaves the old file or
the new one, never a mix; the temporary file is removed on failure.

The one implementation for checkpoints, JSON records, figures, CSV tables, images and labelmaps,
preprocessing caches and the Slicer job file. Free of torch (the Slicer module uses it)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

_DOUBLE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".tar.gz")


def _suffix(name: str) -> str:
    lower = name.lower()
    return next((s for s in _DOUBLE_SUFFIXES if lower.endswith(s)), os.path.splitext(name)[1])


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` with the same extension (writers that choose the format from it,
    e.g. SimpleITK, numpy, matplotlib, see the same name ending), renamed over ``path`` when the block
    ends without an exception and removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + _suffix(path.name), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | Path, content: str | bytes | Callable) -> Path:
    """Write ``content`` (text, bytes, or a function ``write(binary file object)``) to ``path`` atomically,
    flushed to disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)
