"""The consortium's credentials, made by one command (``synthlearn server credentials``): a certificate authority,
the server's TLS certificate signed by it, and one EC P-384 key pair per site for SuperNode authentication (Flower
admits only SuperNodes whose public key the server registered).

What goes where: the server keeps ``ca.key`` (offline once the certificates are made), ``server.pem`` and
``server.key``; every site receives ``ca.crt`` (to verify the server) and its own ``sites/<site>.key``; the server
registers every ``sites/<site>.pub``. No private key ever leaves the machine that needs it.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

#: file names inside a credentials folder
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, SITES = "ca.crt", "ca.key", "server.pem", "server.key", "sites"
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _private_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def make_credentials(out: str | Path, sites: Sequence[str], *, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                     days: int = 365, name: str = "synthlearn consortium") -> dict[str, Path]:
    """Write a CA, a server certificate valid for ``hosts`` and a key pair per site into ``out``.

    Args:
        out: a new or empty folder.
        sites: the site names (one key pair each: ``sites/<site>.key`` and ``sites/<site>.pub``, OpenSSH format).
        hosts: the names and IP addresses the sites use to reach the server (the certificate's subject alternative
            names; a site that dials another name is refused by TLS). 127.0.0.1 and localhost are always added:
            the server's own commands dial the SuperLink there.
        days: validity of the certificates.
        name: the CA's common name.

    Returns:
        Name -> path of what was written (``ca.crt``, ``server.pem``, ..., ``site:<name>.key``/``.pub``).

    Raises:
        FileExistsError: ``out`` already holds credentials (nothing is overwritten).
        ValueError: no site, a duplicate or a site name that is not a plain word, or no host.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(out)
    if not sites:
        raise ValueError("credentials: name at least one site (--site NAME, once per site)")
    bad = [s for s in sites if not _SITE_NAME.match(s)]
    if bad or len(set(sites)) != len(sites):
        raise ValueError(f"credentials: site names must be unique words of letters, digits, '.', '_' or '-'; found "
                         f"{list(sites)}")
    if not hosts:
        raise ValueError("credentials: name at least one host the sites will dial (--host)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: already holds files {sorted(p.name for p in out.iterdir())[:8]}; credentials "
                              "are never overwritten: choose a new folder")
    (out / SITES).mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    hosts = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
    alt: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0]))]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(x509.SubjectAlternativeName(alt), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
    written = {CA_CERT: out / CA_CERT, CA_KEY: out / CA_KEY, SERVER_CERT: out / SERVER_CERT,
               SERVER_KEY: out / SERVER_KEY}
    written[CA_CERT].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(written[CA_KEY], _private_pem(ca_key))
    written[SERVER_CERT].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(written[SERVER_KEY], _private_pem(server_key))
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = out / SITES / f"{site}.key", out / SITES / f"{site}.pub"
        _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH) + f" {site}\n".encode())
        written[f"site:{site}.key"], written[f"site:{site}.pub"] = private, public
    return written


def site_public_keys(folder: str | Path) -> dict[str, Path]:
    """Site name -> public key file of a credentials folder's ``sites/`` (or of a folder of ``<site>.pub``).

    Raises:
        FileNotFoundError: no ``.pub`` file there.
    """
    folder = Path(folder)
    keys_dir = folder / SITES if (folder / SITES).is_dir() else folder
    keys = {p.stem: p for p in sorted(keys_dir.glob("*.pub"))}
    if not keys:
        raise FileNotFoundError(f"{keys_dir}: no site public key (<site>.pub); make them with `synthlearn server "
                                "credentials --out DIR --site NAME ...`")
    return keys


__all__ = ["CA_CERT", "CA_KEY", "SERVER_CERT", "SERVER_KEY", "SITES", "make_credentials", "site_public_keys"]
