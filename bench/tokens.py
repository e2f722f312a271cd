"""Access-token latency: what a request with a token adds over the registry itself.

`python -m bench.tokens [--tokens N]` (from the repository root) starts the real registry and the
proxy with a tokens file of N tokens (their owner in a cost-10 htpasswd file), then, on one
connection and alternating in rounds:

1. **direct**: `GET /v2/` at the registry, no credentials;
2. **first request with a token**: `GET /v2/` through the proxy, each with another token used
   for the first time (a token's check is one SHA-256 and a look-up: there is nothing to cache);
3. **htpasswd, cached**: the same through the proxy as the owner, whose password is cached.

It prints each p50 and what the token adds over direct, and one JSON line. The target (README's
performance table): the token's p50 adds at most 2 ms over direct. Nothing is asserted; the
figures compare only within one run on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import tempfile
import time
from pathlib import Path

from bench.latency import summary, timed_gets
from proxy.auth.tokens_file import Token, new_secret, write_tokens
from tests.support import Proxy, Registry, htpasswd

ROUNDS = 4


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tokens", description=__doc__)
    parser.add_argument("--tokens", type=int, default=2000, help="tokens, one request each")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-tokens-"))
    password_file = root / "htpasswd"
    htpasswd(password_file, "-B", "-C", "10", user="owner", password="owner-pw")
    now = time.time()
    tokens, secrets = {}, []
    for i in range(args.tokens):
        secret, digest = new_secret()
        name = f"ci-{i}"
        tokens[name] = Token(name, "owner", ("**",), ("pull",), (), now, now + 86400, digest)
        secrets.append(_basic(name, secret))
    write_tokens(root / "tokens", tokens)
    registry = Registry(root / "registry", quiet=True)
    registry.start()
    env = {"PROXY_TOKENS": str(root / "tokens"), "PROXY_LOG_LEVEL": "warning",
           "PROXY_ACCESS_LOG": "off"}  # fmt: skip
    proxy = Proxy(root / "proxy", registry.url, password_file, env)
    proxy.start()
    direct: list[float] = []
    token: list[float] = []
    cached: list[float] = []
    owner = _basic("owner", "owner-pw")
    try:
        per_round = args.tokens // ROUNDS
        for i in range(ROUNDS):
            batch = secrets[i * per_round : (i + 1) * per_round]
            direct += asyncio.run(timed_gets(registry.url + "/v2/", [None] * per_round, 1))
            token += asyncio.run(timed_gets(proxy.url + "/v2/", batch, 1))
            cached += asyncio.run(timed_gets(proxy.url + "/v2/", [owner] * per_round, 1))
    finally:
        proxy.stop()
        registry.stop()
    result = {"direct": summary(direct), "token_first_request": summary(token),
              "htpasswd_cached": summary(cached)}  # fmt: skip
    added = round(result["token_first_request"]["p50_ms"] - result["direct"]["p50_ms"], 2)
    result["token_added_p50_ms"] = {"value": added, "target_max": 2.0}
    print(f"direct GET /v2/: p50 {result['direct']['p50_ms']} ms ({len(direct)} requests)")
    print(f"first request with a token: p50 {result['token_first_request']['p50_ms']} ms, "
          f"{added} ms over direct (target <= 2 ms)")  # fmt: skip
    print(f"htpasswd user, cached: p50 {result['htpasswd_cached']['p50_ms']} ms")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
