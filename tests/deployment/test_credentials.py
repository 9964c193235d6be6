"""The consortium's credentials: a CA, a server certificate for the hosts the sites dial, a key pair per site."""

from __future__ import annotations

import pytest

from synthlearn.deployment.credentials import make_credentials, site_public_keys


def test_credentials_chain_hosts_and_site_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    written = make_credentials(tmp_path / "c", ["site-a", "site_b"], hosts=["10.0.0.5", "server.example"])
    ca = x509.load_pem_x509_certificate(written["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(written["server.pem"].read_bytes())
    server.verify_directly_issued_by(ca)  # raises when the server certificate is not the CA's
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # the names the sites dial, and loopback, where the server's own commands dial its SuperLink
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["server.example", "localhost"]
    for site in ("site-a", "site_b"):
        public = serialization.load_ssh_public_key(written[f"site:{site}.pub"].read_bytes())
        assert isinstance(public.curve, ec.SECP384R1)  # Flower admits NIST curves only
        private = serialization.load_ssh_private_key(written[f"site:{site}.key"].read_bytes(), None)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert written[f"site:{site}.key"].stat().st_mode & 0o077 == 0  # private keys readable by the owner only
    assert written["ca.key"].stat().st_mode & 0o077 == 0
    assert set(site_public_keys(tmp_path / "c")) == {"site-a", "site_b"}


def test_credentials_refuse_overwrite_and_bad_names(tmp_path):
    make_credentials(tmp_path / "c", ["a"])
    before = (tmp_path / "c" / "ca.crt").read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        make_credentials(tmp_path / "c", ["a"])
    assert (tmp_path / "c" / "ca.crt").read_bytes() == before
    for sites in ([], ["a", "a"], ["../x"], ["a b"]):
        with pytest.raises(ValueError, match="site"):
            make_credentials(tmp_path / "d", sites)
    assert not (tmp_path / "d").exists()
    with pytest.raises(FileNotFoundError, match="no site public key"):
        site_public_keys(tmp_path)


def test_the_servers_own_connection_dials_loopback_when_it_listens_everywhere(tmp_path):
    from synthlearn.deployment.runner import write_connection

    text = write_connection(tmp_path, "0.0.0.0:9300", tmp_path / "ca.crt").read_text()
    assert 'address = "127.0.0.1:9300"' in text and "root-certificates" in text
    assert 'address = "10.1.2.3:9300"' in write_connection(tmp_path, "10.1.2.3:9300", tmp_path / "ca.crt").read_text()
