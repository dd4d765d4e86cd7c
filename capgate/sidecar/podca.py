"""The per-pod CA that lets the outbound listener terminate TLS for declared ``https://`` upstreams.

An agent that calls ``https://payments.example.com`` by its real URL is captured by the pod's
egress rules and lands on the sidecar; to decide the call the sidecar must read it, so it answers
the handshake with a leaf certificate for that name, signed by a CA the agent containers trust.

* **The CA key exists only in this process's memory.** It is generated at sidecar start and never
  written anywhere (not the emptyDir, not a Secret, not a temp file): the leaf certificates are
  loaded into OpenSSL through an anonymous ``memfd``, because ``SSLContext.load_cert_chain`` only
  reads paths. A restarted sidecar has a new CA and rewrites the bundle; agent processes that
  cached the old CA fail their TLS handshakes (closed, never open) until they re-read it.
* **Only the certificate is shared**, as ``ca.crt`` in ``--ca-dir`` (an emptyDir the agent
  containers mount read-only; their ``SSL_CERT_FILE`` & co. point at it). It holds the pod CA alone,
  not the system roots: in a mediated pod every TLS connection an agent can complete ends at the
  sidecar, so nothing else needs trusting, and an agent that somehow reached a real server
  directly would fail its handshake instead of silently bypassing the gate.
* **Leaves are minted only for names the listener has already matched to a declared upstream**,
  cached per name (a capability has at most 64 upstreams), ECDSA P-256 (cheap to mint). The
  connection is handed that leaf's context directly, and its SNI callback refuses the handshake
  unless OpenSSL's reading of the name is the listener's: two parsers, one answer.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE = "ca.crt"
CA_LIFETIME = timedelta(days=365)
"""Longer than any sidecar process lives; a restart makes a new CA anyway."""
BACKDATE = timedelta(hours=1)
"""Tolerates clock skew between the sidecar and agent containers' view (same node, but still)."""


class LeafContext(ssl.SSLContext):
    """A server context for one vetted name; its handshake fails unless OpenSSL reads the same name."""

    host: str


def _same_name(sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, context: ssl.SSLContext) -> int | None:
    """The listener chose this leaf from its own reading of the ClientHello; OpenSSL must agree.

    Clients send no SNI for an IP-literal URL (RFC 6066 §3), so a leaf for an IP accepts no name too.
    """
    expected = getattr(context, "host", None)
    if name is not None and name.lower() == expected:
        return None
    if name is None and expected is not None and _is_ip(expected):
        return None
    return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


class PodCA:
    def __init__(self, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._not_before = now - BACKDATE
        self._not_after = now + CA_LIFETIME
        subject = _name(f"capgate pod CA {secrets.token_hex(4)}")
        public = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before).not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self._leaves: dict[str, LeafContext] = {}

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path) -> Path:
        """Publish the CA certificate (atomically: agents never read half a file)."""
        target = directory / CA_FILE
        partial = directory / f".{CA_FILE}.{os.getpid()}"
        partial.write_bytes(self.pem)
        partial.chmod(0o444)
        partial.replace(target)
        return target

    def leaf_pem(self, host: str) -> bytes:
        """Certificate and key for ``host`` (a DNS name or an IP literal), as one PEM blob."""
        key = ec.generate_private_key(ec.SECP256R1())
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host)) if _is_ip(host) else x509.DNSName(host)
        cert = (
            x509.CertificateBuilder().subject_name(_name(host[:64])).issuer_name(self.certificate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before).not_valid_after(self._not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def context_for(self, host: str) -> LeafContext:
        cached = self._leaves.get(host)
        if cached is not None:
            return cached
        context = LeafContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])  # the listener speaks HTTP/1.1 only
        context.host = host
        context.sni_callback = _same_name
        fd = os.memfd_create("capgate-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, self.leaf_pem(host))
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        self._leaves[host] = context
        return context
