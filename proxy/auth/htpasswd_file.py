"""Reading an htpasswd file into a user table, refusing entries that cannot be checked safely."""

from __future__ import annotations

from pathlib import Path

from passlib.context import CryptContext

# What apache2-utils `htpasswd` writes with -B, -m and -s. Plaintext (which passlib's own
# HtpasswdFile would accept, letting an empty hash in with an empty password) and DES crypt
# (only the first 8 characters count) are left out on purpose.
HASHES = CryptContext(schemes=["bcrypt", "apr_md5_crypt", "ldap_sha1"])

_REFUSED_HINT = "write it with `htpasswd -B`"


class HtpasswdError(Exception):
    """The htpasswd file cannot be used; the message names the file and line."""


class HtpasswdUnreadableError(HtpasswdError):
    """The file is missing or cannot be read (as opposed to having a bad line)."""


def load_htpasswd(path: Path) -> dict[str, str]:
    """Return user -> stored hash, or raise HtpasswdError naming the first bad line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HtpasswdUnreadableError(
            f"{path}: cannot read htpasswd file: {exc.strerror}"
        ) from None

    users: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise HtpasswdError(f"{where}: not UTF-8 text") from None
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user:
            raise HtpasswdError(f"{where}: expected 'user:hash'")
        if user in first_line:
            raise HtpasswdError(f"{where}: user already defined on line {first_line[user]}")
        scheme = HASHES.identify(stored)
        if scheme is None:
            raise HtpasswdError(
                f"{where}: refused: empty, plaintext, DES or unknown hash; {_REFUSED_HINT}"
            )
        try:
            HASHES.handler(scheme).from_string(stored)
        except ValueError:
            raise HtpasswdError(f"{where}: malformed {scheme} hash") from None
        users[user] = stored
        first_line[user] = number

    if not users:
        raise HtpasswdError(f"{path}: no users defined")
    return users
