"""The HTTP server of the dashboard, in the gRPC server's process and event loop.

Hypercorn (HTTP/1.1 and HTTP/2) serves `http_app`; browser RPCs reach the grpc.aio
server over a loopback unix socket in a private directory (mode 0700), so they pass
its guards and no TCP port without TLS is opened for them. The socket is ours: we
bind it (SO_REUSEPORT with several workers, like gRPC) and know its port before
serving, so port 0 works and the banner tells the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from hypercorn.asyncio import serve
from hypercorn.config import Config

from sira_server.config import ConfigError, Settings
from sira_server.web.connect_bridge import ConnectBridge
from sira_server.web.dev_sign_in import DevSignIn
from sira_server.web.http_app import build_http_app
from sira_server.web.origins import is_loopback_bind

__all__ = ["HttpServer", "LoopbackSocket", "bind_http_socket", "open_http_server"]

log = logging.getLogger("sira_server.web")

READ_TIMEOUT_SECONDS = 30


class LoopbackSocket:
    """A unix socket path for the gRPC server, in a directory only this user can enter."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="sira-http-"))  # mode 0700
        self.path = self.directory / "grpc.sock"

    @property
    def target(self) -> str:
        return f"unix:{self.path}"

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def bind_http_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """The listening socket of the HTTP server (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot bind the dashboard's HTTP port {host}:{port} (SIRA_HTTP_HOST / "
            f"SIRA_HTTP_PORT; 'off' disables it): {exc.strerror or exc}"
        ) from None
    # Listening now: a browser that connects before hypercorn accepts waits in the
    # backlog instead of being refused.
    sock.listen(1024)
    return sock


class HttpServer:
    """The dashboard and browser RPC on one HTTP port, until `stop`."""

    def __init__(
        self,
        settings: Settings,
        loopback: LoopbackSocket,
        services: Sequence[ServiceDescriptor],
        *,
        dev_secret: str | None,
    ) -> None:
        http = settings.http
        assert http.port is not None
        self._settings = settings
        self._loopback = loopback
        self._sock = bind_http_socket(http.host, http.port, reuse_port=settings.workers > 1)
        self.port: int = self._sock.getsockname()[1]
        self._fd: int | None = None
        limits = settings.limits
        self._channel = grpc.aio.insecure_channel(
            loopback.target,
            options=[
                ("grpc.max_receive_message_length", limits.max_send_message_bytes),
                ("grpc.max_send_message_length", limits.max_receive_message_bytes),
            ],
        )
        rpc = ConnectBridge(
            self._channel, services, read_max_bytes=limits.max_receive_message_bytes
        )
        # Only on loopback: a dev token for anyone who can reach the port is the secret.
        self.dev_sign_in = dev_secret is not None and is_loopback_bind(http.host)
        sign_in = (
            DevSignIn(dev_secret, audience=settings.jwt.audience, issuer=settings.jwt.issuer)
            if dev_secret is not None and self.dev_sign_in
            else None
        )
        self.app = build_http_app(rpc, dev_sign_in=sign_in, cors_origins=http.cors_origins)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _config(self) -> Config:
        s = self._settings
        config = Config()
        config.bind = [f"fd://{self._fd}"]
        config.graceful_timeout = s.shutdown_grace_seconds
        config.accesslog = None
        config.errorlog = logging.getLogger("sira_server.web.hypercorn")
        config.h11_max_incomplete_size = 16 * 1024  # request line and headers
        # A client that stops sending mid-request is dropped (idle keep-alive: 5 s).
        config.read_timeout = READ_TIMEOUT_SECONDS
        config.ssl_handshake_timeout = READ_TIMEOUT_SECONDS
        if s.tls_cert_file is not None and s.tls_key_file is not None:
            config.certfile = str(s.tls_cert_file)
            config.keyfile = str(s.tls_key_file)
            if s.tls_client_ca_file is not None:  # same rule as gRPC: no client cert, no call
                import ssl

                config.ca_certs = str(s.tls_client_ca_file)
                config.verify_mode = ssl.CERT_REQUIRED
        return config

    @property
    def scheme(self) -> str:
        return "https" if self._settings.tls_cert_file is not None else "http"

    async def start(self) -> None:
        # Hypercorn owns the descriptor from here on (it closes it when it stops).
        self._fd = self._sock.detach()
        self._task = asyncio.create_task(
            serve(self.app, self._config(), shutdown_trigger=self._stop.wait),  # type: ignore[arg-type]
            name="http",
        )
        await asyncio.sleep(0)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (within the grace), close."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        await self._channel.close()
        self._sock.close()  # a no-op once detached
        self._loopback.remove()


def open_http_server(
    settings: Settings, grpc_server: grpc.aio.Server, services: Sequence[ServiceDescriptor]
) -> HttpServer | None:
    """The HTTP server for `settings` (None when SIRA_HTTP_PORT=off), with the gRPC
    server's loopback port added (call before the gRPC server starts)."""
    if settings.http.port is None:
        return None
    loopback = LoopbackSocket()
    try:
        if int(grpc_server.add_insecure_port(loopback.target)) == 0:
            raise ConfigError(f"cannot bind the loopback socket {loopback.path}")
        dev_secret = settings.jwt.secret if settings.http.dev_sign_in else None
        return HttpServer(settings, loopback, services, dev_secret=dev_secret)
    except BaseException:
        loopback.remove()
        raise
