"""The webhook's TLS: a private CA and a serving certificate, kept in a Secret the operator owns.

The API server calls admission webhooks over TLS and checks them against the ``caBundle`` of the
webhook configurations, so the operator keeps one CA (in Secret ``capgate-webhook-tls``), issues its
serving certificate from it, and writes the CA into the configurations it manages — the same job
cert-manager's cainjector does, without needing cert-manager (which the chart can use instead).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_LIFETIME = timedelta(days=3650)
SERVING_LIFETIME = timedelta(days=365)
RENEW_BEFORE = timedelta(days=30)


@dataclass(frozen=True)
class WebhookTLS:
    ca_pem: bytes
    ca_key_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path) -> tuple[Path, Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        paths = (directory / "ca.crt", directory / "tls.crt", directory / "tls.key")
        for path, data in zip(paths, (self.ca_pem, self.cert_pem, self.key_pem), strict=True):
            path.write_bytes(data)
        paths[2].chmod(0o600)
        return paths

    def as_secret_data(self) -> dict[str, bytes]:
        return {"ca.crt": self.ca_pem, "ca.key": self.ca_key_pem, "tls.crt": self.cert_pem, "tls.key": self.key_pem}

    def needs_renewal(self, hosts: list[str], now: datetime) -> bool:
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        if cert.not_valid_after_utc - RENEW_BEFORE < now:
            return True
        names = set(_sans(cert))
        return not set(hosts) <= names


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*ext.get_values_for_type(x509.DNSName), *(str(ip) for ip in ext.get_values_for_type(x509.IPAddress))]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "capgate"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_ca(now: datetime | None = None) -> tuple[bytes, bytes]:
    moment = now or datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("capgate-webhook-ca")).issuer_name(_name("capgate-webhook-ca"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(moment - timedelta(minutes=5)).not_valid_after(moment + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def issue(hosts: list[str], ca_pem: bytes | None = None, ca_key_pem: bytes | None = None,
          now: datetime | None = None) -> WebhookTLS:
    """A serving certificate for ``hosts`` (DNS names or IPs), from the given CA or a new one."""
    moment = now or datetime.now(UTC)
    if ca_pem is None or ca_key_pem is None:
        ca_pem, ca_key_pem = new_ca(moment)
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(moment - timedelta(minutes=5)).not_valid_after(moment + SERVING_LIFETIME)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return WebhookTLS(ca_pem=ca_pem, ca_key_pem=ca_key_pem, cert_pem=cert.public_bytes(serialization.Encoding.PEM),
                      key_pem=_pem_key(key))


def from_secret_data(data: dict[str, bytes]) -> WebhookTLS | None:
    try:
        return WebhookTLS(ca_pem=data["ca.crt"], ca_key_pem=data["ca.key"], cert_pem=data["tls.crt"],
                          key_pem=data["tls.key"])
    except KeyError:
        return None
