"""`loom tls init DIR`: a CA and the certificates a local cluster and its clients use
(ADR 0015), made with the `cryptography` package.

What it writes (keys 0600, certificates 0644; nothing is overwritten):
- `ca.pem`, `ca-key.pem`: the CA (keep its key to sign more certificates, or delete it);
- `node.pem`, `node-key.pem`: the cluster certificate, organizational unit
  `loom-cluster`, for the shard manager, nodes and schedulers (server and client use:
  cluster-internal traffic is mutual TLS);
- `client.pem`, `client-key.pem`: a client certificate (unit `loom-client`), optional for
  clients, refused for cluster-internal messages.
The server certificates name 127.0.0.1, ::1 and localhost, plus any `hosts` given.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from loom.core.errors import InvalidArgument
from loom.runtime.tls import CLIENT_UNIT, CLUSTER_UNIT, TlsConfig

VALID_DAYS = 825  # the longest validity platforms accept for a server certificate
DEFAULT_HOSTS = ("127.0.0.1", "::1", "localhost")
ORGANIZATION = "loom"


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateFiles:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def cert(self, role: str) -> Path:
        return self.directory / f"{role}.pem"

    def key(self, role: str) -> Path:
        return self.directory / f"{role}-key.pem"

    def cluster(self) -> TlsConfig:
        """What the cluster's processes use."""
        return TlsConfig(ca=self.ca, cert=self.cert("node"), key=self.key("node"))

    def client(self) -> TlsConfig:
        """What a client presenting the client certificate uses."""
        return TlsConfig(ca=self.ca, cert=self.cert("client"), key=self.key("client"))

    def exist(self) -> bool:
        return all(
            p.is_file() for p in (self.ca, self.cert("node"), self.key("node"), self.cert("client"))
        )


def init_certificates(directory: Path, hosts: Sequence[str] = ()) -> CertificateFiles:
    """Writes a new CA, node and client certificate into `directory`."""
    files = CertificateFiles(directory=directory)
    directory.mkdir(parents=True, exist_ok=True)
    planned = [files.ca, files.key("ca")] + [
        p for role in ("node", "client") for p in (files.cert(role), files.key(role))
    ]
    present = [str(p) for p in planned if p.exists()]
    if present:
        raise InvalidArgument(f"not overwriting {', '.join(present)}")
    names = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("loom CA", "loom-ca")
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(files.key("ca"), _key_bytes(ca_key), private=True)
    _write(files.ca, ca.public_bytes(serialization.Encoding.PEM), private=False)
    roles = (
        ("node", CLUSTER_UNIT, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
        ("client", CLIENT_UNIT, [ExtendedKeyUsageOID.CLIENT_AUTH]),
    )
    for role, unit, usages in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _builder(_name(f"loom {role}", unit), ca_name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .add_extension(x509.SubjectAlternativeName(_alt_names(names)), critical=False)
        )
        certificate = builder.sign(ca_key, hashes.SHA256())
        _write(files.key(role), _key_bytes(key), private=True)
        _write(
            files.cert(role), certificate.public_bytes(serialization.Encoding.PEM), private=False
        )
    return files


def _name(common: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    return alt


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Created with its final mode: a key is never readable by others, even briefly."""
    mode = 0o600 if private else 0o644
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.chmod(path, mode)  # the umask may have taken bits off a certificate's mode
