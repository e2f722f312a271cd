"""The server-side TLS context for `listen` when `tls.cert` and `tls.key` are set."""

from __future__ import annotations

import ssl

from proxy.config import ConfigError, TLSConfig


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """A TLS >= 1.2 server context, or ConfigError naming the file that would not load."""
    assert tls.cert is not None and tls.key is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"tls.cert/tls.key: cannot load {tls.cert}, {tls.key}: {reason}"
        ) from None
    return context
