"""sira-loadtest's TLS flags against a real sira-server serving mTLS (SIRA_TLS_*).

The certificates are made here: a CA, a server certificate for the name
`sira.test` (not the address dialled, so --cname or --authority must name it),
and a client certificate. Health/Check is resolved through reflection over TLS.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from server_fixtures import (
    RunningServer,
    create_migrated_database,
    drop_database,
    run_sira_server,
)

from sira_loadtest.__main__ import main as cli_main
from sira_loadtest.config import LoadConfig, TlsOptions
from sira_loadtest.runner import ConnectError, run_load

SERVER_NAME = "sira.test"
HEALTH = "/grpc.health.v1.Health/Check"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    dns: str = "",
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signer = issuer if issuer is not None else (name, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
    return builder.sign(signer, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("sira-test-ca", ca_key, None, ca=True)
    issuer = (ca.subject, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        SERVER_NAME, server_key, issuer, dns=SERVER_NAME, usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue("loadtester", client_key, issuer, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    _write(root / "ca.pem", ca, ca_key)
    _write(root / "server.pem", server, server_key)
    _write(root / "client.pem", client, client_key)
    return Pki(
        root / "ca.pem",
        root / "server.pem",
        root / "server.key",
        root / "client.pem",
        root / "client.key",
    )


@pytest.fixture(scope="module")
async def mtls_database(postgres_server_dsn: str) -> AsyncIterator[str]:
    """Its own database: this server shares nothing with the session's server."""
    url = await create_migrated_database(postgres_server_dsn, "sira_tls")
    yield url
    await drop_database(postgres_server_dsn, url)


@pytest.fixture(scope="module")
def mtls_server(
    pki: Pki,
    mtls_database: str,
    redis_server_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningServer]:
    """A TLS server that requires client certificates; only health is called on it,
    so it may use the test Redis database (SIRA_TEST_REDIS_URL)."""
    env = {
        "SIRA_TLS_CERT_FILE": str(pki.server_cert),
        "SIRA_TLS_KEY_FILE": str(pki.server_key),
        "SIRA_TLS_CLIENT_CA_FILE": str(pki.ca),
    }
    with run_sira_server(
        mtls_database, redis_server_url, tmp_path_factory.mktemp("sira-mtls"), env
    ) as server:
        yield server


def _config(server: RunningServer, tls: TlsOptions) -> LoadConfig:
    return LoadConfig(
        target=server.address,
        call=HEALTH,
        data='{"service": ""}',
        total=10,
        concurrency=2,
        insecure=False,
        tls=tls,
        connect_timeout=5.0,
    )


async def test_mtls_with_cacert_cname_cert_and_key(mtls_server: RunningServer, pki: Pki) -> None:
    tls = TlsOptions(
        cacert=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key), cname=SERVER_NAME
    )
    report = await run_load(_config(mtls_server, tls))
    assert report.status_code_distribution == {"OK": 10}
    assert report.to_json()["options"]["cname"] == SERVER_NAME


async def test_authority_names_the_server_like_cname(mtls_server: RunningServer, pki: Pki) -> None:
    tls = TlsOptions(
        cacert=str(pki.ca),
        cert=str(pki.client_cert),
        key=str(pki.client_key),
        authority=SERVER_NAME,
    )
    report = await run_load(_config(mtls_server, tls))
    assert report.status_code_distribution == {"OK": 10}


async def test_skip_tls_trusts_the_presented_certificate(
    mtls_server: RunningServer, pki: Pki
) -> None:
    tls = TlsOptions(cert=str(pki.client_cert), key=str(pki.client_key), skip_verify=True)
    report = await run_load(_config(mtls_server, tls))
    assert report.status_code_distribution == {"OK": 10}


async def test_without_a_client_certificate_the_server_refuses(
    mtls_server: RunningServer, pki: Pki
) -> None:
    config = _config(mtls_server, TlsOptions(cacert=str(pki.ca), cname=SERVER_NAME))
    with pytest.raises(ConnectError, match="--connect-timeout"):
        await run_load(replace(config, connect_timeout=2.0))


async def test_a_wrong_server_name_fails_verification(mtls_server: RunningServer, pki: Pki) -> None:
    tls = TlsOptions(
        cacert=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key), cname="other.test"
    )
    with pytest.raises(ConnectError):
        await run_load(replace(_config(mtls_server, tls), connect_timeout=2.0))


def test_cli_tls_flags(mtls_server: RunningServer, pki: Pki, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = ["--call", "grpc.health.v1.Health.Check", "-n", "5", "-c", "1", "-O", "json"]
    argv += ["--cacert", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key)]
    argv += ["--cname", SERVER_NAME, "--keepalive", "30s", "--connect-timeout", "5s"]
    cli_main([*argv, "-o", str(out), mtls_server.address])
    assert '"statusCodeDistribution": {"OK": 5}' in out.read_text()
    with pytest.raises(SystemExit, match="--cert and --key"):
        cli_main(["--call", HEALTH, "--cert", str(pki.client_cert), mtls_server.address])
