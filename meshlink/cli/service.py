"""The ``meshlink`` service commands: serve, resolve, list, connect to and call services by name.

    meshlink serve-echo NAME            run the capitalising echo service
    meshlink resolve NAME --explain     show the ranked endpoints and why
    meshlink ls                         services in the host store (and zeroconf)
    meshlink connect NAME               send stdin lines, print the replies
    meshlink call NAME METHOD [ARG...]  one RPC, print the result as JSON
    meshlink stats [NAME] [--json]      a service's counters (cli/_stats.py)
    meshlink top [NAME]                 the same, redrawn every second

These are the top-level commands, so this module is imported on every run:
the bus, the resolver and the transports are imported by the handlers that
use them, not here.  Entry, exit codes and error messages: :mod:`._app`.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from ._common import CommandFailed, add_verbose
from ._stats import add_stats_commands

if TYPE_CHECKING:
    from ..bus import Handlers
    from ..transport.tls import TLSConfig

__all__ = ["add_service_commands", "echo_handlers"]


def echo_handlers() -> Handlers:
    """The capitalising echo service: ``echo(text) -> TEXT``."""
    from ..bus import Handlers

    handlers = Handlers()

    async def echo(text: str) -> str:
        return str(text).upper()

    handlers.add_method("echo", echo)
    return handlers


# --- options shared by the client commands -----------------------------------------


def _zeroconf_arg(value: str) -> Any:
    from resolver import ZeroconfConfig

    if value.lower() in ("off", "no", "0"):
        return False
    if value.lower() in ("all", "on", "1"):
        return ZeroconfConfig()
    return ZeroconfConfig(tuple(v.strip() for v in value.split(",") if v.strip()))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host-store", metavar="DIR",
                   help="host store directory (default: $MESHLINK_HOST_STORE, "
                        "$XDG_RUNTIME_DIR/meshlink, /tmp/meshlink-UID)")
    p.add_argument("--host-id", help="our host id (default: boot id + host store path)")
    p.add_argument("--zeroconf", metavar="ADDRS", type=_zeroconf_arg, default=None,
                   help="DNS-SD on these interface addresses (comma-separated), 'all' or "
                        "'off' (default: $MESHLINK_ZEROCONF, unset = off)")
    p.add_argument("--tls-cert", help="our certificate chain, PEM (or $MESHLINK_TLS_CERT)")
    p.add_argument("--tls-key", help="our private key, PEM (or $MESHLINK_TLS_KEY)")
    p.add_argument("--tls-ca", help="CA of the peers, PEM (or $MESHLINK_TLS_CA)")
    add_verbose(p)


def _dns_arg(value: str) -> Any:
    from resolver import DnsConfigError
    from resolver.dnssrv import DnsConfig

    if value.lower() in ("off", "no", "0"):
        return False
    try:
        return DnsConfig.parse(value)
    except DnsConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_client(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--rules", metavar="FILE", help="static rules file, TOML ($MESHLINK_RULES)")
    p.add_argument("--dns", metavar="SERVER[:PORT]", type=_dns_arg, default=None,
                   help="ask this DNS server for SRV + TXT records of the name, or 'off' "
                        "(default: $MESHLINK_DNS, unset = off)")
    p.add_argument("--dns-domain", metavar="DOMAIN",
                   help="domain the names live under in DNS (default: "
                        "$MESHLINK_DNS_DOMAIN, else the root)")
    p.add_argument("--require-tls", action="store_true", help="never use plain TCP")
    p.add_argument("--no-vchan", action="store_true", help="never use shared memory")
    p.add_argument("--pin", metavar="URL", help="use exactly this endpoint")


def _tls(args: argparse.Namespace, allow: list[str] | None = None) -> TLSConfig | None:
    from ..transport.tls import TLSConfig

    return TLSConfig.from_env(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca,
                              allow_names=allow)


def _dns(args: argparse.Namespace) -> Any:
    """``--dns`` with ``--dns-domain`` applied (``None``: ``$MESHLINK_DNS`` decides)."""
    import dataclasses

    from resolver import DnsConfig

    dns = getattr(args, "dns", None)
    domain = getattr(args, "dns_domain", None)
    if domain is None:
        return dns
    if dns is None:
        dns = DnsConfig.from_env()
    if not isinstance(dns, DnsConfig):
        raise CommandFailed("--dns-domain needs --dns SERVER[:PORT] (or $MESHLINK_DNS)")
    return dataclasses.replace(dns, domain=domain)


def _connect_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(host_store=args.host_store, rules=args.rules, zeroconf=args.zeroconf,
                dns=_dns(args), host_id=args.host_id, tls=_tls(args), require_tls=args.require_tls,
                forbid_vchan=args.no_vchan, pin=args.pin, client_name="meshlink-cli")


def _resolver(args: argparse.Namespace) -> Any:
    from resolver import Resolver

    tls = _tls(args)
    return Resolver(host_store=args.host_store, rules=getattr(args, "rules", None),
                    zeroconf=args.zeroconf, dns=_dns(args), host_id=args.host_id,
                    tls_configured=tls is not None and tls.can_connect)


# --- commands -----------------------------------------------------------------------


def _port_arg(text: str) -> int:
    """A port number for argparse: 1..65535, or 0 for any free port (else usage error)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1..65535 (0 = any free port)")
    return port


def _cmd_serve_echo(args: argparse.Namespace) -> int:
    from ..service import Server, serve

    if args.tcp_port is not None and not args.tcp:
        # argparse cannot tie two options together; same message shape and exit code.
        print("meshlink serve-echo: error: --tcp-port needs --tcp (plain TCP is off "
              "by default)", file=sys.stderr)
        return 2
    # --tcp: yes; --no-tcp: no; neither: $MESHLINK_ALLOW_PLAINTEXT decides (unset: no).
    allow_plaintext = True if args.tcp else (False if args.no_tcp else None)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(partial(
                serve, args.name, echo_handlers(), host_store=args.host_store,
                bind=args.bind, advertise=args.advertise or None,
                tls=_tls(args, args.allow_name or None),
                tls_port=None if args.no_tls else args.tls_port,
                tcp_port=args.tcp_port or 0, allow_plaintext=allow_plaintext,
                require_tls=args.require_tls, vchan=not args.no_vchan,
                zeroconf=args.zeroconf, host_id=args.host_id, metrics=args.metrics))
            print(f"serving {server.name}: " + " ".join(ep.url for ep in server.endpoints),
                  flush=True)
            if server.metrics_address is not None:
                host, port = server.metrics_address
                print(f"metrics: http://{host}:{port}/metrics", flush=True)

    trio.run(run)
    return 0


def _cmd_resolve(args: argparse.Namespace) -> int:
    from resolver import Policy

    from ..errors import resolver_errors
    from ..service import plaintext_allowed

    policy = Policy(require_tls=args.require_tls, forbid_vchan=args.no_vchan, pin=args.pin,
                    allow_plaintext=plaintext_allowed())
    with resolver_errors():
        ranking = trio.run(_resolver(args).explain, args.name, policy)
    for n, choice in enumerate(ranking.chosen, 1):
        print(f"{n}. {choice.endpoint.url}" + (f"\n   {choice.reason}" if args.explain else ""))
    if args.explain:
        for choice in ranking.rejected:
            print(f"-  {choice.endpoint.url} rejected\n   {choice.reason}")
        for note in ranking.notes:
            print(f"note: {note}")
    if not ranking.chosen:
        raise CommandFailed(f"no usable endpoint for {args.name!r}")
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    import os

    from resolver import HostStore, HostStoreSource
    from resolver.hoststore import default_store_path
    from resolver.zeroconf import ZeroconfConfig, browse

    from ..errors import resolver_errors

    # Listing is read-only: a missing host store has no services, and is
    # not created (nor are its parents) as a side effect.
    rows: list[tuple[str, str, str, str]] = []
    path = default_store_path(args.host_store)
    if os.path.lexists(path):
        with resolver_errors():
            store = HostStore(path, create=False)
        for name, live, rec in HostStoreSource(store).services():
            if rec is not None:
                rows.append((name, "hoststore", ",".join(rec.transports),
                             " ".join(rec.endpoints)))
            else:
                rows.append((name, "hoststore", "vchan" if live else "-",
                             "" if live else "(stale: server gone)"))
    zc: ZeroconfConfig | None = (
        ZeroconfConfig.from_env() if args.zeroconf is None
        else ZeroconfConfig() if args.zeroconf is True else args.zeroconf or None)
    if zc is not None:
        for ad in trio.run(browse, zc):
            where = " ".join(ep.url for ep in ad.endpoints() if ep.scheme != "vchan")
            rows.append((ad.name, "zeroconf", ",".join(ad.transports),
                         f"{where} host {ad.host_id}"))
    width = max([len(r[0]) for r in rows] + [4])
    print(f"{'NAME':<{width}}  {'SOURCE':<9}  {'TRANSPORTS':<14}  ENDPOINTS")
    for name, src, tr, where in rows:
        print(f"{name:<{width}}  {src:<9}  {tr:<14}  {where}".rstrip())
    return 0


def _cmd_connect(args: argparse.Namespace) -> int:
    from ..client import connect

    async def run() -> None:
        async with connect(args.name, **_connect_kwargs(args)) as conn:
            print(f"connected to {args.name} over {conn.transport} "
                  f"({conn.endpoint.url if conn.endpoint else '?'})", file=sys.stderr, flush=True)
            while True:
                line = await trio.to_thread.run_sync(sys.stdin.readline)
                if not line:
                    break
                reply = await conn.call(args.method, line.rstrip("\n"))
                print(reply if isinstance(reply, str) else json.dumps(reply), flush=True)

    trio.run(run)
    return 0


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _cmd_call(args: argparse.Namespace) -> int:
    from ..client import connect

    async def run() -> Any:
        async with connect(args.name, **_connect_kwargs(args)) as conn:
            if args.verbose:
                print(f"over {conn.transport}", file=sys.stderr)
            return await conn.call(args.method, *[_json_arg(a) for a in args.args])

    result = trio.run(run)
    print(json.dumps(result))
    return 0


def add_service_commands(sub: Any) -> None:
    """Add serve-echo, resolve, ls, connect, call, stats and top to the root's subparsers."""
    p = sub.add_parser("serve-echo", help="run the capitalising echo service",
                       description="Serve the echo service (echo(text) -> TEXT) on vchan "
                                   "(host store, own uid only) and, with a certificate, TLS; "
                                   "on plain TCP (no authentication) only with --tcp or "
                                   "$MESHLINK_ALLOW_PLAINTEXT=1.  Prints one line "
                                   "'serving NAME: URL...' when ready.  SIGTERM withdraws it.")
    p.add_argument("name")
    _add_common(p)
    p.add_argument("--bind", default="127.0.0.1",
                   help="address the TLS (and --tcp) listeners bind (default 127.0.0.1: "
                        "this host only)")
    p.add_argument("--advertise", action="append", metavar="ADDR",
                   help="address to advertise (repeatable; default: --bind)")
    p.add_argument("--tls-port", type=_port_arg, default=0, help="TLS port (default: any free)")
    tcp = p.add_mutually_exclusive_group()
    tcp.add_argument("--tcp", action="store_true",
                     help="also listen on plain TCP: anyone who can reach --bind may call "
                          "the service (default: off, or $MESHLINK_ALLOW_PLAINTEXT)")
    tcp.add_argument("--no-tcp", action="store_true",
                     help="no plain TCP listener, whatever $MESHLINK_ALLOW_PLAINTEXT says")
    p.add_argument("--tcp-port", type=_port_arg, default=None,
                   help="TCP port with --tcp (default: any free)")
    p.add_argument("--no-tls", action="store_true", help="no TLS listener")
    p.add_argument("--no-vchan", action="store_true", help="do not publish in the host store")
    p.add_argument("--require-tls", action="store_true", help="TLS only (no plain TCP)")
    p.add_argument("--allow-name", action="append", metavar="NAME",
                   help="client certificate name allowed (repeatable; default any the CA signed)")
    p.add_argument("--metrics", metavar="[HOST:]PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST default "
                        "127.0.0.1; needs prometheus_client; default: no metrics listener)")
    p.set_defaults(func=_cmd_serve_echo)

    p = sub.add_parser("resolve", help="show the endpoints a name resolves to",
                       description="Resolve NAME through the host store, the rules file, "
                                   "DNS and zeroconf, and print the endpoints in the order connect "
                                   "tries them.")
    p.add_argument("name")
    p.add_argument("--explain", action="store_true",
                   help="give the reason for each endpoint, rejected ones included")
    _add_client(p)
    p.set_defaults(func=_cmd_resolve)

    p = sub.add_parser("ls", help="list services (host store and zeroconf)",
                       description="List the services of the host store (live and stale) "
                                   "and, with zeroconf enabled, those answering on the network.")
    _add_common(p)
    p.set_defaults(func=_cmd_ls)

    p = sub.add_parser("connect", help="send stdin lines to a service, print the replies",
                       description="Connect to NAME; call METHOD with each line of stdin and "
                                   "print each reply.  The transport used goes to stderr.")
    p.add_argument("name")
    p.add_argument("--method", default="echo", help="method to call per line (echo)")
    _add_client(p)
    p.set_defaults(func=_cmd_connect)

    p = sub.add_parser("call", help="call one method and print the result as JSON",
                       description="Connect to NAME and call METHOD; each ARG is parsed as "
                                   "JSON when it is valid JSON, else passed as a string.")
    p.add_argument("name")
    p.add_argument("method")
    p.add_argument("args", nargs="*")
    _add_client(p)
    p.set_defaults(func=_cmd_call)

    add_stats_commands(sub, _add_client, _connect_kwargs)
