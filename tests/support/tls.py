"""Certificates for the TLS listener, issued by a test CA (the `ca` fixture)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trustme


def write_certificate(ca: trustme.CA, directory: Path) -> None:
    """A certificate for 127.0.0.1 and localhost, as `cert.pem` (with its chain) and `key.pem`."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(directory / "cert.pem"), append=True)
