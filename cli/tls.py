"""Key material for a deployment: the coordinator's CA and server certificate, a site's node key.

Formats are the ones Flower 1.41 reads:

* ``flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``: PEM certificates and a
  PEM (PKCS#8) key; the server certificate carries every name sites and the SuperLink's own
  SuperExec dial as subjectAltNames (IP addresses as IP entries, names as DNS entries).
* ``flower-supernode --auth-supernode-private-key``: an **OpenSSH** private key of a NIST EC
  curve (``load_ssh_private_key``); ``flwr supernode register`` reads the OpenSSH public key
  (``load_ssh_public_key``, "P-384 or any other NIST EC curve"). We use P-384, Flower's example.

Every private key is written with mode 0600 from the start (never briefly world-readable).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from fedcl.config import ConfigError

CURVE_NAME = "secp384r1"
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest TLS server certificate lifetime clients commonly accept


def _curve():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.SECP384R1()


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file with mode 0600; refuses to replace an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)  # whatever the umask says
        fh.write(data)


def write_public(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file with mode 0644; refuses to replace an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o644)
        fh.write(data)


# --- a site's SuperNode key pair ---------------------------------------------------------------
def make_node_keys(private_path: Path, public_path: Path, comment: str = "") -> str:
    """Create the SuperNode's EC key pair (OpenSSH format); returns the public key line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(_curve())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = public.decode() + (f" {comment}" if comment else "")
    write_private(private_path, private)
    write_public(public_path, line.encode() + b"\n")
    return line


def check_node_public_key(path: Path, source: str) -> str:
    """The OpenSSH public key line in ``path`` if Flower accepts it; else a ConfigError."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.is_file():
        raise ConfigError(f"{source}: {path} does not exist (the site's node.pub)")
    data = path.read_bytes().strip()
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(
            f"{source}: {path} is not an OpenSSH public key ({err}); send the node.pub that "
            "`fedcl site init` printed"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(
            f"{source}: {path} is not an EC key: Flower's SuperNode authentication needs a NIST "
            "EC key such as the one `fedcl site init` makes"
        )
    return data.decode()


# --- the coordinator's CA and server certificate -----------------------------------------------
@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def san_entries(names: list[str]):
    """subjectAltName entries: IP addresses as IPAddress, everything else as DNSName."""
    from cryptography import x509

    entries, seen = [], set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def make_tls(folder: Path, *, federation: str, common_name: str, sans: list[str]) -> TLSFiles:
    """A CA (its key stays here) and a server certificate for ``sans``, signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(minutes=5)  # a site clock a little behind still accepts it
    ca_key = ec.generate_private_key(_curve())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"fedcl federation {federation}"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(_curve())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(san_entries(sans)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs8, none = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    files = TLSFiles(
        folder / "ca.crt", folder / "ca.key", folder / "server.crt", folder / "server.key"
    )
    write_private(files.ca_key, ca_key.private_bytes(pem, pkcs8, none))
    write_public(files.ca_cert, ca_cert.public_bytes(pem))
    write_private(files.server_key, key.private_bytes(pem, pkcs8, none))
    write_public(files.server_cert, cert.public_bytes(pem))
    return files


def load_certificate(path: Path):
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is not a PEM certificate: {err}") from None


def check_ca_certificate(path: Path) -> None:
    """Refuse a file that is not a CA certificate (a server certificate sent by mistake)."""
    from cryptography import x509

    cert = load_certificate(path)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"{path} is not a CA certificate (basicConstraints CA:TRUE is missing)")


def issued_by(cert_path: Path, ca_path: Path) -> bool:
    """Whether the certificate at ``cert_path`` is signed by the CA at ``ca_path``."""
    from cryptography.exceptions import InvalidSignature

    cert, ca = load_certificate(cert_path), load_certificate(ca_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def certificate_sans(path: Path) -> list[str]:
    """The subjectAltNames of a certificate, as strings."""
    from cryptography import x509

    ext = load_certificate(path).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return [str(v) for v in ext.value.get_values_for_type(x509.IPAddress)] + list(
        ext.value.get_values_for_type(x509.DNSName)
    )
