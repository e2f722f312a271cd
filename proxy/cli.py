"""The `registry-proxy` command: `serve` and `check-config`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from proxy import __version__
from proxy.config import CONFIG_ENV, ConfigError, describe, load_config
from proxy.htpasswd import HtpasswdError, load_htpasswd
from proxy.log import setup_logging

# Exit status for configuration that cannot be used (the process never starts serving).
EXIT_CONFIG = 2


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
    commands.add_parser(
        "check-config",
        parents=[common],
        help="validate the configuration and htpasswd file, print the effective settings",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and `python -m proxy`."""
    args = _parser().parse_args(argv)
    config_path = getattr(args, "config", None) or os.environ.get(CONFIG_ENV) or None
    try:
        config = load_config(Path(config_path) if config_path else None)
        users = load_htpasswd(config.htpasswd)
    except (ConfigError, HtpasswdError) as exc:
        print(f"registry-proxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    if args.command == "check-config":
        sys.stdout.write(yaml.safe_dump(describe(config), sort_keys=False))
        print(f"# configuration valid; {len(users)} users in {config.htpasswd}")
        return 0

    from proxy.server import run

    setup_logging(config.log_level)
    try:
        run(config, users)
    except ConfigError as exc:
        print(f"registry-proxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"registry-proxy: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
