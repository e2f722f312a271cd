"""Editing the htpasswd file like apache2-utils `htpasswd -B`, rewriting it atomically.

Lines are matched to users the way `htpasswd_file.load_htpasswd` reads them; every line that
is not the edited user's (comments, blank lines, other users, even lines that would not load) is
written back byte for byte and in its place.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from passlib.hash import bcrypt

from proxy.auth.atomic_file import WriteError, write_atomically
from proxy.auth.credentials import verify_password
from proxy.auth.htpasswd_file import load_htpasswd

DEFAULT_COST = 10
# The bcrypt costs `htpasswd -C` accepts.
MIN_COST = 4
MAX_COST = 17
NEW_FILE_MODE = 0o640
# bcrypt ignores everything after byte 72 and the proxy refuses longer passwords.
_BCRYPT_MAX_BYTES = 72
# apache2-utils refuses longer user names.
_MAX_USER_BYTES = 255


class PasswdError(Exception):
    """The file cannot be read or written, or an argument is unusable; the message says which."""


class UnknownUserError(PasswdError):
    """The user has no entry in the file."""


def check_user_name(user: str) -> None:
    """Raise PasswdError unless `user` can be written to and read back from an htpasswd line."""
    if not user:
        raise PasswdError("user name is empty")
    if ":" in user:
        raise PasswdError(f"user name {user!r} contains ':'")
    if not user.isprintable():
        raise PasswdError(f"user name {user!r} contains a control or non-printable character")
    if user != user.strip():
        raise PasswdError(f"user name {user!r} starts or ends with whitespace")
    if user.startswith("#"):
        raise PasswdError(f"user name {user!r} starts with '#' (the line would be a comment)")
    if len(user.encode()) > _MAX_USER_BYTES:
        raise PasswdError(f"user name is longer than {_MAX_USER_BYTES} bytes")


def hash_password(password: str, cost: int = DEFAULT_COST) -> str:
    """A `$2y$` bcrypt hash, as `htpasswd -B -C cost` writes it."""
    if not MIN_COST <= cost <= MAX_COST:
        raise PasswdError(f"bcrypt cost {cost} is outside {MIN_COST} to {MAX_COST}")
    if not password:
        raise PasswdError("empty password")
    if "\0" in password:
        raise PasswdError("password contains a NUL character")
    try:
        size = len(password.encode())
    except UnicodeEncodeError:
        raise PasswdError("password is not valid UTF-8") from None
    if size > _BCRYPT_MAX_BYTES:
        raise PasswdError(
            f"password is longer than {_BCRYPT_MAX_BYTES} bytes (bcrypt ignores the rest, "
            "so the proxy refuses such passwords)"
        )
    return str(bcrypt.using(rounds=cost, ident="2y").hash(password))


def list_users(path: Path) -> list[str]:
    """User names in file order; lines that would not load are skipped, not refused."""
    return [user for line in _read_lines(path) if (user := _user_of(line)) is not None]


def set_password(path: Path, user: str, password: str, *, cost: int = DEFAULT_COST) -> bool:
    """Replace the user's line in place, or append one (creating the file); True if replaced."""
    check_user_name(user)
    entry = f"{user}:{hash_password(password, cost)}".encode()
    with _locked(path):
        lines = _read_lines(path, missing_ok=True)
        out: list[bytes] = []
        replaced = False
        for line in lines:
            if _user_of(line) != user:
                out.append(line)
            elif not replaced:
                out.append(entry + _ending(line))
                replaced = True
            # A second line for the same user would make the file refuse to load: dropped.
        if not replaced:
            eol = next((e for e in map(_ending, reversed(out)) if e), b"\n")
            if out and not _ending(out[-1]):
                out[-1] += eol
            out.append(entry + eol)
        _write_atomically(path, b"".join(out))
    return replaced


def remove_user(path: Path, user: str) -> int:
    """Remove every line of the user and return how many users are left."""
    with _locked(path):
        lines = _read_lines(path)
        kept = [line for line in lines if _user_of(line) != user]
        if len(kept) == len(lines):
            raise UnknownUserError(f"{path}: no user {user!r}")
        _write_atomically(path, b"".join(kept))
    return sum(_user_of(line) is not None for line in kept)


def check_password(path: Path, user: str, password: str) -> bool:
    """Whether the proxy would accept these credentials with this file."""
    stored = load_htpasswd(path).get(user)
    if stored is None:
        raise UnknownUserError(f"{path}: no user {user!r}")
    return verify_password(password, stored)


def _user_of(line: bytes) -> str | None:
    """The user a line defines, read like load_htpasswd reads it; None for any other line."""
    try:
        text = line.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if not text or text.startswith("#"):
        return None
    user, sep, _ = text.partition(":")
    return user if sep and user else None


def _ending(line: bytes) -> bytes:
    for eol in (b"\r\n", b"\n", b"\r"):
        if line.endswith(eol):
            return eol
    return b""


def _read_lines(path: Path, *, missing_ok: bool = False) -> list[bytes]:
    try:
        return path.read_bytes().splitlines(keepends=True)
    except FileNotFoundError:
        if missing_ok:
            return []
        raise PasswdError(f"{path}: cannot read htpasswd file: No such file or directory") from None
    except OSError as exc:
        raise PasswdError(f"{path}: cannot read htpasswd file: {exc.strerror}") from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize concurrent edits by this command; the lock is on the directory, not the file."""
    directory = Path(os.path.realpath(path)).parent
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise PasswdError(f"{directory}: cannot open directory: {exc.strerror}") from None
    try:
        # The file itself cannot carry the lock: os.replace swaps in another inode.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one; a new file gets NEW_FILE_MODE."""
    try:
        write_atomically(path, data, new_mode=NEW_FILE_MODE, keep_mode=True)
    except WriteError as exc:
        raise PasswdError(str(exc)) from None
