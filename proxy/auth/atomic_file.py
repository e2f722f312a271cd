"""Rewriting a credentials file so readers see the old file or the new one, never half of it."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


class WriteError(Exception):
    """The file could not be rewritten; the message names it. The old file is intact."""


def write_atomically(path: Path, data: bytes, *, new_mode: int, keep_mode: bool) -> None:
    """Temporary file in the same directory, fsync, rename, directory fsync.

    A new file gets `new_mode`; a rewrite keeps the old owner (the proxy reading the file may
    run as another user) and, with `keep_mode`, the old mode too (else `new_mode`).
    """
    # Through a symlink the link stays and its target is replaced.
    target = Path(os.path.realpath(path))
    try:
        old: os.stat_result | None = target.stat()
    except FileNotFoundError:
        old = None
    except OSError as exc:
        raise WriteError(f"{path}: cannot stat: {exc.strerror}") from None
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise WriteError(
            f"{target.parent}: cannot create a temporary file: {exc.strerror}"
        ) from None
    try:
        with os.fdopen(fd, "wb") as file:
            mode = new_mode
            if old is not None:
                _keep_owner(file.fileno(), old, path)
                if keep_mode:
                    mode = stat.S_IMODE(old.st_mode)
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise WriteError(f"{path}: cannot write: {exc.strerror or exc}") from None
        raise
    # The rename itself is durable only once the directory is synced.
    with contextlib.suppress(OSError):
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _keep_owner(fd: int, old: os.stat_result, path: Path) -> None:
    current = os.fstat(fd)
    if (current.st_uid, current.st_gid) == (old.st_uid, old.st_gid):
        return
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        # Silently changing the group could lock the proxy out of its own file.
        raise WriteError(
            f"{path}: cannot keep its owner {old.st_uid}:{old.st_gid}; run as root or as the owner"
        ) from None
