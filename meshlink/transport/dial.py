"""Dialing what the resolver ranked: one dial per scheme, one try-in-order loop.

Theory of operation
-------------------
:class:`resolver.Resolver` turns a name into endpoints, best first, each with
the reason for its place.  Opening them is this module's job, and it is the
same for every client: try each endpoint in order, one at a time; a failed
attempt is logged (which endpoint, why) and the next one is tried; when all
fail, one :class:`~meshlink.ResolveError` lists every attempt and its reason.
An attempt refused for credentials (:class:`~meshlink.AuthError`: a vchan
server that does not admit our uid, a certificate refused either way, a server
whose uid is not its record's owner) stops the loop at once and propagates:
"you may not" must not become "try the next, weaker, transport", or a uid
allow list would be worth nothing while the same service also listens on TCP.

A vchan server proves who it is by its uid: the kernel reports the uid of the
process listening on the rendezvous socket (``SO_PEERCRED``), and
:func:`dial_vchan` requires it to be the owner of the service's record in the
host store (the file a server rewrites each time it starts), or of the store
directory when there is no record.  Another local user who managed to put a
socket in the store is refused before a byte is sent to it.

``meshlink.connect`` opens a bus connection per attempt (vchan, TLS or TCP,
:func:`dial`); ``meshlink.disk.open`` opens an NBD client per attempt.  Both
go through :func:`open_first`.  Endpoints are tried sequentially, never raced:
a better transport that works must stop a worse one from being opened at all
(for example, no plain TCP connection when vchan succeeds).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import NoReturn, TypeVar

import trio

from resolver import Choice, Endpoint, HostStore

from ..errors import AuthError, LocalProtocolError, MeshlinkError, ResolveError
from .tls import TLSConfig, tls_client_stream
from .vchan import VchanStream, connect_vchan
from .vchan.ivshmem import connect_ivshmem, local_region
from .vchan.xen import connect_xen_vchan

__all__ = ["ATTEMPT_ERRORS", "Attempts", "dial", "dial_tcp", "dial_tls", "dial_vchan",
           "note_fingerprint", "open_first"]

logger = logging.getLogger("meshlink.connect")

#: What a failed attempt may raise; anything else is a bug and propagates.
ATTEMPT_ERRORS = (MeshlinkError, OSError, ValueError, trio.BrokenResourceError,
                  trio.TooSlowError)
T = TypeVar("T")


def expected_server_uid(store: HostStore, service: str) -> int:
    """The uid a vchan server of ``service`` must run as: its record's owner.

    The record is written by the server itself each time it starts, so its
    owner is the server's uid; without a record (a bare vchan listener) the
    store directory's owner stands in.

    Raises:
        AuthError: neither can be examined (the store is unreadable to us).
    """
    for path in (store.record_path(service), store.path):
        try:
            return os.stat(path).st_uid
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise AuthError(f"cannot check the owner of {path}: {exc}") from exc
    raise AuthError(f"host store {store.path} is gone: cannot check who serves {service!r}")


async def dial_vchan(ep: Endpoint, host_store: HostStore) -> VchanStream:
    """Open a vchan to ``ep``: through its host store (``host_store`` if it names
    none), over Xen for an endpoint found in XenStore (``ep.domid``), or
    through our ivshmem region for ``vchan://ivshmem/NAME``.

    Raises:
        AuthError: the server refused our uid, or its uid is not the owner of
            its record (see :func:`expected_server_uid`).
        ProviderUnavailable: an ivshmem endpoint, and our region is missing or
            belongs to another host id than the endpoint's.
    """
    if ep.via == "ivshmem":
        # Reaching the listener through the region is the proof of co-location;
        # the region's host id must be the one the endpoint claims.
        with local_region() as region:
            return await connect_ivshmem(region, ep.host, expect_host_id=ep.host_id)
    if ep.domid is not None:
        # Over Xen (found in XenStore): the server domain's channel for us,
        # at its port; XenStore's permissions and the grant table vouch for
        # both ends' domains.
        return await connect_xen_vchan(ep.domid, ep.host)
    store = HostStore(ep.store) if ep.store else host_store
    return await connect_vchan(ep.host, host_store=store,
                               expect_uid=expected_server_uid(store, ep.host))


async def dial_tcp(ep: Endpoint) -> trio.SocketStream:
    """Open a plain TCP connection to ``ep``."""
    return await trio.open_tcp_stream(ep.host, ep.port)


async def dial_tls(ep: Endpoint, tls: TLSConfig | None,
                   server_hostname: str) -> trio.SSLStream[trio.abc.Stream]:
    """Open TLS to ``ep``, verifying that the server's certificate names ``server_hostname``.

    A certificate that the CA vouches for but whose fingerprint differs from
    the advertised one is accepted with a warning: the advertisement may be stale.

    Raises:
        LocalProtocolError: we have no CA to verify the server with.
        AuthError: the server's certificate was refused.
    """
    tcp = await dial_tcp(ep)
    if tls is None or not tls.can_connect:
        await tcp.aclose()
        raise LocalProtocolError("TLS endpoint but no CA configured (tls= or MESHLINK_TLS_CA)")
    stream = await tls_client_stream(tcp, tls.client_context(), server_hostname)
    note_fingerprint(ep, server_hostname, stream.getpeercert(binary_form=True))
    return stream


def note_fingerprint(ep: Endpoint, server_hostname: str, der: bytes | None) -> None:
    """Warn when the server's certificate (DER) is not the one ``ep`` advertised.

    Only a warning: the CA vouches for the certificate, and the advertisement
    may be stale (a server renewed its certificate since it published).
    """
    if not ep.fingerprint:
        return
    seen = hashlib.sha256(der).hexdigest() if der else ""
    if seen != ep.fingerprint:
        logger.warning("%s: server certificate fingerprint %s differs from the advertised "
                       "%s (the CA vouches for it; advertisement may be stale)",
                       server_hostname, seen[:16], ep.fingerprint[:16])


async def dial(ep: Endpoint, *, host_store: HostStore, tls: TLSConfig | None,
               server_hostname: str) -> trio.abc.Stream:
    """Open a byte stream to ``ep`` with the dial of its scheme."""
    if ep.scheme == "vchan":
        return await dial_vchan(ep, host_store)
    if ep.scheme == "tls":
        return await dial_tls(ep, tls, server_hostname)
    return await dial_tcp(ep)


def _unchanged(ep: Endpoint, exc: BaseException) -> BaseException:
    return exc


@asynccontextmanager
async def open_first(
    choices: Sequence[Choice],
    open_one: Callable[[Endpoint], AbstractAsyncContextManager[T]],
    *,
    subject: str,
    failure: str,
    log: logging.Logger,
    describe: Callable[[Endpoint], str] = lambda ep: ep.url,
    blame: Callable[[Endpoint, BaseException], BaseException] = _unchanged,
) -> AsyncIterator[tuple[T, Choice]]:
    """Enter ``open_one(endpoint)`` for each choice in order until one works.

    Use as ``async with open_first(...) as (resource, choice):``; the resource
    is closed when the block is left.

    Args:
        choices: the resolver's ranking, best first.
        open_one: opens one endpoint (an async context manager).
        subject: what is being opened, first in each log line (a service name).
        failure: the start of the error message when every attempt fails.
        log: the logger that gets one warning per failed attempt.
        describe: how an endpoint is named in logs and errors (default: its URL).
        blame: may re-classify an attempt's error (for example, a TLS refusal
            buried in a later handshake becomes an :class:`AuthError`).

    Raises:
        AuthError: an attempt was refused for credentials (either end's); no
            later endpoint is tried (the message lists the attempts so far).
        ResolveError: every attempt failed (the message lists each and why;
            the last error is chained), or there was nothing to try.

    Cancellation:
        Safe at any point: a half-open attempt is closed by its ``open_one``.
    """
    attempts = Attempts(subject, failure, log)
    async with AsyncExitStack() as stack:
        for choice in choices:
            ep = choice.endpoint
            try:
                opened = await stack.enter_async_context(open_one(ep))
            except ATTEMPT_ERRORS as exc:
                attempts.failed(describe(ep), blame(ep, exc))
                continue
            yield opened, choice
            return
    attempts.all_failed()


class Attempts:
    """What a try-in-order loop does with its failures (:func:`open_first`,
    and the blocking client's loop): one warning per failed endpoint, a stop
    at the first refusal of credentials (never a downgrade after "not you"),
    and an error that lists every attempt when none worked.

    Args:
        subject: what is being opened, first in each log line.
        failure: the start of the error message.
        log: where the warnings go.
    """

    def __init__(self, subject: str, failure: str, log: logging.Logger) -> None:
        self._subject = subject
        self._failure = failure
        self._log = log
        self._failures: list[str] = []
        self._last: BaseException | None = None

    def failed(self, where: str, err: BaseException) -> None:
        """Count a failed attempt at ``where``; go on with the next endpoint.

        Raises:
            AuthError: ``err`` is one: no later endpoint may be tried.
        """
        self._last = err
        self._failures.append(f"{where}: {err}")
        if isinstance(err, AuthError):
            self._log.warning("%s: %s refused (%s); not trying other endpoints",
                              self._subject, where, err)
            raise AuthError(f"{self._failure}: {'; '.join(self._failures)}") from err
        self._log.warning("%s: %s failed (%s); falling back to the next endpoint",
                          self._subject, where, err)

    def all_failed(self) -> NoReturn:
        """Raises the ResolveError that lists every attempt and why it failed."""
        summary = "; ".join(self._failures) or "no usable endpoint"
        raise ResolveError(f"{self._failure}: {summary}") from self._last
