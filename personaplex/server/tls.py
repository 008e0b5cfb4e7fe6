"""``--ssl DIR``: HTTPS with the certificate in DIR, or a self-signed one generated there.

``DIR/cert.pem`` and ``DIR/key.pem`` are used as they are when both exist. Otherwise a self-signed
certificate (ECDSA P-256, one year) is generated with the ``cryptography`` library for ``localhost``,
``127.0.0.1``, ``::1``, this host's name and its addresses, and written there (the key readable by the
owner only). Nothing is downloaded, no trust store is touched, and a failure is an error: the server
never falls back to plain HTTP.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from ..errors import PersonaplexError

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"


class TLSError(PersonaplexError):
    """The certificate folder cannot be used or filled."""


def tls_context(folder: str | Path) -> tuple[ssl.SSLContext, bool]:
    """A server TLS context from ``folder``; the bool says whether a certificate was generated now."""
    folder = Path(folder).expanduser()
    cert, key = folder / CERT_FILE, folder / KEY_FILE
    generated = False
    if cert.exists() != key.exists():
        missing = key if cert.exists() else cert
        raise TLSError(f"{missing} is missing: put both {CERT_FILE} and {KEY_FILE} in {folder}, or neither to "
                       "generate a self-signed certificate")
    if not cert.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_self_signed(cert, key, local_names())
        except OSError as exc:
            raise TLSError(f"cannot write a certificate into {folder} ({exc}); pass a writable folder to --ssl") from exc
        generated = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise TLSError(f"cannot load {cert} / {key} ({exc}); fix or remove them to generate new ones") from exc
    return context, generated


def local_names() -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) this machine answers to, found without any network traffic."""
    names = ["localhost"]
    addresses = {"127.0.0.1", "::1"}
    hostname = socket.gethostname()
    if hostname and hostname != "localhost" and all(part.isalnum() or "-" in part for part in hostname.split(".")):
        names.append(hostname)
    try:
        for info in socket.getaddrinfo(hostname, None):
            addresses.add(info[4][0].split("%")[0])
    except OSError:
        pass
    route = lan_address()
    if route:
        addresses.add(route)
    return names, sorted(addresses)


def lan_address() -> str | None:
    """The address of the interface that routes to other hosts (a UDP 'connect' sends no packet)."""
    for target in ("10.254.254.254", "192.0.2.1"):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((target, 9))
                address = probe.getsockname()[0]
            if address and not address.startswith("127.") and address != "0.0.0.0":
                return address
        except OSError:
            continue
    return None


def write_self_signed(cert_path: Path, key_path: Path, names: tuple[list[str], list[str]], days: int = 365) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    dns_names, ip_addresses = names
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "personaplex (self-signed)")])
    now = datetime.datetime.now(datetime.timezone.utc)
    alternative = [x509.DNSName(name) for name in dns_names]
    alternative += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
