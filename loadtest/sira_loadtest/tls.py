"""Channels as ghz opens them: plaintext or TLS/mTLS, cname, skipTLS, authority, keepalive.

- `--insecure`: plaintext; `--authority` sets the :authority header.
- otherwise TLS: `--cacert` (else the system roots), `--cert`/`--key` for mTLS,
  `--cname` overrides the name checked in the server's certificate.
- `--skipTLS`: grpc-python cannot turn verification off, so the tool fetches the
  certificate the server presents and trusts exactly that one (its own name is
  then the one checked). The connection stays encrypted; it is as unsafe as
  ghz's skip: anyone in the middle could present their own certificate.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from sira_loadtest.config import ConfigError, LoadConfig, TlsOptions, target_host


def validate_files(tls: TlsOptions) -> None:
    for flag, path in (("--cacert", tls.cacert), ("--cert", tls.cert), ("--key", tls.key)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{flag}: no such file: {path[:100]}")


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _target_port(target: str) -> int:
    tail = target.rpartition("]")[2] if target.startswith("[") else target
    port = tail.rpartition(":")[2]
    if not port.isdigit():
        raise ConfigError(f"--skipTLS needs host:port, got {target[:100]!r}")
    return int(port)


def presented_certificate(target: str, timeout: float) -> bytes:
    """PEM of the certificate the server at `target` presents (nothing verified)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    host = target_host(target)
    try:
        with (
            socket.create_connection((host, _target_port(target)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except OSError as exc:
        raise ConfigError(f"--skipTLS: cannot fetch the certificate of {target}: {exc}") from None
    if der is None:
        raise ConfigError(f"--skipTLS: {target} presented no certificate")
    return ssl.DER_cert_to_PEM_cert(der).encode()


def certificate_name(pem: bytes) -> str:
    """A DNS name the certificate is valid for: its first SAN, else its common name."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
        if names:
            return str(names[0])
        addresses = san.get_values_for_type(x509.IPAddress)
        if addresses:
            return str(addresses[0])
    except x509.ExtensionNotFound:
        pass
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else ""


@dataclass(frozen=True)
class ChannelPlan:
    """Everything needed to open identical channels in any process (picklable)."""

    target: str
    insecure: bool
    tls: TlsOptions
    keepalive: float = 0.0
    """Seconds between keepalive pings (ghz --keepalive); 0: none."""
    pinned_root: bytes = b""
    """--skipTLS: the server's own certificate, fetched once by `plan_channel`."""
    pinned_name: str = ""

    def options(self, index: int) -> list[tuple[str, str | int]]:
        # A local subchannel pool gives each channel its own TCP connection;
        # otherwise identical channels share one.
        opts: list[tuple[str, str | int]] = [
            ("grpc.use_local_subchannel_pool", 1),
            ("sira_loadtest.channel", index),
        ]
        if self.tls.authority:
            opts.append(("grpc.default_authority", self.tls.authority))
        name = self.tls.cname or self.pinned_name
        if name and not self.insecure:
            opts.append(("grpc.ssl_target_name_override", name))
        if self.keepalive > 0:
            opts += [
                ("grpc.keepalive_time_ms", int(self.keepalive * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        return opts

    def credentials(self) -> grpc.ChannelCredentials:
        root = self.pinned_root or _read(self.tls.cacert)
        return grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=_read(self.tls.key),
            certificate_chain=_read(self.tls.cert),
        )

    def open(self, index: int = 0) -> grpc.aio.Channel:
        if self.insecure:
            return grpc.aio.insecure_channel(self.target, options=self.options(index))
        return grpc.aio.secure_channel(self.target, self.credentials(), options=self.options(index))


def channel_plan(config: LoadConfig) -> ChannelPlan:
    """The channels of a prepared config (its pinned certificate, if any, included)."""
    pem = config.pinned_certificate
    return ChannelPlan(
        config.target,
        config.insecure,
        config.tls,
        config.keepalive,
        pem,
        certificate_name(pem) if pem else "",
    )


def pin_certificate(config: LoadConfig) -> bytes:
    """Check the TLS files; for --skipTLS, fetch the certificate to trust (else b"")."""
    validate_files(config.tls)
    if config.insecure or not config.tls.skip_verify:
        return b""
    return presented_certificate(config.target, config.connect_timeout)
