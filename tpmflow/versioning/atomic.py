"""Crash-safe file writes and the store's writer lock.

Every file the store publishes appears whole or not at all: it is written under ``tmp/``, flushed to
disk, renamed into place, and the directory flushed too. A commit killed at any instant therefore leaves only unreferenced
blobs and temporary files behind, which ``gc`` removes.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: Path, data: bytes | memoryview, tmp_dir: Path, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` in one ``os.replace``. ``durable`` fsyncs the file before the rename
    (a power loss cannot publish a name whose bytes never reached the disk) and the directory after
    it (the rename itself is on disk before the next step, e.g. the manifest naming this blob)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=path.name[:16] + ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared store from its other readers
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make the renames into ``folder`` durable (POSIX: a directory's entries are synced on their own)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Serialise writers (commit, tag, gc) across processes; readers never take it.

    ``gc`` must not run between a commit's blob writes and its manifest, or it would delete the
    blobs as unreachable; the kernel drops the lock if the holder dies, so no stale lock survives.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
