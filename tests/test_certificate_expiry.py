"""Reading the served certificate's expiry date with a public parser."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from proxy import reload
from proxy.config import ConfigError, TLSConfig
from proxy.reload import certificate_expiry


def test_expiry_is_the_first_certificates_not_after(tmp_path: Path) -> None:
    """Guards the gauge's value: the served (first) certificate of a chain, as Unix time."""
    ca = trustme.CA()
    leaf = ca.create_child_ca().issue_cert("registry.example")
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    served = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    expires = certificate_expiry(TLSConfig(cert=chain, key=tmp_path / "unused"))
    assert expires == served.not_valid_after_utc.timestamp()


@pytest.mark.parametrize("content", [None, b"", b"not a certificate\n"])
def test_an_unreadable_certificate_is_a_config_error(tmp_path: Path, content: bytes | None) -> None:
    """Guards the reload's promise: a broken file is reported, and the current one kept."""
    path = tmp_path / "cert.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"tls\.cert: cannot read the expiry date"):
        certificate_expiry(TLSConfig(cert=path, key=tmp_path / "key.pem"))


def test_no_private_ssl_parser() -> None:
    """Guards against the stdlib's private `_ssl._test_decode_cert`, which may go any release."""
    source = Path(reload.__file__).read_text()
    imported = {
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    } | {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert "_ssl" not in imported and "_test_decode_cert" not in source
