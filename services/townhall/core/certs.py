"""Throwaway certificates for local TLS: a CA and certificates it signs (tests, `townhall certs`), and the
PEM keystore a Kafka broker reads.

`python -m townhall.core.certs keystore KEY CERT OUT` writes OUT as Kafka's PEM keystore wants it
(ssl.keystore.type=PEM): the key as unencrypted PKCS#8, then the certificate chain. Helm's genSignedCert
and cert-manager write PKCS#1 RSA keys, which Kafka does not read; the chart's bundled broker runs this in
an init container.
"""

from __future__ import annotations

import datetime
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID = datetime.timedelta(days=30)


@dataclass(frozen=True)
class Pem:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


class Authority:
    """A self-signed CA (P-256) that issues server and client certificates into `folder`."""

    def __init__(
        self, folder: Path, name: str = "Townhall dev CA", valid: datetime.timedelta = _VALID
    ) -> None:
        self._valid = valid
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + self._valid)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca = folder / "ca.pem"
        self.ca.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> Pem:
        """A certificate for `name` usable by servers (with these names) and as a client certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + self._valid)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        pem = Pem(self.folder / f"{name}.pem", self.folder / f"{name}-key.pem")
        pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        pem.key.chmod(0o600)
        return pem


def pem_keystore(key: Path, cert: Path, out: Path) -> Path:
    """Kafka's PEM keystore at `out`: `key` (any PEM private key) as PKCS#8, then `cert` (the chain)."""
    private = load_pem_private_key(key.read_bytes(), password=None)
    pkcs8 = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    out.write_bytes(pkcs8 + cert.read_bytes())
    out.chmod(0o600)
    return out


def main(argv: list[str]) -> int:
    """`keystore KEY CERT OUT`: see the module docstring."""
    if len(argv) != 4 or argv[0] != "keystore":
        print("usage: python -m townhall.core.certs keystore KEY CERT OUT", file=sys.stderr)
        return 2
    pem_keystore(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
