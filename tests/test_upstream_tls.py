"""Upstreams over TLS (https + wss), trusting a provider's own CA (``providers[].tls_ca``)."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import gateway_config, start_gateway
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.ssl import PrivateCertificate

from cch.config import ConfigError, ProviderConfig, load_config
from cch.testing import FakeUpstream


def self_signed(directory: Path) -> tuple[Path, bytes]:
    """A CA-less self-signed certificate for localhost: (PEM path, cert+key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = directory / "upstream-ca.pem"
    path.write_bytes(cert_pem)
    return path, key_pem + cert_pem


@pytest_twisted.async_yield_fixture
async def tls_fake(tmp_path: Path) -> Any:
    ca, pem = self_signed(tmp_path)
    fake = FakeUpstream(reactor)
    await fake.listen(reactor, tls=PrivateCertificate.loadPEM(pem).options())
    yield fake, ca
    await fake.stop()


def tls_config(fake: FakeUpstream, ca: Path | None, websocket: str) -> Any:
    base = fake.base_url.replace("127.0.0.1", "localhost")
    assert base.startswith("https://")
    provider = ProviderConfig(name="primary", base_url=base, websocket=websocket, tls_ca=str(ca) if ca else None)
    return gateway_config(fake, providers=(provider,))


@pytest.mark.parametrize("websocket", ["off", "on"])
@pytest_twisted.ensureDeferred
async def test_a_turn_over_tls_with_the_providers_ca(tls_fake: Any, websocket: str) -> None:
    fake, ca = tls_fake
    running = await start_gateway(tls_config(fake, ca, websocket))
    try:
        client = await running.connect()
        client.send_json({"type": "response.create", "model": "m", "input": "over tls"})
        assert (await client.recv_turn())[-1]["type"] == "response.completed"
        assert fake.requests[0].transport == ("http" if websocket == "off" else "websocket")
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_an_untrusted_upstream_certificate_is_refused(tls_fake: Any) -> None:
    fake, _ = tls_fake
    running = await start_gateway(tls_config(fake, None, "on"))
    try:
        client = await running.connect()
        client.send_json({"type": "response.create", "model": "m", "input": "x"})
        frame = await client.recv()
        # The WebSocket attempt fails its TLS handshake, the HTTP fallback too: a 502, no data.
        assert frame["type"] == "error" and frame["status"] == 502
        assert fake.requests == []
    finally:
        await running.stop()


def test_tls_ca_must_be_a_readable_pem_file(tmp_path: Path) -> None:
    path = tmp_path / "cch.toml"
    path.write_text('[[providers]]\nname = "p"\nbase_url = "https://x.test/v1"\ntls_ca = "/nonexistent.pem"\n')
    with pytest.raises(ConfigError, match=r"providers\[0\]\.tls_ca: cannot read"):
        load_config(str(path), {})
