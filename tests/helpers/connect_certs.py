"""Certificates for the connect tests, made with trustme."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

from meshlink.transport.tls import TLSConfig


@dataclass
class Certs:
    """A CA, a server certificate naming ``service`` and client certificates."""

    dir: Path
    ca: str
    server: str
    client: str
    other_client: str   # signed by the same CA, another name
    rogue_client: str   # signed by another CA
    rogue_ca: str

    def server_tls(self, allow: list[str] | None = None) -> TLSConfig:
        return TLSConfig(self.server, None, self.ca,
                         frozenset(allow) if allow is not None else None)

    def client_tls(self, which: str = "client") -> TLSConfig:
        return TLSConfig(getattr(self, which), None, self.ca)

    def env(self, which: str) -> dict[str, str]:
        return {"MESHLINK_TLS_CERT": getattr(self, which), "MESHLINK_TLS_CA": self.ca}


def make_certs(d: Path, service: str) -> Certs:
    d.mkdir(parents=True, exist_ok=True)
    ca, rogue = trustme.CA(), trustme.CA()
    paths: dict[str, str] = {}
    for key, issuer, name in (("server", ca, service), ("client", ca, "client-1"),
                              ("other_client", ca, "intruder"),
                              ("rogue_client", rogue, "client-1")):
        p = d / f"{key}.pem"
        issuer.issue_cert(name).private_key_and_cert_chain_pem.write_to_path(str(p))
        paths[key] = str(p)
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    rogue.cert_pem.write_to_path(str(d / "rogue-ca.pem"))
    return Certs(d, str(d / "ca.pem"), rogue_ca=str(d / "rogue-ca.pem"), **paths)
