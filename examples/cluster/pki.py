"""A throwaway certificate authority for one run of the cluster example.

Made at start with the ``cryptography`` package (installed with the README's
``.[test,bench]`` extras, as a dependency of ``trustme``): a CA, a server
certificate naming the storage node's service (the name clients verify, for
the bus and for NBD alike) and one client certificate per worker or
subscriber (the storage node requires one signed by this CA: mutual TLS).
Keys are ECDSA P-256, valid for a day, written 0600 into a directory only
the caller can read; nothing outlives the run's temporary directory.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Identity:
    """One end's files: its certificate, its key, and the CA it trusts."""

    cert: str
    key: str
    ca: str

    def env(self) -> dict[str, str]:
        """As ``MESHLINK_TLS_*`` variables (what every node reads)."""
        return {"MESHLINK_TLS_CERT": self.cert, "MESHLINK_TLS_KEY": self.key,
                "MESHLINK_TLS_CA": self.ca}


def make_pki(d: Path, server: str, clients: list[str]) -> dict[str, Identity]:
    """Write a CA and certificates into ``d``; return each name's :class:`Identity`.

    Raises:
        SystemExit: ``cryptography`` is not installed (say how to get it).
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise SystemExit("the cluster example makes its certificates with the 'cryptography' "
                         "package: python3 -m pip install -e '.[test,bench]'") from None

    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            "meshlink cluster example CA")])
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, encipher_only=False, decipher_only=False)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     **usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = d / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(name: str, purpose: x509.ObjectIdentifier) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                         crl_sign=False, **usage), critical=True)
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = d / f"{name}.pem", d / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return Identity(str(cert_path), str(key_path), str(ca_path))

    ids = {server: issue(server, ExtendedKeyUsageOID.SERVER_AUTH)}
    ids.update((c, issue(c, ExtendedKeyUsageOID.CLIENT_AUTH)) for c in clients)
    return ids
