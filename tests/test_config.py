"""Configuration: defaults, YAML, environment overrides, and errors that name what is wrong."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
import yaml

from proxy.config import SETTINGS, Address, ConfigError, env_name, load_config
from tests.support import Proxy, free_port, wait_until

# Some tests run check-config and serve.
pytestmark = pytest.mark.system


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


def test_htpasswd_is_required_and_the_message_says_what_to_set() -> None:
    """Guards against `default: htpasswd: expected a file path`, which names nothing to set."""
    with pytest.raises(ConfigError) as raised:
        load_config(None, {})
    message = str(raised.value)
    assert "default" not in message
    assert "PROXY_HTPASSWD" in message and "PROXY_CONFIG" in message


def test_htpasswd_missing_from_the_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "realm: r\n")
    with pytest.raises(ConfigError, match=f"add `htpasswd:` to {path} or set PROXY_HTPASSWD"):
        load_config(path, {})


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
        (
            "htpasswd: /h\n\nlsten: 1.2.3.4:80\n",
            r"proxy.yml:3: unknown key 'lsten'; did you mean 'listen'\?$",
        ),
        (
            "htpasswd: /h\ntls:\n  crt: /x\n",
            r"proxy.yml:3: unknown key 'tls.crt'; did you mean 'tls.cert'\?$",
        ),
        ("htpasswd: /h\nupstream: ftp://x\n", r"proxy.yml:2: upstream: expected an http"),
        ("htpasswd: /h\nupstream: http://u:p@x\n", r"upstream: expected no credentials"),
        ("htpasswd: /h\nread_timeout: -1\n", r"proxy.yml:2: read_timeout: expected a positive"),
        ("htpasswd: /h\nauth_workers: 0\n", r"proxy.yml:2: auth_workers: expected a whole"),
        ("htpasswd: /h\nrealm: 'a\"b'\n", r"proxy.yml:2: realm: expected printable"),
        ("htpasswd: /h\nhtpasswd: /g\n", r"proxy.yml:2: htpasswd: set more than once"),
        ("htpasswd: [/h]\n", r"proxy.yml:1: htpasswd: expected a single value"),
        ("- a\n- b\n", r"proxy.yml:1: the top level: expected a mapping"),
        ("htpasswd: /h\nrealm: [unclosed\n", r"proxy.yml:3: invalid YAML"),
        ("htpasswd: /h\ntls:\n  cert: /c\n", r"proxy.yml:3: tls.key: not set; expected both"),
        ("htpasswd: /h\ntls:\n  key: /k\n", r"proxy.yml:3: tls.cert: not set; expected both"),
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


@pytest.mark.parametrize(
    ("source", "name", "suggested"),
    [
        ("yaml", "upstrem", "'upstream'"),
        ("yaml", "readonly", "'read_only'"),
        ("env", "PROXY_UPSTRAM", "PROXY_UPSTREAM"),
        ("env", "PROXY_TLS_CRT", "PROXY_TLS_CERT"),
        ("env", "PROXY_AUTH_BLOK", "PROXY_AUTH_BLOCK"),
    ],
)
def test_unknown_key_suggests_the_nearest_known_one(
    tmp_path: Path, source: str, name: str, suggested: str
) -> None:
    """Guards against listing all known keys instead of the one the user probably meant."""
    if source == "yaml":
        path, environ = write(tmp_path, f"htpasswd: /h\n{name}: 1\n"), {}
    else:
        path, environ = None, {"PROXY_HTPASSWD": "/h", name: "1"}
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ)
    message = str(raised.value)
    assert message.endswith(f"did you mean {suggested}?")
    assert "connect_timeout" not in message.lower()


@pytest.mark.parametrize("environ", [{"PROXY_FROBNICATE": "1"}, {}])
def test_unknown_key_without_a_near_one_points_to_the_reference(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    path = None if environ else write(tmp_path, "htpasswd: /h\nfrobnicate: 1\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, {"PROXY_HTPASSWD": "/h", **environ})
    assert "did you mean" not in str(raised.value)
    assert "docs/configuration.md" in str(raised.value)
    assert "connect_timeout" not in str(raised.value)


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


# --- check-config refuses what serve refuses, with the same message and status.


def one_user_htpasswd(directory: Path) -> Path:
    path = directory / "htpasswd"
    subprocess.run(
        ["htpasswd", "-bcB", "-C", "4", str(path), "alice", "pw"], check=True, capture_output=True
    )
    return path


def parity_case(tmp_path: Path, case: str) -> tuple[dict[str, str], str]:
    """Environment for one bad configuration, and what the message must contain."""
    htpasswd = one_user_htpasswd(tmp_path)
    port = free_port()
    env = {"PROXY_HTPASSWD": str(htpasswd), "PROXY_LISTEN": f"127.0.0.1:{port}",
           "PROXY_ADMIN_LISTEN": f"127.0.0.1:{free_port()}"}  # fmt: skip
    if case == "tls files missing":
        env |= {"PROXY_TLS_CERT": str(tmp_path / "no-cert.pem"),
                "PROXY_TLS_KEY": str(tmp_path / "no-key.pem")}  # fmt: skip
        return env, "no-cert.pem"
    if case == "tls files do not load":
        (tmp_path / "cert.pem").write_text("not a certificate\n")
        (tmp_path / "key.pem").write_text("not a key\n")
        env |= {"PROXY_TLS_CERT": str(tmp_path / "cert.pem"),
                "PROXY_TLS_KEY": str(tmp_path / "key.pem")}  # fmt: skip
        return env, "environment PROXY_TLS_CERT: tls.cert/tls.key: cannot load"
    if case == "admin_listen equals listen":
        env["PROXY_ADMIN_LISTEN"] = env["PROXY_LISTEN"]
        return env, "environment PROXY_ADMIN_LISTEN: admin_listen:"
    if case == "admin_listen on the port of a wildcard listen":
        env |= {"PROXY_LISTEN": f"0.0.0.0:{port}", "PROXY_ADMIN_LISTEN": f"127.0.0.1:{port}"}
        return env, "same port as listen 0.0.0.0"
    if case == "listen on the default admin_listen":
        env["PROXY_LISTEN"] = "127.0.0.1:8081"
        del env["PROXY_ADMIN_LISTEN"]
        return env, "environment PROXY_LISTEN: admin_listen: 127.0.0.1:8081 is the same port"
    if case == "htpasswd missing, from the environment":
        env["PROXY_HTPASSWD"] = str(tmp_path / "gone")
        return env, f"environment PROXY_HTPASSWD: htpasswd: {tmp_path / 'gone'}: cannot read"
    if case == "htpasswd missing, from the file":
        del env["PROXY_HTPASSWD"]
        config = write(tmp_path, f"realm: r\nhtpasswd: {tmp_path / 'gone'}\n")
        env["PROXY_CONFIG"] = str(config)
        return env, f"proxy.yml:2: htpasswd: {tmp_path / 'gone'}: cannot read"
    if case == "ui without a session key":
        env["PROXY_UI"] = "true"
        return env, "environment PROXY_UI: ui_session_key_file: not set"
    if case == "ui session key too short":
        (tmp_path / "ui.key").write_text("short\n")
        env |= {"PROXY_UI": "true", "PROXY_UI_SESSION_KEY_FILE": str(tmp_path / "ui.key")}
        return env, "PROXY_UI_SESSION_KEY_FILE: ui_session_key_file: "
    if case == "ui session key unreadable":
        env |= {"PROXY_UI": "true", "PROXY_UI_SESSION_KEY_FILE": str(tmp_path / "no.key")}
        return env, "no.key: No such file or directory"
    assert case == "no htpasswd at all"
    del env["PROXY_HTPASSWD"]
    return env, "set the environment variable PROXY_HTPASSWD"


@pytest.mark.parametrize(
    "case",
    [
        "tls files missing",
        "tls files do not load",
        "admin_listen equals listen",
        "admin_listen on the port of a wildcard listen",
        "listen on the default admin_listen",
        "htpasswd missing, from the environment",
        "htpasswd missing, from the file",
        "ui without a session key",
        "ui session key too short",
        "ui session key unreadable",
        "no htpasswd at all",
    ],
)
def test_check_config_fails_where_serve_fails(tmp_path: Path, case: str) -> None:
    """Guards check-config passing (rc 0) configurations serve refuses, or a different status."""
    env, expected = parity_case(tmp_path, case)
    checked = run_cli("check-config", env=env)
    served = run_cli("serve", env=env)
    assert (checked.returncode, served.returncode) == (2, 2), (checked.stderr, served.stderr)
    assert checked.stderr == served.stderr
    assert checked.stderr.count("\n") == 1
    assert checked.stderr.startswith("registry-proxy: ")
    assert expected in checked.stderr


def warnings_of(output: str) -> list[str]:
    """The messages of WARNING log lines, without their timestamps."""
    return [line.split("WARNING ", 1)[1] for line in output.splitlines() if " WARNING " in line]


def test_unknown_users_in_rules_warn_in_check_config_and_serve(
    tmp_path: Path, start_proxy: Callable[..., Proxy]
) -> None:
    """Guards check-config saying nothing about rules that name users the htpasswd file lacks."""
    htpasswd = one_user_htpasswd(tmp_path)
    rules = "[{users: [alice, mallory], repositories: ['**'], actions: [pull]}]"
    checked = run_cli("check-config", env={"PROXY_HTPASSWD": str(htpasswd), "PROXY_ACCESS": rules})
    assert checked.returncode == 0, checked.stderr
    expected = (
        "registry_proxy: environment PROXY_ACCESS: "
        "access rules name users not in the htpasswd file: mallory"
    )
    assert expected in warnings_of(checked.stderr)

    # Nothing listens upstream: the warning is about the configuration, not the registry.
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}", htpasswd=htpasswd, PROXY_ACCESS=rules)
    wait_until(lambda: expected in warnings_of(proxy.log()), "serve's warning")


def test_check_config_prints_rules_from_the_environment(htpasswd_file: Path) -> None:
    """Guards `access: rules (see the file)` printed when the rules came from PROXY_ACCESS."""
    rules = "[{users: ['@ci'], repositories: ['ci/**'], actions: [pull, push]}]"
    result = run_cli(
        "check-config",
        env={"PROXY_HTPASSWD": str(htpasswd_file), "PROXY_ACCESS": rules,
             "PROXY_GROUPS": "{ci: [alice]}"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["groups"] == {"ci": ["alice"]}
    assert printed["access"] == [
        {"users": ["@ci"], "repositories": ["ci/**"], "actions": ["pull", "push"]}
    ]


def test_one_user_is_not_users(tmp_path: Path, start_proxy: Callable[..., Proxy]) -> None:
    """Guards `1 users` in check-config's summary and serve's first line."""
    htpasswd = one_user_htpasswd(tmp_path)
    result = run_cli("check-config", env={"PROXY_HTPASSWD": str(htpasswd)})
    assert f"# configuration valid; 1 user in {htpasswd}\n" in result.stdout
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}", htpasswd=htpasswd)
    wait_until(lambda: f"serving http://{proxy.host} for 1 user," in proxy.log(), "the start line")


@pytest.mark.parametrize(
    ("extra", "warned"),
    [
        ({"PROXY_LISTEN": "0.0.0.0:8080"}, True),
        ({"PROXY_LISTEN": "192.0.2.10:8080"}, True),
        ({"PROXY_LISTEN": "127.0.0.1:8080"}, False),
        ({"PROXY_LISTEN": "[::1]:8080"}, False),
        ({"PROXY_LISTEN": "0.0.0.0:8080", "PROXY_TRUSTED_PROXIES": "10.0.0.1"}, False),
        ({"PROXY_LISTEN": "0.0.0.0:8080", "tls": "yes"}, False),
    ],
)
def test_cleartext_public_listener_warns(
    tmp_path: Path, htpasswd_file: Path, extra: dict[str, str], warned: bool
) -> None:
    """Guards a silent start where Basic credentials would cross the network unencrypted."""
    env = {"PROXY_HTPASSWD": str(htpasswd_file), **extra}
    if env.pop("tls", None):
        cert = trustme.CA().issue_cert("localhost")
        cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
        env |= {"PROXY_TLS_CERT": str(tmp_path / "cert.pem"),
                "PROXY_TLS_KEY": str(tmp_path / "key.pem")}  # fmt: skip
    result = run_cli("check-config", env=env)
    assert result.returncode == 0, result.stderr
    cleartext = [w for w in warnings_of(result.stderr) if "in clear" in w]
    assert bool(cleartext) is warned, result.stderr


@pytest.mark.parametrize("key", ["listen", "admin_listen"])
def test_port_in_use_exits_1_with_one_line_naming_it(htpasswd_file: Path, key: str) -> None:
    """Guards `cannot listen: ...` that did not say which address (or which setting) failed."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        addresses = {
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
        }
        addresses[key] = busy
        result = run_cli(
            "serve",
            env={"PROXY_HTPASSWD": str(htpasswd_file), "PROXY_LISTEN": addresses["listen"],
                 "PROXY_ADMIN_LISTEN": addresses["admin_listen"]},
        )  # fmt: skip
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert lines == [f"registry-proxy: cannot listen on {busy} ({key}): Address already in use"]
