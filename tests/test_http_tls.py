"""With TLS and client certificates configured, the HTTP port is HTTPS and asks for a
client certificate as gRPC does: it is no way around mTLS. (The PKI and the server of
`test_loadtest_tls`.)"""

from __future__ import annotations

import ssl

import httpx
import pytest
from server_fixtures import RunningServer
from test_loadtest_tls import Pki, mtls_database, mtls_server, pki

__all__ = ["mtls_database", "mtls_server", "pki"]  # fixtures used by name

LIST = "/sira.experiments.v1.LifecycleService/ListExperiments"


def tls_context(pki: Pki, *, client_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    # The server's certificate names sira.test; the test connects to 127.0.0.1.
    context.check_hostname = False
    if client_certificate:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


async def test_https_with_a_client_certificate(mtls_server: RunningServer, pki: Pki) -> None:
    assert mtls_server.http_url is not None
    assert mtls_server.http_url.startswith("https://")
    context = tls_context(pki, client_certificate=True)
    async with httpx.AsyncClient(base_url=mtls_server.http_url, verify=context) as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert "content-security-policy" in page.headers
        rpc = await client.post(LIST, content=b"{}", headers={"content-type": "application/json"})
        assert rpc.status_code == 401  # forwarded, and the guards answered
        assert rpc.json()["code"] == "unauthenticated"


async def test_without_a_client_certificate_the_http_port_refuses(
    mtls_server: RunningServer, pki: Pki
) -> None:
    assert mtls_server.http_url is not None
    context = tls_context(pki, client_certificate=False)
    async with httpx.AsyncClient(base_url=mtls_server.http_url, verify=context) as client:
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            await client.get("/")
