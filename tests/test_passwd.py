"""`registry-proxy passwd`: interoperable with apache2-utils both ways, other lines kept, atomic."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from passlib.hash import bcrypt

from proxy.auth import passwd
from proxy.auth.credentials import verify_password
from proxy.auth.htpasswd_file import HtpasswdError, load_htpasswd
from proxy.cli import main
from tests.support import htpasswd as apache_htpasswd

REGISTRY_PROXY = Path(sys.executable).parent / "registry-proxy"
FAST = ["--cost", "4"]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PROXY_CONFIG", "PROXY_HTPASSWD"):
        monkeypatch.delenv(name, raising=False)


def run(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *args: str,
    stdin: bytes | None = None,
) -> tuple[int, str, str]:
    """Run the command in-process; returns (status, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def apache_verifies(path: Path, user: str, password: str) -> bool:
    result = subprocess.run(["htpasswd", "-vb", str(path), user, password], capture_output=True)
    return result.returncode == 0


def add(monkeypatch, capsys, path: Path, user: str, password: str, *extra: str) -> int:
    args = ["passwd", "--file", str(path), "add", user, "--password-stdin", *FAST, *extra]
    status, _, _ = run(monkeypatch, capsys, *args, stdin=password.encode() + b"\n")
    return status


@pytest.mark.system
def test_add_creates_a_file_that_apache_htpasswd_and_the_proxy_accept(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    path = tmp_path / "htpasswd"
    assert add(monkeypatch, capsys, path, "alice", "s3cret ü") == 0
    assert add(monkeypatch, capsys, path, "bob", "bob:colon") == 0

    assert (path.stat().st_mode & 0o777) == 0o640
    assert apache_verifies(path, "alice", "s3cret ü")
    assert apache_verifies(path, "bob", "bob:colon")
    assert not apache_verifies(path, "alice", "s3cret")
    table = load_htpasswd(path)
    assert list(table) == ["alice", "bob"]
    assert table["alice"].startswith("$2y$04$")
    assert verify_password("s3cret ü", table["alice"])


@pytest.mark.system
def test_default_cost_is_10_with_the_2y_prefix(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "htpasswd"
    status, _, err = run(
        monkeypatch,
        capsys,
        *["passwd", "--file", str(path), "add", "alice", "--password-stdin"],
        stdin=b"pw\n",
    )
    assert status == 0, err
    stored = load_htpasswd(path)["alice"]
    assert stored.startswith("$2y$10$")
    assert bcrypt.from_string(stored).rounds == 10
    assert apache_verifies(path, "alice", "pw")


@pytest.mark.system
@pytest.mark.parametrize(
    "flags", [["-B", "-C", "4"], ["-m"], ["-s"]], ids=["bcrypt", "apr1", "sha"]
)
def test_check_accepts_what_apache_htpasswd_wrote(
    tmp_path: Path, monkeypatch, capsys, flags: list[str]
) -> None:
    path = tmp_path / "htpasswd"
    apache_htpasswd(path, *flags, user="carol", password="pass wörd")
    check = ["passwd", "--file", str(path), "check", "carol", "--password-stdin"]
    assert run(monkeypatch, capsys, *check, stdin="pass wörd\n".encode())[0] == 0
    assert run(monkeypatch, capsys, *check, stdin=b"pass word\n")[0] == 1


def test_check_exit_statuses(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "htpasswd"
    add(monkeypatch, capsys, path, "alice", "pw")
    check = ["passwd", "--file", str(path), "check"]
    status, _, err = run(monkeypatch, capsys, *check, "nobody", "--password-stdin", stdin=b"pw")
    assert (status, err) == (1, f"registry-proxy: {path}: no user 'nobody'\n")
    missing = tmp_path / "absent"
    status, _, err = run(
        monkeypatch,
        capsys,
        *["passwd", "--file", str(missing), "check", "alice", "--password-stdin"],
        stdin=b"pw",
    )
    assert status == 2
    assert f"{missing}: cannot read htpasswd file" in err


@pytest.mark.system
def test_check_refuses_a_file_the_proxy_would_refuse(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "htpasswd"
    add(monkeypatch, capsys, path, "alice", "pw")
    apache_htpasswd(path, "-p", user="plain", password="pw")
    check = ["passwd", "--file", str(path), "check", "alice", "--password-stdin"]
    status, _, err = run(monkeypatch, capsys, *check, stdin=b"pw")
    assert status == 2
    assert f"{path}:2: refused" in err


@pytest.mark.system
def test_prompt_asks_twice(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "htpasswd"
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    answers = iter(["typed", "typed"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert run(monkeypatch, capsys, "passwd", "--file", str(path), "add", "u", *FAST)[0] == 0
    assert apache_verifies(path, "u", "typed")

    answers = iter(["new", "typo"])
    status, _, err = run(monkeypatch, capsys, "passwd", "--file", str(path), "add", "u", *FAST)
    assert (status, err.splitlines()[-1]) == (2, "registry-proxy: passwords do not match")
    assert apache_verifies(path, "u", "typed")


@pytest.mark.system
def test_replacing_keeps_every_other_line_byte_for_byte(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    path = tmp_path / "htpasswd"
    apache_htpasswd(path, "-s", user="alice", password="a")
    apache_htpasswd(path, "-m", user="bob", password="b")
    apache_htpasswd(path, "-B", "-C", "4", user="carol", password="c")
    alice, bob, carol = path.read_bytes().splitlines()
    # CRLF, comments, blank lines and no final line break.
    original = (
        "# team ü users\r\n".encode()
        + alice
        + b"\r\n\n   \n"
        + bob
        + b"\r\n# bob above, carol below\n"
        + carol
    )
    path.write_bytes(original)

    assert add(monkeypatch, capsys, path, "bob", "new-b") == 0
    lines = path.read_bytes().splitlines(keepends=True)
    before = original.splitlines(keepends=True)
    assert len(lines) == len(before)
    changed = [i for i, (old, new) in enumerate(zip(before, lines, strict=True)) if old != new]
    assert changed == [4]
    assert lines[4].startswith(b"bob:$2y$04$") and lines[4].endswith(b"\r\n")
    assert apache_verifies(path, "bob", "new-b")

    status, out, _ = run(monkeypatch, capsys, "passwd", "--file", str(path), "list")
    assert (status, out) == (0, "alice\nbob\ncarol\n")

    assert add(monkeypatch, capsys, path, "dave", "d") == 0
    data = path.read_bytes()
    # The last line gets the line break it lacked, the new user comes after it.
    assert data.startswith(b"".join(lines[:-1]) + carol + b"\n" + b"dave:$2y$04$")
    assert data.endswith(b"\n")
    assert list(load_htpasswd(path)) == ["alice", "bob", "carol", "dave"]
    for user, password in {"alice": "a", "bob": "new-b", "carol": "c", "dave": "d"}.items():
        assert apache_verifies(path, user, password), user


def test_lines_that_are_not_utf8_are_kept(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "htpasswd"
    path.write_bytes(b"# \xff\n\xfe:{SHA}x\n")
    add(monkeypatch, capsys, path, "alice", "pw")
    assert path.read_bytes().startswith(b"# \xff\n\xfe:{SHA}x\nalice:$2y$04$")


def test_list_prints_users_in_file_order(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "htpasswd"
    path.write_text("# c:omment\nzed:{SHA}x\n\nadam:$apr1$x$y\n  eve:whatever\n")
    status, out, _ = run(monkeypatch, capsys, "passwd", "--file", str(path), "list")
    assert (status, out) == (0, "zed\nadam\neve\n")


@pytest.mark.system
def test_replace_goes_through_a_new_inode_and_keeps_the_mode(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    path = tmp_path / "htpasswd"
    add(monkeypatch, capsys, path, "alice", "one")
    path.chmod(0o600)
    inode = path.stat().st_ino
    add(monkeypatch, capsys, path, "alice", "two")
    assert path.stat().st_ino != inode
    assert (path.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["htpasswd"]
    assert apache_verifies(path, "alice", "two")


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_replace_keeps_owner_and_group(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "htpasswd"
    add(monkeypatch, capsys, path, "alice", "one")
    os.chown(path, 4321, 8765)
    add(monkeypatch, capsys, path, "alice", "two")
    assert (path.stat().st_uid, path.stat().st_gid) == (4321, 8765)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    path = tmp_path / "htpasswd"
    add(monkeypatch, capsys, path, "alice", "one")
    original = path.read_bytes()
    written: list[bytes] = []

    def failing_replace(source: str, target: object) -> None:
        written.append(Path(source).read_bytes())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    args = ["passwd", "--file", str(path), "add", "bob", "--password-stdin", *FAST]
    status, _, err = run(monkeypatch, capsys, *args, stdin=b"two")
    assert status == 2
    assert err.splitlines()[-1] == f"registry-proxy: {path}: cannot write: No space left on device"
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["htpasswd"]
    # The temporary file was complete before the rename was attempted.
    assert written[0].startswith(original) and b"\nbob:$2y$04$" in written[0]


@pytest.mark.system
def test_symlinked_file_is_edited_through_the_link(tmp_path: Path, monkeypatch, capsys) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "htpasswd"
    link.symlink_to(real / "htpasswd")
    add(monkeypatch, capsys, link, "alice", "pw")
    assert link.is_symlink()
    assert apache_verifies(real / "htpasswd", "alice", "pw")


@pytest.mark.system
def test_remove_keeps_the_rest(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "htpasswd"
    path.write_bytes(b"# users\n")
    for user in ("alice", "bob", "carol"):
        add(monkeypatch, capsys, path, user, user + "-pw")
    before = path.read_bytes().splitlines(keepends=True)
    status, _, err = run(monkeypatch, capsys, "passwd", "--file", str(path), "remove", "bob")
    assert (status, err) == (0, f"{path}: removed bob\n")
    assert path.read_bytes() == before[0] + before[1] + before[3]
    assert apache_verifies(path, "carol", "carol-pw")


def test_removing_an_unknown_user_changes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "htpasswd"
    add(monkeypatch, capsys, path, "alice", "pw")
    inode = path.stat().st_ino
    status, _, err = run(monkeypatch, capsys, "passwd", "--file", str(path), "remove", "bob")
    assert (status, err) == (1, f"registry-proxy: {path}: no user 'bob'\n")
    assert path.stat().st_ino == inode


def test_removing_the_last_user_leaves_a_file_the_proxy_refuses(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    path = tmp_path / "htpasswd"
    path.write_bytes(b"# keep me\n")
    add(monkeypatch, capsys, path, "alice", "pw")
    status, _, err = run(monkeypatch, capsys, "passwd", "--file", str(path), "remove", "alice")
    assert status == 0
    assert "no users left" in err
    assert path.read_bytes() == b"# keep me\n"
    with pytest.raises(HtpasswdError, match="no users defined"):
        load_htpasswd(path)
    # ...and adding one again brings it back.
    add(monkeypatch, capsys, path, "bob", "pw")
    assert list(load_htpasswd(path)) == ["bob"]


def test_duplicate_lines_collapse_into_the_first(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "htpasswd"
    path.write_text("alice:{SHA}one\nbob:{SHA}two\nalice:{SHA}three\n")
    add(monkeypatch, capsys, path, "alice", "pw")
    assert [line.split(":")[0] for line in path.read_text().splitlines()] == ["alice", "bob"]
    assert passwd.check_password(path, "alice", "pw")


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("", "user name is empty"),
        ("a:b", "contains ':'"),
        ("a\tb", "non-printable"),
        ("a\x1bb", "non-printable"),
        (" alice", "whitespace"),
        ("#alice", "comment"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
def test_refuses_unusable_user_names(
    tmp_path: Path, monkeypatch, capsys, user: str, message: str
) -> None:
    path = tmp_path / "htpasswd"
    args = ["passwd", "--file", str(path), "add", user, "--password-stdin"]
    status, _, err = run(monkeypatch, capsys, *args, stdin=b"pw\n")
    assert status == 2
    assert message in err
    assert not path.exists()


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"\n", "empty password"),
        (b"x" * 73, "longer than 72 bytes"),
        ("ü".encode() * 37, "longer than 72 bytes"),
        (b"a\x00b", "NUL"),
        (b"one\ntwo\n", "one line"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_refuses_unusable_passwords(
    tmp_path: Path, monkeypatch, capsys, stdin: bytes, message: str
) -> None:
    path = tmp_path / "htpasswd"
    args = ["passwd", "--file", str(path), "add", "alice", "--password-stdin", *FAST]
    status, _, err = run(monkeypatch, capsys, *args, stdin=stdin)
    assert status == 2
    assert message in err
    assert not path.exists()


@pytest.mark.system
def test_72_byte_password_and_crlf_on_stdin(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "htpasswd"
    password = "p" * 72
    args = ["passwd", "--file", str(path), "add", "alice", "--password-stdin", *FAST]
    assert run(monkeypatch, capsys, *args, stdin=password.encode() + b"\r\n")[0] == 0
    assert apache_verifies(path, "alice", password)


def test_cost_outside_the_htpasswd_range_is_a_usage_error(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["passwd", "--file", str(tmp_path / "h"), "add", "alice", "--cost", "3"])
    assert exited.value.code == 2


@pytest.mark.system
def test_file_from_the_environment(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "htpasswd"
    monkeypatch.setenv("PROXY_HTPASSWD", str(path))
    args = ["passwd", "add", "alice", "--password-stdin", *FAST]
    assert run(monkeypatch, capsys, *args, stdin=b"pw")[0] == 0
    assert apache_verifies(path, "alice", "pw")


def test_file_from_a_configuration_that_is_not_valid_yet(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    path = tmp_path / "htpasswd"
    config = tmp_path / "proxy.yml"
    # Only `htpasswd` is read: a key this version does not know yet is no obstacle.
    config.write_text(f"htpasswd: {path}\nsome_future_key: 1\nlisten: nonsense\n")
    args = ["passwd", "--config", str(config), "add", "alice", "--password-stdin", *FAST]
    assert run(monkeypatch, capsys, *args, stdin=b"pw")[0] == 0
    monkeypatch.setenv("PROXY_CONFIG", str(config))
    status, out, _ = run(monkeypatch, capsys, "passwd", "list")
    assert (status, out) == (0, "alice\n")


def test_file_option_wins_over_environment_and_configuration(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    config = tmp_path / "proxy.yml"
    config.write_text(f"htpasswd: {tmp_path / 'from-config'}\n")
    monkeypatch.setenv("PROXY_CONFIG", str(config))
    monkeypatch.setenv("PROXY_HTPASSWD", str(tmp_path / "from-env"))
    status, _, _ = run(
        monkeypatch,
        capsys,
        *["passwd", "add", "alice", "--password-stdin", *FAST],
        stdin=b"pw",
    )
    assert status == 0
    args = ["passwd", "add", "bob", "--file", str(tmp_path / "given"), "--password-stdin", *FAST]
    assert run(monkeypatch, capsys, *args, stdin=b"pw")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from-env", "given", "proxy.yml"]


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        (None, "no htpasswd file"),
        ("listen: 0.0.0.0:80\n", "no htpasswd file"),
        ("htpasswd: [a, b]\n", "htpasswd: expected a file path"),
        ("a: b\n  c: : d\n", "proxy.yml:2: invalid YAML"),
        ("- a\n", "expected a mapping of settings"),
    ],
)
def test_no_usable_path_is_an_error(
    tmp_path: Path, monkeypatch, capsys, config_text: str | None, message: str
) -> None:
    args = ["passwd"]
    if config_text is not None:
        config = tmp_path / "proxy.yml"
        config.write_text(config_text)
        args += ["--config", str(config)]
    status, _, err = run(monkeypatch, capsys, *args, "list")
    assert status == 2
    assert message in err


@pytest.mark.system
def test_console_script_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    command = [str(REGISTRY_PROXY), "passwd", "--file", str(path)]
    added = subprocess.run(
        [*command, "add", "alice", "--password-stdin", *FAST],
        input=b"from stdin\n",
        capture_output=True,
        env=env,
    )
    assert added.returncode == 0, added.stderr
    assert added.stdout == b""
    assert apache_verifies(path, "alice", "from stdin")
    apache_htpasswd(path, "-B", "-C", "4", user="bob", password="by apache")
    checked = subprocess.run(
        [*command, "check", "bob", "--password-stdin"],
        input=b"by apache\n",
        capture_output=True,
        env=env,
    )
    assert checked.returncode == 0, checked.stderr
    listed = subprocess.run([*command, "list"], capture_output=True, env=env, check=True)
    assert listed.stdout == b"alice\nbob\n"


@pytest.mark.parametrize(
    ("cost", "warned"), [("4", True), ("9", True), ("10", False), ("12", False)]
)
def test_cost_below_10_warns(tmp_path: Path, monkeypatch, capsys, cost: str, warned: bool) -> None:
    """Guards a silent `--cost 4` in production: docs/users.md says use 10 or more."""
    args = ["passwd", "--file", str(tmp_path / "h"), "add", "alice", "--password-stdin"]
    status, _, err = run(monkeypatch, capsys, *args, "--cost", cost, stdin=b"pw\n")
    assert status == 0
    assert (f"warning: bcrypt cost {cost} is below 10" in err) is warned
    assert load_htpasswd(tmp_path / "h")["alice"].startswith(f"$2y${int(cost):02d}$")


@pytest.mark.system
def test_without_a_terminal_the_password_comes_from_stdin_without_warnings(
    tmp_path: Path,
) -> None:
    """Guards getpass's GetPassWarning (and echo) when no terminal is attached, as in CI."""
    path = tmp_path / "htpasswd"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    command = [str(REGISTRY_PROXY), "passwd", "--file", str(path)]
    # A new session has no controlling terminal: getpass cannot open /dev/tty.
    for args, status in [(["add", "alice", *FAST], 0), (["check", "alice"], 0)]:
        result = subprocess.run(
            [*command, *args], input=b"piped pw\n", capture_output=True, env=env,
            start_new_session=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == status, result.stderr
        assert b"GetPassWarning" not in result.stderr
        assert b"Warning" not in result.stderr
    assert apache_verifies(path, "alice", "piped pw")
