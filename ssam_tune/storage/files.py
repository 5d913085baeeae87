"""Atomic local writes and the local-or-URI test, shared by training (checkpoints) and tuning.

A reader of a file written here sees the old file or the new one, never half of one: a
temporary file in the same folder, then ``os.replace``. Object stores write whole objects on
close, which is atomic for readers, so they need none of this.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "clear_partial_writes", "is_uri", "new_dir", "swap_dir"]


def is_uri(path: str | os.PathLike | None) -> bool:
    """True for ``scheme://...`` (object storage or ``file://``), False for a plain path."""
    return path is not None and "://" in str(path)


# ---------------------------------------------------------------------------------------------
# atomic local writes
# ---------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[IO[bytes]], None], *,
                 fsync: bool = False) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace``: a reader
    sees the old file or the new one, never half of one. ``data`` is text, bytes, or a
    function that writes to the open binary file (``torch.save``). ``fsync`` forces the bytes
    to disk before the rename (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # plain open: the umask's permissions
    try:
        with open(tmp, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def clear_partial_writes(folder: Path) -> None:
    """Remove the temporary files of writes cut short by a crash (see :func:`atomic_write`)."""
    for stale in folder.glob(".*.tmp*"):  # also .<name>.tmp<pid>, the older naming
        stale.unlink(missing_ok=True)


def new_dir(parent: Path, name: str) -> Path:
    """An empty scratch folder ``parent/.<name>.<pid>.new`` (a leftover of a crash is cleared)."""
    path = parent / f".{name}.{os.getpid()}.new"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def swap_dir(built: Path, dest: Path) -> None:
    """Put the folder ``built`` in place of ``dest`` (the old one is renamed away, then removed)."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.{os.getpid()}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(built, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
