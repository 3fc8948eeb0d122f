"""TLS for meshlink: trio.SSLStream over TCP, mutual TLS, certificate names.

Theory of operation
-------------------
A client connects *by service name*, so it verifies that the server's
certificate names the service (``server_hostname`` = the service name: put it
in the certificate's subjectAltName), against the configured CA.  A server
with a CA configured requires a client certificate signed by it (mutual TLS)
and may further restrict clients to a set of certificate names (DNS
subjectAltNames, else the common name).  Paths come from arguments or from the
environment: ``MESHLINK_TLS_CERT``, ``MESHLINK_TLS_KEY``, ``MESHLINK_TLS_CA``,
``MESHLINK_TLS_ALLOW`` (comma-separated client names).

With TLS 1.3 the server judges the client's certificate after the client has
finished its side of the handshake, so a refused client learns it on its first
read: :func:`meshlink.connect` turns that into :class:`~meshlink.AuthError`.
For the client to learn *why*, the server sends the TLS alert OpenSSL wrote
("unknown ca", "certificate required", ...) before closing: trio's
``SSLStream`` drops it when a handshake fails, so :func:`tls_server_handshake`
flushes it itself.  A certificate the CA vouches for but whose name is not in
the allow list passes the handshake; the server then closes without a reason,
and the client reports that it was refused after the handshake.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import trio

from ..errors import AuthError, HandshakeError, LocalProtocolError

__all__ = ["ENV_ALLOW", "ENV_CA", "ENV_CERT", "ENV_KEY", "TLSConfig", "peer_names", "ssl_reason"]

ENV_CERT = "MESHLINK_TLS_CERT"
ENV_KEY = "MESHLINK_TLS_KEY"
ENV_CA = "MESHLINK_TLS_CA"
ENV_ALLOW = "MESHLINK_TLS_ALLOW"
#: Bound on a TLS handshake (the transport's, not the bus's).
HANDSHAKE_TIMEOUT = 10.0
#: Bound on sending the alert that tells a refused client why.
ALERT_TIMEOUT = 1.0


async def _send_pending_alert(tls: trio.SSLStream[Any]) -> None:
    """Send what OpenSSL queued after a failed handshake (the alert saying why).

    trio keeps the outgoing TLS records in a private ``MemoryBIO`` and does not
    flush it once the handshake has failed; without the alert the client sees
    only an EOF.  Best effort: if trio's layout changes, the client still gets
    the EOF, as before.
    """
    outgoing = getattr(tls, "_outgoing", None)
    if not isinstance(outgoing, ssl.MemoryBIO):
        return
    data = outgoing.read()
    if not data:
        return
    with trio.move_on_after(ALERT_TIMEOUT):
        try:
            await tls.transport_stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # deliberate: the client is gone; there is no one left to tell


def peer_names(cert: dict[str, Any] | None) -> list[str]:
    """Names in a peer certificate (``SSLObject.getpeercert()``): DNS SANs, else the CN."""
    if not cert:
        return []
    names = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    if names:
        return names
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.append(value)
    return names


def ssl_reason(exc: ssl.SSLError) -> str:
    """The readable part of an SSL error: "certificate verify failed: hostname mismatch ..."."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    text = exc.reason or str(exc)
    return text.replace("_", " ").lower() if text.isupper() else text


def _fingerprint_pem(path: str) -> str:
    with open(path, encoding="ascii") as f:
        pem = f.read()
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    try:
        start = pem.index(begin)
        first = pem[start : pem.index(end, start) + len(end)]
    except ValueError as exc:
        raise LocalProtocolError(f"{path}: no PEM certificate in the file") from exc
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest()


@dataclass(frozen=True)
class TLSConfig:
    """Certificates for one end.

    Attributes:
        cert: PEM file of our certificate chain (a server needs one; a client
            needs one for mutual TLS).
        key: PEM file of our private key (default: inside ``cert``).
        ca: PEM file of the CA that signs the peers' certificates.  A server
            with ``ca`` requires client certificates (mutual TLS).
        allow_names: server side: client certificate names allowed
            (``None`` = any certificate the CA signed).
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    allow_names: frozenset[str] | None = None

    @classmethod
    def from_env(
        cls,
        *,
        cert: str | None = None,
        key: str | None = None,
        ca: str | None = None,
        allow_names: Iterable[str] | None = None,
    ) -> TLSConfig | None:
        """Arguments first, then ``MESHLINK_TLS_*``; ``None`` if nothing is configured."""
        cert = cert or os.environ.get(ENV_CERT) or None
        key = key or os.environ.get(ENV_KEY) or None
        ca = ca or os.environ.get(ENV_CA) or None
        if allow_names is None and os.environ.get(ENV_ALLOW):
            allow_names = [n.strip() for n in os.environ[ENV_ALLOW].split(",") if n.strip()]
        if cert is None and ca is None:
            return None
        return cls(cert, key, ca, frozenset(allow_names) if allow_names is not None else None)

    @property
    def can_serve(self) -> bool:
        """Whether a server can use it (it has a certificate)."""
        return self.cert is not None

    @property
    def can_connect(self) -> bool:
        """Whether a client can use it (it has a CA to verify servers with)."""
        return self.ca is not None

    def fingerprint(self) -> str | None:
        """SHA-256 (hex) of our certificate (the first of the chain), if any."""
        return _fingerprint_pem(self.cert) if self.cert else None

    def server_context(self) -> ssl.SSLContext:
        """An SSL context for a server.

        Raises:
            LocalProtocolError: no certificate, or the files cannot be loaded.
        """
        if self.cert is None:
            raise LocalProtocolError(f"a TLS server needs a certificate (set {ENV_CERT})")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
            if self.ca is not None:
                ctx.load_verify_locations(self.ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise LocalProtocolError(f"cannot load TLS server files: {exc}") from exc
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """An SSL context for a client (verifies the server against ``ca``).

        Raises:
            LocalProtocolError: no CA, or the files cannot be loaded.
        """
        if self.ca is None:
            raise LocalProtocolError(f"a TLS client needs a CA to verify servers (set {ENV_CA})")
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert is not None:
                ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise LocalProtocolError(f"cannot load TLS client files: {exc}") from exc
        return ctx


async def tls_client_stream(
    stream: trio.abc.Stream, ctx: ssl.SSLContext, service: str
) -> trio.SSLStream[trio.abc.Stream]:
    """Run the client handshake over ``stream``, verifying the server names ``service``.

    Returns:
        The :class:`trio.SSLStream` (it owns ``stream``).

    Raises:
        AuthError: the server's certificate was not acceptable.
        HandshakeError: the handshake failed otherwise, or took longer than
            ``HANDSHAKE_TIMEOUT``.

    Cancellation:
        Leaves the stream closed.

    Backpressure:
        Waits for the server's handshake messages, at most ``HANDSHAKE_TIMEOUT``.
    """
    tls = trio.SSLStream(stream, ctx, server_hostname=service)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await tls.do_handshake()
    except BaseException as exc:
        await trio.aclose_forcefully(tls)
        if isinstance(exc, trio.BrokenResourceError) and isinstance(
            exc.__cause__, ssl.SSLCertVerificationError
        ):
            raise AuthError(f"server certificate refused: {ssl_reason(exc.__cause__)}") from exc
        if isinstance(exc, trio.BrokenResourceError) and isinstance(exc.__cause__, ssl.SSLError):
            raise AuthError(f"TLS handshake refused: {ssl_reason(exc.__cause__)}") from exc
        if isinstance(exc, trio.TooSlowError | trio.BrokenResourceError | OSError):
            raise HandshakeError(f"TLS handshake failed: {exc!r}") from exc
        raise
    return tls


async def tls_server_handshake(tls: trio.SSLStream[Any], config: TLSConfig) -> list[str]:
    """Finish the server handshake and check the client's certificate name.

    Returns:
        The client's certificate names (empty without mutual TLS).

    Raises:
        AuthError: the client's certificate is missing, invalid, or its name is
            not in ``config.allow_names``.
        HandshakeError: the handshake failed otherwise or timed out.

    Cancellation:
        Leaves the stream unusable; close it.

    Backpressure:
        At most ``HANDSHAKE_TIMEOUT``.
    """
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        if isinstance(exc.__cause__, ssl.SSLError):
            await _send_pending_alert(tls)
            raise AuthError(f"client certificate refused: {ssl_reason(exc.__cause__)}") from exc
        raise HandshakeError(f"TLS handshake failed: {exc!r}") from exc
    except trio.TooSlowError as exc:
        raise HandshakeError("TLS handshake timed out") from exc
    names = peer_names(tls.getpeercert())
    if config.allow_names is not None and not set(names) & config.allow_names:
        raise AuthError(f"client certificate names {names} are not allowed")
    return names
