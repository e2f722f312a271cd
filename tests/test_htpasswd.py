"""htpasswd loading: what apache2-utils writes is accepted, unsafe entries refuse to load."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.auth.credentials import verify_password
from proxy.auth.htpasswd_file import HtpasswdError, load_htpasswd
from tests.support import htpasswd


def test_accepts_bcrypt_apr1_and_sha_from_apache_htpasswd(
    htpasswd_file: Path, users: dict[str, str]
) -> None:
    table = load_htpasswd(htpasswd_file)
    assert set(table) == set(users)
    for user, password in users.items():
        assert verify_password(password, table[user]), user
        assert not verify_password(password + "x", table[user]), user


@pytest.mark.system
@pytest.mark.parametrize("prefix", ["$2y$", "$2b$", "$2a$"])
def test_accepts_every_bcrypt_prefix(tmp_path: Path, prefix: str) -> None:
    path = tmp_path / "h"
    htpasswd(path, "-B", "-C", "4", user="u", password="pw")
    stored = path.read_text().strip().split(":", 1)[1]
    path.write_text("u:" + prefix + stored[4:] + "\n")
    assert verify_password("pw", load_htpasswd(path)["u"])


@pytest.mark.system
@pytest.mark.parametrize(
    ("flags", "kind"),
    [(["-p"], "plaintext"), (["-d"], "DES crypt")],
)
def test_refuses_plaintext_and_des_naming_the_line(
    tmp_path: Path, flags: list[str], kind: str
) -> None:
    path = tmp_path / "h"
    htpasswd(path, "-B", "-C", "4", user="good", password="pw")
    htpasswd(path, *flags, user="weak", password="pw")
    with pytest.raises(HtpasswdError, match=rf"{path}:2: refused"):
        load_htpasswd(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no users defined"),
        ("# only a comment\n\n", "no users defined"),
        ("alice:\n", ":1: refused"),
        ("alice\n", ":1: expected 'user:hash'"),
        (":$apr1$abc$def\n", ":1: expected 'user:hash'"),
        (
            "a:{SHA}Z/q5KhbWJGlg/C2XbiLEJnMKKr8=\na:{SHA}Z/q5KhbWJGlg/C2XbiLEJnMKKr8=\n",
            ":2: user already defined on line 1",
        ),
        ("a:$2y$05$truncated\n", ":1: malformed bcrypt hash"),
    ],
)
def test_refuses_bad_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "h"
    path.write_text(content)
    with pytest.raises(HtpasswdError, match=message):
        load_htpasswd(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(HtpasswdError, match="cannot read htpasswd file"):
        load_htpasswd(tmp_path / "absent")


@pytest.mark.system
def test_comments_blank_lines_and_crlf_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "h"
    htpasswd(path, "-s", user="u", password="pw")
    path.write_bytes(b"# users\r\n\r\n" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert verify_password("pw", load_htpasswd(path)["u"])
