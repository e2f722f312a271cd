"""The `registry-proxy` command: `serve`, `check-config`, `passwd` and `doctor`."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

import yaml

from proxy import __version__, doctor
from proxy.auth.htpasswd_file import HtpasswdError
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
from proxy.config import CONFIG_ENV, ConfigError, describe, load_config
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
# README: use at least this bcrypt cost; lower ones are for tests.
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
    _add_doctor_parser(commands)
    return parser


def _add_passwd_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    file = argparse.ArgumentParser(add_help=False)
    file.add_argument(
        "--file",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"htpasswd file (default: ${HTPASSWD_ENV}, else `htpasswd` in the configuration)",
    )
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
    setup_logging(config.log_level)
    startup_warnings(config, users)

    if args.command == "check-config":
        sys.stdout.write(yaml.safe_dump(describe(config), sort_keys=False))
        print(f"# configuration valid; {count(len(users), 'user')} in {config.htpasswd}")
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
    for candidate in (given, os.environ.get(HTPASSWD_ENV)):
        if candidate and candidate.strip():
            return Path(candidate.strip())
    if config_path:
        configured = _configured_htpasswd(Path(config_path))
        if configured is not None:
            return configured
    raise PasswdError(
        f"no htpasswd file: use --file PATH, set {HTPASSWD_ENV}, or give a configuration "
        f"(--config or ${CONFIG_ENV}) with an `htpasswd` key"
    )


def _configured_htpasswd(config_path: Path) -> Path | None:
    """Only the `htpasswd` key: the rest of the configuration need not be valid yet."""
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
    value = root.get("htpasswd")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise PasswdError(f"{config_path}: htpasswd: expected a file path, got {value!r}")
    return Path(value.strip())


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
