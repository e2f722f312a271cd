"""Configuration: defaults, YAML, environment overrides, and errors that name what is wrong."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import SETTINGS, Address, ConfigError, env_name, load_config
from tests.support import free_port


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proxy.yml"
    path.write_text(text)
    return path


def test_defaults_need_only_the_htpasswd_path() -> None:
    config = load_config(None, {"PROXY_HTPASSWD": "/etc/htpasswd"})
    assert config.listen == Address("0.0.0.0", 8080)
    assert str(config.upstream) == "http://127.0.0.1:5000"
    assert config.realm == "Registry"
    assert config.htpasswd == Path("/etc/htpasswd")
    assert not config.tls.enabled


def test_htpasswd_is_required() -> None:
    with pytest.raises(ConfigError, match="htpasswd: expected a file path"):
        load_config(None, {})


def test_yaml_values_and_nested_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "listen: '[::1]:9443'\nupstream: https://registry:5000/\nhtpasswd: /run/secrets/h\n"
        "realm: ACME registry\nadmin_listen: ''\ntls:\n  cert: /c.pem\n  key: /k.pem\n",
    )
    config = load_config(path, {})
    assert config.listen == Address("::1", 9443)
    assert str(config.listen) == "[::1]:9443"
    assert str(config.upstream) == "https://registry:5000"
    assert config.admin_listen is None
    assert config.tls.cert == Path("/c.pem") and config.tls.key == Path("/k.pem")


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "htpasswd: /from/file\nrealm: file\n")
    config = load_config(path, {"PROXY_REALM": "env", "PROXY_READ_TIMEOUT": "12.5"})
    assert config.realm == "env"
    assert config.read_timeout == 12.5
    assert config.htpasswd == Path("/from/file")


def test_every_setting_has_an_environment_name() -> None:
    assert env_name("tls.cert") == "PROXY_TLS_CERT"
    assert env_name("admin_listen") == "PROXY_ADMIN_LISTEN"
    assert len({env_name(key) for key in SETTINGS}) == len(SETTINGS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("htpasswd: /h\nlisten: nowhere\n", r"proxy.yml:2: listen: expected host:port"),
        ("htpasswd: /h\n\nlsten: 1.2.3.4:80\n", r"proxy.yml:3: unknown key 'lsten'"),
        ("htpasswd: /h\ntls:\n  crt: /x\n", r"proxy.yml:3: unknown key 'tls.crt'"),
        ("htpasswd: /h\nupstream: ftp://x\n", r"proxy.yml:2: upstream: expected an http"),
        ("htpasswd: /h\nupstream: http://u:p@x\n", r"upstream: expected no credentials"),
        ("htpasswd: /h\nread_timeout: -1\n", r"proxy.yml:2: read_timeout: expected a positive"),
        ("htpasswd: /h\nauth_workers: 0\n", r"proxy.yml:2: auth_workers: expected a whole"),
        ("htpasswd: /h\nrealm: 'a\"b'\n", r"proxy.yml:2: realm: expected printable"),
        ("htpasswd: /h\nhtpasswd: /g\n", r"proxy.yml:2: htpasswd: set more than once"),
        ("htpasswd: [/h]\n", r"proxy.yml:1: htpasswd: expected a single value"),
        ("- a\n- b\n", r"proxy.yml:1: the top level: expected a mapping"),
        ("htpasswd: /h\nrealm: [unclosed\n", r"proxy.yml:3: invalid YAML"),
        ("htpasswd: /h\ntls:\n  cert: /c\n", r"tls.key: expected both"),
    ],
)
def test_bad_files_name_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text), {})


def test_bad_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment PROXY_LISTEN: listen: expected host:port"):
        load_config(None, {"PROXY_HTPASSWD": "/h", "PROXY_LISTEN": "8080"})
    with pytest.raises(ConfigError, match="environment PROXY_LISTN: unknown setting"):
        load_config(None, {"PROXY_HTPASSWD": "/h", "PROXY_LISTN": "1.2.3.4:1"})


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing.yml: cannot read configuration file"):
        load_config(tmp_path / "missing.yml", {})


def test_shipped_example_config_is_valid_and_documents_every_key() -> None:
    """Guards: every setting has its own line in config/proxy.yml (set, or commented out);
    `listen:` inside `admin_listen:` does not count."""
    example = Path(__file__).parent.parent / "config" / "proxy.yml"
    text = example.read_text()
    for key in SETTINGS:
        leaf = key.rpartition(".")[2]
        line = rf"^[ \t]*(#[ \t]*)?{re.escape(leaf)}:"
        assert re.search(line, text, re.MULTILINE), f"config/proxy.yml does not document {key}"
    config = load_config(example, {})
    assert config.listen == Address("0.0.0.0", 8080)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_config_prints_effective_settings(htpasswd_file: Path) -> None:
    result = run_cli("check-config", env={"PROXY_HTPASSWD": str(htpasswd_file)})
    assert result.returncode == 0, result.stderr
    assert "listen: 0.0.0.0:8080" in result.stdout
    assert f"htpasswd: {htpasswd_file}" in result.stdout
    assert "3 users" in result.stdout


def test_check_config_fails_with_exit_2_and_one_line(tmp_path: Path) -> None:
    config = write(tmp_path, f"htpasswd: {tmp_path / 'nope'}\n")
    result = run_cli("check-config", "--config", str(config), env={})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "nope: cannot read htpasswd file" in result.stderr


def test_serve_refuses_the_pure_python_http_parser(htpasswd_file: Path) -> None:
    """Guards: with AIOHTTP_NO_EXTENSIONS aiohttp parses with its pure-Python parser (it had
    smuggling bugs the C one had not); `serve` must exit 2 with one line instead of listening."""
    env = {
        "PROXY_HTPASSWD": str(htpasswd_file),
        "PROXY_LISTEN": f"127.0.0.1:{free_port()}",
        "PROXY_ADMIN_LISTEN": "",
        "AIOHTTP_NO_EXTENSIONS": "1",
    }
    result = run_cli("serve", env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert "C HTTP parser is not in use" in result.stderr


def test_serve_refuses_bad_config_with_exit_2(tmp_path: Path) -> None:
    config = write(tmp_path, "htpasswd: /h\nbogus: 1\n")
    result = run_cli("serve", env={"PROXY_CONFIG": str(config)})
    assert result.returncode == 2
    assert "proxy.yml:2: unknown key 'bogus'" in result.stderr


def test_structured_settings_from_yaml_and_environment(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "htpasswd: /h\ntrusted_proxies: [10.0.0.0/8, 192.0.2.1]\nread_only: yes\n"
        "groups: {ci: [ci-bot]}\n"
        "access:\n  - {users: ['@ci'], repositories: ['**'], actions: [pull]}\n",
    )
    config = load_config(path, {"PROXY_AUTH_BLOCK": "60"})
    assert [str(n) for n in config.trusted_proxies] == ["10.0.0.0/8", "192.0.2.1/32"]
    assert config.read_only is True
    assert config.auth_block == 60
    assert not config.access.unrestricted
    from_env = load_config(None, {"PROXY_HTPASSWD": "/h", "PROXY_TRUSTED_PROXIES": "10.0.0.1, ::1"})
    assert [str(n) for n in from_env.trusted_proxies] == ["10.0.0.1/32", "::1/128"]
    assert from_env.access.unrestricted


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("htpasswd: /h\naccess:\n  - {users: [a], repositories: ['*'], actions: [pul]}\n",
         r"proxy.yml:2: access\[0\].actions: unknown action 'pul'"),
        ("htpasswd: /h\nread_only: maybe\n", r"proxy.yml:2: read_only: expected true or false"),
        ("htpasswd: /h\ntrusted_proxies: [not-an-ip]\n",
         r"proxy.yml:2: trusted_proxies: expected an address"),
        ("htpasswd: /h\naccess_log: xml\n",
         r"proxy.yml:2: access_log: expected one of json, text, off"),
    ],
)  # fmt: skip
def test_bad_structured_settings_name_line_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text), {})
