"""The one atomic-write helper: a temp file beside the target, flushed to disk, renamed over it.

A reader sees the old file or the new one, never half of one; a failed write leaves the target as
it was and no temp file behind. The temp file is ``.<name>.<pid>.<hex>.tmp`` beside the target: the
store removes those of dead processes by that name (`store.LocalStore`), ``p2pz batch`` its
``.*.tmp`` images. ``keep_suffix=True`` adds the target's suffix last (``.tmp.png``) for writers
that pick a format from the name (PIL)::

    >>> from pathlib import Path
    >>> import tempfile
    >>> from p2pz_directions.core.atomic import atomic_path, write_bytes
    >>> d = Path(tempfile.mkdtemp())
    >>> write_bytes(d / "a.json", b"{}")
    >>> with atomic_path(d / "b.txt") as tmp:
    ...     _ = tmp.write_text("hi")
    >>> sorted(p.name for p in d.iterdir())
    ['a.json', 'b.txt']
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _temp_beside(path: Path, keep_suffix: bool) -> Path:
    tail = path.suffix if keep_suffix else ""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp{tail}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write to; on a clean exit it replaces ``path``.

    ``fsync=True`` (default) flushes the file to disk before the rename. Parent folders are made.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path, keep_suffix)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into (`atomic_path`, opened)."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
        yield f


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data``, atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
