"""The `registry-proxy` command: `serve`, `check-config`, `passwd`, `token` and `doctor`."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import getpass
import json
import os
import sys
import time
from pathlib import Path

import yaml

from proxy import __version__, doctor
from proxy.auth.htpasswd_file import HtpasswdError, load_htpasswd
from proxy.auth.passwd import (
    DEFAULT_COST,
    MAX_COST,
    MIN_COST,
    PasswdError,
    UnknownUserError,
    check_password,
    check_user_name,
    list_users,
    remove_user,
    set_password,
)
from proxy.auth.tokens_file import (
    DEFAULT_MAX_LIFETIME,
    Token,
    TokensError,
    check_name,
    check_scope,
    load_tokens,
    new_secret,
    parse_expiry,
    write_tokens,
)
from proxy.config import CONFIG_ENV, ConfigError, describe, load_config, parse_duration
from proxy.doctor import DEFAULT_REGISTRY_PORT, DEFAULT_REPOSITORY, UsageError, parse_target
from proxy.log import count, setup_logging
from proxy.preflight import check_startable, startup_warnings

# Exit status for configuration that cannot be used (the process never starts serving).
EXIT_CONFIG = 2
# A valid configuration the machine refused: a port in use, no permission to bind it.
EXIT_LISTEN = 1
# `passwd check`: wrong password; `passwd check` and `passwd remove`: no such user.
EXIT_NO_MATCH = 1
HTPASSWD_ENV = "PROXY_HTPASSWD"
TOKENS_ENV = "PROXY_TOKENS"
MAX_LIFETIME_ENV = "PROXY_TOKEN_MAX_LIFETIME"
# docs/users.md: use at least this bcrypt cost; lower ones are for tests.
RECOMMENDED_COST = 10


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"YAML configuration file (default: ${CONFIG_ENV}, else built-in defaults)",
    )
    parser = argparse.ArgumentParser(
        prog="registry-proxy",
        description="Authenticating, streaming reverse proxy for a Docker/OCI registry.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", parents=[common], help="run the proxy")
    check = commands.add_parser(
        "check-config",
        parents=[common],
        help="validate the configuration and htpasswd file, print the effective settings",
    )
    check.add_argument(
        "--no-connect",
        action="store_true",
        help="do not bind to the LDAP directory (ldap.url); validate everything else",
    )
    _add_passwd_parser(commands, common)
    _add_token_parser(commands, common)
    _add_doctor_parser(commands)
    return parser


def _file_option(key: str, env: str) -> argparse.ArgumentParser:
    """`--file`, found as `passwd` and `token` find theirs: the option, `env`, then `key`."""
    file = argparse.ArgumentParser(add_help=False)
    file.add_argument(
        "--file",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"{key} file (default: ${env}, else `{key}` in the configuration)",
    )
    return file


def _add_passwd_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    file = _file_option("htpasswd", HTPASSWD_ENV)
    stdin = argparse.ArgumentParser(add_help=False)
    stdin.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin instead of prompting",
    )
    parents = [common, file]
    passwd = commands.add_parser(
        "passwd", parents=parents, help="manage users in the htpasswd file"
    )
    actions = passwd.add_subparsers(dest="passwd_command", required=True, metavar="ACTION")
    add = actions.add_parser(
        "add", parents=[*parents, stdin], help="add a user, or change an existing user's password"
    )
    add.add_argument("user")
    add.add_argument(
        "--cost",
        type=int,
        choices=range(MIN_COST, MAX_COST + 1),
        metavar="N",
        default=DEFAULT_COST,
        help=f"bcrypt cost, {MIN_COST} to {MAX_COST} (default: {DEFAULT_COST})",
    )
    remove = actions.add_parser("remove", parents=parents, help="remove a user")
    remove.add_argument("user")
    actions.add_parser("list", parents=parents, help="print the user names, one per line")
    check = actions.add_parser(
        "check",
        parents=[*parents, stdin],
        help="exit 0 if the password is the user's, 1 if not (2 on errors)",
    )
    check.add_argument("user")


def _add_token_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    file = _file_option("tokens", TOKENS_ENV)
    parents = [common, file]
    token = commands.add_parser(
        "token", parents=parents, help="manage access tokens (CI robots, personal tokens)"
    )
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        parents=parents,
        help="make a token; its secret is printed once, alone on the last line of stdout",
    )
    create.add_argument("name")
    create.add_argument("--owner", required=True, metavar="USER", help="the htpasswd user")
    create.add_argument(
        "--repositories", required=True, nargs="+", metavar="GLOB", help="repository globs"
    )
    create.add_argument(
        "--actions", required=True, metavar="LIST", help="pull[,push,delete,catalog]"
    )
    create.add_argument(
        "--expires",
        required=True,
        metavar="WHEN",
        help="90d, 12h, 30m, or an ISO 8601 date (at most token_max_lifetime away)",
    )
    create.add_argument("--networks", nargs="+", default=[], metavar="CIDR")
    listing = actions.add_parser("list", parents=parents, help="print the tokens")
    listing.add_argument("--json", action="store_true", help="a JSON list, for scripts")
    revoke = actions.add_parser("revoke", parents=parents, help="revoke a token (kept, marked)")
    revoke.add_argument("name")


def _add_doctor_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="probe a running deployment from outside; exit 0 if every check passes, 1 if not",
    )
    doctor.add_argument(
        "url", metavar="URL", help="the public URL, e.g. https://registry.example.com"
    )
    doctor.add_argument(
        "--ca-file",
        metavar="PEM",
        type=Path,
        help="trust only this CA for the certificate (default: the system's trust store)",
    )
    doctor.add_argument(
        "--registry-port",
        metavar="N",
        type=_port,
        default=DEFAULT_REGISTRY_PORT,
        help="the registry's own port on the same host, which must be closed "
        f"(default: {DEFAULT_REGISTRY_PORT})",
    )
    doctor.add_argument(
        "--user",
        metavar="NAME",
        help="log in as NAME to start (and cancel) an upload; without it that check is skipped",
    )
    doctor.add_argument(
        "--password-stdin",
        action="store_true",
        help="read --user's password from the first line of stdin instead of prompting",
    )
    doctor.add_argument(
        "--repository",
        metavar="NAME",
        default=DEFAULT_REPOSITORY,
        help=f"where the upload check starts its upload (default: {DEFAULT_REPOSITORY})",
    )
    doctor.add_argument("--json", action="store_true", help="print the results as JSON")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port, 1 to 65535, got {text!r}")
    return port


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and `python -m proxy`."""
    args = _parser().parse_args(argv)
    config_path = getattr(args, "config", None) or os.environ.get(CONFIG_ENV) or None
    if args.command == "passwd":
        return _passwd(args, config_path)
    if args.command == "token":
        return _token(args, config_path)
    if args.command == "doctor":
        return _doctor(args)
    path = Path(config_path) if config_path else None
    try:
        config = load_config(path)
        # Everything serve refuses before listening; check-config refuses the same.
        connect = not getattr(args, "no_connect", False)
        strict = args.command == "check-config"
        users = check_startable(config, path, connect=connect, strict=strict)
    except (ConfigError, HtpasswdError) as exc:
        print(f"registry-proxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level, config.log_format)
    startup_warnings(config, users, path)

    if args.command == "check-config":
        sys.stdout.write(yaml.safe_dump(describe(config), sort_keys=False))
        print(f"# configuration valid; {count(len(users), 'user')} in {config.htpasswd}")
        if config.tokens is not None:
            tokens = load_tokens(config.tokens)
            print(f"# {count(len(tokens), 'token')} in {config.tokens}")
        return 0

    from proxy.server import ListenError, run

    try:
        if config.workers > 1:
            from proxy.workers import supervise

            return supervise(config, path)
        run(config, users, path)
    except ConfigError as exc:
        print(f"registry-proxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ListenError as exc:
        print(f"registry-proxy: {exc}", file=sys.stderr)
        return EXIT_LISTEN
    except OSError as exc:
        print(f"registry-proxy: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_LISTEN
    return 0


def _passwd(args: argparse.Namespace, config_path: str | None) -> int:
    """`passwd ACTION`: works without a valid configuration, e.g. to create the first user."""
    try:
        path = _htpasswd_path(getattr(args, "file", None), config_path)
        if args.passwd_command == "list":
            for user in list_users(path):
                print(user)
        elif args.passwd_command == "add":
            check_user_name(args.user)
            if args.cost < RECOMMENDED_COST:
                print(
                    f"registry-proxy: warning: bcrypt cost {args.cost} is below "
                    f"{RECOMMENDED_COST}; each step down halves the work of cracking a stolen file",
                    file=sys.stderr,
                )
            password = _read_password(args.password_stdin, confirm=True)
            replaced = set_password(path, args.user, password, cost=args.cost)
            print(f"{path}: {'updated' if replaced else 'added'} {args.user}", file=sys.stderr)
        elif args.passwd_command == "remove":
            left = remove_user(path, args.user)
            print(f"{path}: removed {args.user}", file=sys.stderr)
            if not left:
                print(
                    f"registry-proxy: warning: {path} has no users left; the proxy refuses it",
                    file=sys.stderr,
                )
        else:
            password = _read_password(args.password_stdin, confirm=False)
            if not check_password(path, args.user, password):
                print(f"{path}: wrong password for {args.user}", file=sys.stderr)
                return EXIT_NO_MATCH
            print(f"{path}: password correct for {args.user}", file=sys.stderr)
    except UnknownUserError as exc:
        print(f"registry-proxy: {exc}", file=sys.stderr)
        return EXIT_NO_MATCH
    except (PasswdError, HtpasswdError) as exc:
        print(f"registry-proxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _token(args: argparse.Namespace, config_path: str | None) -> int:
    """`token ACTION`: works without a valid configuration, like `passwd`."""
    try:
        path = _file_path(getattr(args, "file", None), TOKENS_ENV, "tokens", config_path)
        tokens = load_tokens(path)
        now = time.time()
        if args.token_command == "list":
            _print_tokens(tokens, now, as_json=args.json)
        elif args.token_command == "revoke":
            token = tokens.get(args.name)
            if token is None:
                print(f"registry-proxy: {path}: no token {args.name!r}", file=sys.stderr)
                return EXIT_NO_MATCH
            if token.revoked is None:
                tokens[args.name] = dataclasses.replace(token, revoked=now)
                write_tokens(path, tokens)
            print(f"{path}: revoked {args.name}", file=sys.stderr)
        else:
            token, secret = _new_token(args, tokens, now, config_path)
            tokens[token.name] = token
            write_tokens(path, tokens)
            print(f"{path}: created {token.name}, expires {_when(token.expires)}", file=sys.stderr)
            print(secret)
    except (PasswdError, TokensError, HtpasswdError) as exc:
        print(f"registry-proxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _new_token(
    args: argparse.Namespace, tokens: dict[str, Token], now: float, config_path: str | None
) -> tuple[Token, str]:
    check_name(args.name)
    if args.name in tokens:
        raise TokensError(f"token {args.name!r} exists (revoked ones stay); choose another name")
    actions = tuple(a.strip() for a in args.actions.split(",") if a.strip())
    check_scope(args.repositories, actions, args.networks)
    try:
        expires = parse_expiry(args.expires, now)
    except ValueError as exc:
        raise TokensError(f"--expires: {exc}") from None
    cap = _max_lifetime(config_path)
    if expires <= now:
        raise TokensError(f"--expires: {args.expires} is in the past")
    if expires - now > cap:
        raise TokensError(
            f"--expires: {args.expires} is more than token_max_lifetime "
            f"({cap / 86400:g} days) away; tokens must expire"
        )
    _check_owner_and_name(args.owner, args.name, config_path)
    secret, digest = new_secret()
    token = Token(
        args.name, args.owner, tuple(args.repositories), actions, tuple(args.networks), now,
        expires, digest,
    )  # fmt: skip
    return token, secret


def _check_owner_and_name(owner: str, name: str, config_path: str | None) -> None:
    """With a known htpasswd file: the owner must be a user, and the name must not be one."""
    try:
        htpasswd = _file_path(None, HTPASSWD_ENV, "htpasswd", config_path)
    except PasswdError:
        return
    users = load_htpasswd(htpasswd)
    if name in users:
        raise TokensError(f"{name}: already a user in {htpasswd}; a token needs a name of its own")
    if owner not in users:
        raise TokensError(f"--owner: {owner!r} is not a user in {htpasswd}")


def _max_lifetime(config_path: str | None) -> float:
    given = os.environ.get(MAX_LIFETIME_ENV)
    if not given and config_path:
        value = _configured_value(Path(config_path), "token_max_lifetime")
        given = None if value is None else str(value)
    if not given:
        return DEFAULT_MAX_LIFETIME
    try:
        return float(given)
    except ValueError:
        pass
    try:
        return parse_duration(given)
    except ValueError as exc:
        raise TokensError(f"token_max_lifetime: {exc}") from None


def _when(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(token: Token, now: float) -> str:
    if token.revoked is not None:
        return "revoked"
    return "expired" if token.expired(now) else "active"


def _print_tokens(tokens: dict[str, Token], now: float, *, as_json: bool) -> None:
    if as_json:
        entries = []
        for token in tokens.values():
            entry = token.as_json()
            del entry["sha256"]
            entry["expired"] = token.expired(now)
            entry["status"] = _status(token, now)
            entries.append(entry)
        print(json.dumps(entries, indent=2))
        return
    rows = [("NAME", "OWNER", "SCOPE", "CREATED", "EXPIRES", "STATUS")]
    for token in tokens.values():
        scope = f"{','.join(token.actions)} on {' '.join(token.repositories)}"
        if token.networks:
            scope += f" from {' '.join(token.networks)}"
        rows.append(
            (token.name, token.owner, scope, _when(token.created), _when(token.expires),
             _status(token, now))
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def _doctor(args: argparse.Namespace) -> int:
    """`doctor URL`: needs no configuration; 2 for a command line it cannot probe."""
    try:
        if args.password_stdin and args.user is None:
            raise UsageError("--password-stdin needs --user")
        password = None
        if args.user is not None:
            password = _read_password(args.password_stdin, confirm=False)
            if not password:
                raise UsageError("no password given")
        target = parse_target(
            args.url,
            ca_file=args.ca_file,
            registry_port=args.registry_port,
            user=args.user,
            password=password,
            repository=args.repository,
        )
    except (UsageError, PasswdError) as exc:
        print(f"registry-proxy: doctor: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    results = doctor.run(target)
    render = doctor.render_json if args.json else doctor.render_text
    sys.stdout.write(render(target, results))
    return doctor.exit_status(results)


def _htpasswd_path(given: str | None, config_path: str | None) -> Path:
    """--file, else $PROXY_HTPASSWD, else the configuration file's `htpasswd` key."""
    return _file_path(given, HTPASSWD_ENV, "htpasswd", config_path)


def _file_path(given: str | None, env: str, key: str, config_path: str | None) -> Path:
    """--file, else the environment variable, else the configuration file's key."""
    for candidate in (given, os.environ.get(env)):
        if candidate and candidate.strip():
            return Path(candidate.strip())
    if config_path:
        value = _configured_value(Path(config_path), key)
        if value is not None and not (isinstance(value, str) and not value.strip()):
            if not isinstance(value, str):
                raise PasswdError(f"{config_path}: {key}: expected a file path, got {value!r}")
            return Path(value.strip())
    raise PasswdError(
        f"no {key} file: use --file PATH, set {env}, or give a configuration "
        f"(--config or ${CONFIG_ENV}) with a `{key}` key"
    )


def _configured_value(config_path: Path, key: str) -> object:
    """Only `key`: the rest of the configuration need not be valid yet."""
    try:
        root = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise PasswdError(f"{config_path}: cannot read configuration file: {reason}") from None
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 0
        raise PasswdError(f"{config_path}:{line}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise PasswdError(f"{config_path}: invalid YAML: {exc}") from None
    if root is None:
        return None
    if not isinstance(root, dict):
        raise PasswdError(f"{config_path}: expected a mapping of settings")
    return root.get(key)


def _read_password(from_stdin: bool, *, confirm: bool) -> str:
    # Without a terminal there is no one to prompt (getpass would warn and echo): read stdin.
    if from_stdin or not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise PasswdError("stdin: password is not UTF-8") from None
        # Like `docker login --password-stdin`: one trailing line break is not part of it.
        text = text.removesuffix("\n").removesuffix("\r")
        if "\n" in text or "\r" in text:
            raise PasswdError("stdin: expected the password on one line")
        return text
    try:
        password = getpass.getpass("New password: " if confirm else "Password: ")
        if confirm and getpass.getpass("Re-type new password: ") != password:
            raise PasswdError("passwords do not match")
    except EOFError:
        raise PasswdError("no password given") from None
    return password
