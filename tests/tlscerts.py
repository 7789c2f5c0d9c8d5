"""Certificates made at test time with the openssl command, for the TLS tests: a CA, a
server certificate for 127.0.0.1/localhost, a client certificate from that CA and one from
another CA, laid out in the folders libnbd (tls-certificates=DIR) and qemu
(tls-creds-x509,dir=DIR) read: ca-cert.pem, server-cert.pem, server-key.pem for a server,
ca-cert.pem, client-cert.pem, client-key.pem for a client.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nbdserve.server.settings import TlsSettings

CA_CONFIG = """\
[req]
distinguished_name = dn
x509_extensions = ca
prompt = no
[dn]
CN = {name}
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
"""
LEAF_EXTENSIONS = """\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = {usage}
"""


@dataclass
class Pki:
    server: Path      # ca-cert.pem, server-cert.pem, server-key.pem
    client: Path      # ca-cert.pem + a client certificate the CA signed
    no_cert: Path     # ca-cert.pem only
    wrong_ca: Path    # ca-cert.pem + a client certificate another CA signed

    def tls(self, mode: str = "require", verify_clients: bool = True) -> TlsSettings:
        return TlsSettings(cert=str(self.server / "server-cert.pem"), key=str(self.server / "server-key.pem"),
                         ca=str(self.server / "ca-cert.pem") if verify_clients else None, mode=mode)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(work: Path, name: str) -> None:
    (work / f"{name}.cnf").write_text(CA_CONFIG.format(name=f"nbdserve test {name}"))
    openssl("req", "-x509", "-config", f"{name}.cnf", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem", "-days", "2", cwd=work)


def make_leaf(work: Path, ca: str, name: str, serial: int, usage: str, alt_names: str = "",
              subject: str | None = None) -> None:
    """``work/NAME-cert.pem`` and ``NAME-key.pem``, signed by ``work/CA-cert.pem``; the
    subject is ``/CN=NAME`` unless given (openssl's -subj form, -multivalue-rdn)."""
    extensions = LEAF_EXTENSIONS.format(usage=usage) + (f"subjectAltName = {alt_names}\n" if alt_names else "")
    (work / f"{name}.ext").write_text(extensions)
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-multivalue-rdn",
            "-utf8", "-subj", subject or f"/CN={name}", cwd=work)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem",
            "-set_serial", str(serial), "-days", "2", "-extfile", f"{name}.ext",
            "-out", f"{name}-cert.pem", cwd=work)


def folder(root: Path, name: str, files: dict[str, Path]) -> Path:
    path = root / name
    path.mkdir()
    for target, source in files.items():
        shutil.copy(source, path / target)
    return path


def make_pki(root: Path) -> Pki:
    work = root / "work"
    work.mkdir()
    make_ca(work, "ca")
    make_ca(work, "other-ca")
    make_leaf(work, "ca", "server", 2, "serverAuth", "IP:127.0.0.1,DNS:localhost")
    make_leaf(work, "ca", "client", 3, "clientAuth")
    make_leaf(work, "other-ca", "stranger", 2, "clientAuth")
    ca = work / "ca-cert.pem"
    return Pki(
        server=folder(root, "server", {"ca-cert.pem": ca, "server-cert.pem": work / "server-cert.pem",
                                       "server-key.pem": work / "server-key.pem"}),
        client=folder(root, "client", {"ca-cert.pem": ca, "client-cert.pem": work / "client-cert.pem",
                                       "client-key.pem": work / "client-key.pem"}),
        no_cert=folder(root, "no-cert", {"ca-cert.pem": ca}),
        wrong_ca=folder(root, "wrong-ca", {"ca-cert.pem": ca, "client-cert.pem": work / "stranger-cert.pem",
                                           "client-key.pem": work / "stranger-key.pem"}),
    )
