"""The federation's keys: a private CA, the SuperLink's TLS certificate, one key pair per SuperNode.

Made with the `cryptography` package on first use and kept in a git-ignored folder
(``.fedbrain/pki`` by default); later runs reuse them, so a hospital keeps its identity.

- ``ca.crt`` / ``ca.key``: a self-signed CA that only this federation trusts. SuperNodes and the
  ``flwr`` CLI get ``ca.crt`` as their root certificate; without it they cannot open TLS.
- ``superlink.crt`` / ``superlink.key``: the SuperLink's server certificate, signed by the CA,
  valid for the names and addresses SuperNodes dial (loopback by default).
- ``supernodes/<name>`` / ``<name>.pub``: an ECDSA P-384 key pair in OpenSSH format per
  hospital, the format ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read. The SuperLink admits only registered public keys.

Private keys are written with mode 0600, atomically (temp file + rename), never half-written.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Loopback names and addresses: what a SuperNode on this machine dials.
LOOPBACK = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
SERVER_DAYS = 365
# Renew the server certificate when less than this is left, so a run never starts near expiry.
RENEW_BEFORE = dt.timedelta(days=7)


@dataclass(frozen=True)
class Pki:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink.key"

    def supernode_key(self, name: str) -> Path:
        return self.root / "supernodes" / name

    def supernode_public_key(self, name: str) -> Path:
        return self.root / "supernodes" / f"{name}.pub"


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write atomically; private files are created 0600 before any byte lands in them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedbrain federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _alt_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _make_ca(pki: Pki) -> None:
    key = _new_key()
    name = _name("fedbrain federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(pki.ca_key, _pem_key(key), private=True)
    _write(pki.ca_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def _server_cert_usable(pki: Pki, hosts: tuple[str, ...]) -> bool:
    """The existing SuperLink certificate is signed by our CA, not near expiry, and names every host."""
    if not (pki.server_cert.is_file() and pki.server_key.is_file()):
        return False
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):  # a regenerated CA invalidates the old leaf
        return False
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return all(name in san for name in _alt_names(hosts))


def _make_server_cert(pki: Pki, hosts: tuple[str, ...]) -> None:
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedbrain superlink")).issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(pki.server_key, _pem_key(key), private=True)
    _write(pki.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def ensure_supernode_key(pki: Pki, name: str) -> tuple[Path, Path]:
    """(private, public) OpenSSH ECDSA P-384 key files for one SuperNode, made if absent."""
    private, public = pki.supernode_key(name), pki.supernode_public_key(name)
    if not (private.is_file() and public.is_file()):
        key = _new_key()
        _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()), private=True)
        _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n",
               private=False)
    return private, public


def ensure_pki(root: str | Path, hosts: tuple[str, ...] = LOOPBACK) -> Pki:
    """The CA and the SuperLink certificate under ``root``, made (or renewed) when needed."""
    pki = Pki(Path(root))
    pki.root.mkdir(parents=True, exist_ok=True)
    os.chmod(pki.root, 0o700)
    if not (pki.ca_cert.is_file() and pki.ca_key.is_file()):
        _make_ca(pki)
    hosts = tuple(dict.fromkeys((*LOOPBACK, *hosts)))
    if not _server_cert_usable(pki, hosts):
        _make_server_cert(pki, hosts)
    return pki
