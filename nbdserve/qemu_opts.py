"""qemu's option strings for ``nbdserve-qemu-nbd``: ``--object`` (the tls-creds-x509 and
authz-simple types), ``--tls-creds``/``--tls-authz`` onto a TlsSettings, and
``--image-opts`` (the qcow2/raw/file subset).  Anything else is refused by name.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from .blockdev.probe import FORMATS
from .cli.errors import EXIT_USAGE, CliError
from .server.settings import TlsSettings

# qemu's QOM types qemu-nbd takes, and what to use instead of those refused
REFUSED_OBJECTS = {
    "tls-creds-psk": "pre-shared keys are not supported (use tls-creds-x509)",
    "tls-creds-anon": "anonymous TLS is not supported (use tls-creds-x509)",
    "secret": "secrets are not supported (encrypted keys and images are not)",
    "authz-list": "not supported (use authz-simple)",
    "authz-listfile": "not supported (use authz-simple)",
    "authz-pam": "not supported (use authz-simple)",
}
X509_SERVER_FILES = (   # crypto/tlscredsx509.c qcrypto_tls_creds_x509_load, endpoint=server: (name, required)
    ("ca-cert.pem", True), ("ca-crl.pem", False), ("server-cert.pem", True), ("server-key.pem", True),
    ("dh-params.pem", False))
BOOLEANS = {"on": True, "yes": True, "true": True, "y": True,
            "off": False, "no": False, "false": False, "n": False}   # qapi_bool_parse


def parse_opts(text: str, implied: str, flag: str) -> dict[str, str]:
    """``implied-value,key=value,...`` (util/keyval.c: ``,,`` is a comma in a value; the
    first item may leave out ``implied=``)."""
    items, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    items.append("".join(current))
    opts: dict[str, str] = {}
    for n, item in enumerate(items):
        key, sep, value = item.partition("=")
        if not sep:
            if n != 0:
                raise CliError(f"{flag}: expected '=' after parameter '{item}'", EXIT_USAGE)
            key, value = implied, item
        if key in opts:
            raise CliError(f"{flag}: parameter '{key}' given twice", EXIT_USAGE)
        opts[key] = value
    return opts


def _boolean(flag: str, key: str, value: str) -> bool:
    if value not in BOOLEANS:
        raise CliError(f"{flag}: parameter '{key}' expects 'on' or 'off'", EXIT_USAGE)
    return BOOLEANS[value]


def _refuse_unknown(flag: str, opts: dict[str, str], known: tuple[str, ...], what: str) -> None:
    for key in opts:
        if key not in known:
            raise CliError(f"{flag}: property '{key}' is not supported ({what} takes {', '.join(known)})",
                           EXIT_USAGE)


@dataclass
class TlsCredsX509:
    """qemu's tls-creds-x509 object (crypto/tlscredsx509.c), endpoint=server."""

    id: str
    dir: str
    endpoint: str = "client"        # qemu's default (QCryptoTLSCredsEndpoint 0)
    verify_peer: bool = True        # qcrypto_tls_creds_init: verifyPeer = true
    sanity_check: bool = True       # qcrypto_tls_creds_x509_init: sanityCheck = true

    def files(self) -> dict[str, str | None]:
        """qcrypto_tls_creds_get_path for each file: its path, or None (optional, absent)."""
        found = {}
        for name, required in X509_SERVER_FILES:
            path = os.path.join(self.dir, name)
            try:
                os.stat(path)
            except OSError as e:
                if required or not isinstance(e, FileNotFoundError):
                    raise CliError(f"Unable to access credentials {path}: {e.strerror}") from None
                path = None
            found[name] = path
        return found


@dataclass
class AuthzSimple:
    """qemu's authz-simple object (authz/simple.c): one identity, compared as a string."""

    id: str
    identity: str


def parse_object(text: str) -> TlsCredsX509 | AuthzSimple:
    """One ``--object TYPE,id=ID,...`` (qom/object_interfaces.c user_creatable_add_from_str)."""
    if text.startswith("{"):
        raise CliError("--object: JSON object definitions are not supported (use TYPE,id=ID,...)", EXIT_USAGE)
    opts = parse_opts(text, "qom-type", "--object")
    kind = opts.pop("qom-type", "")
    flag = f"--object {kind}"
    if kind in REFUSED_OBJECTS:
        raise CliError(f"{flag}: {REFUSED_OBJECTS[kind]}", EXIT_USAGE)
    if kind not in ("tls-creds-x509", "authz-simple"):
        raise CliError(f"{flag}: not supported (nbdserve-qemu-nbd takes tls-creds-x509 and authz-simple)",
                       EXIT_USAGE)
    if not opts.get("id"):
        raise CliError(f"{flag}: parameter 'id' is missing", EXIT_USAGE)
    if kind == "authz-simple":
        _refuse_unknown(flag, opts, ("id", "identity"), kind)
        if "identity" not in opts:
            raise CliError(f"{flag}: parameter 'identity' is missing", EXIT_USAGE)
        return AuthzSimple(opts["id"], opts["identity"])
    _refuse_unknown(flag, opts, ("id", "dir", "endpoint", "verify-peer", "sanity-check"), kind)
    creds = TlsCredsX509(opts["id"], opts.get("dir", ""), opts.get("endpoint", "client"))
    if creds.endpoint not in ("client", "server"):
        raise CliError(f"{flag}: endpoint '{creds.endpoint}' (expected server or client)", EXIT_USAGE)
    if "verify-peer" in opts:
        creds.verify_peer = _boolean(flag, "verify-peer", opts["verify-peer"])
    if "sanity-check" in opts:
        creds.sanity_check = _boolean(flag, "sanity-check", opts["sanity-check"])
    if not creds.dir:
        raise CliError("Missing 'dir' property value", EXIT_USAGE)
    if creds.endpoint == "server":
        files = creds.files()     # qemu loads them when the object is made
        if files["ca-crl.pem"] is not None:
            raise CliError(f"{files['ca-crl.pem']}: certificate revocation lists are not supported", EXIT_USAGE)
    return creds


def _sanity_check(tls: TlsSettings, ca: str) -> None:
    """qcrypto_tls_creds_x509_sanity_check: the server's own certificate must verify
    against the CA as a client verifies it (OpenSSL: chain, dates, purpose), here in a
    handshake through memory with the server's own context."""
    from .server.tls import TlsSetupError, server_context
    try:
        server = server_context(TlsSettings(cert=tls.cert, key=tls.key))
    except TlsSetupError as e:
        raise CliError(str(e)) from None
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    try:
        client.load_verify_locations(cafile=ca)
    except ssl.SSLError:
        raise CliError(f"{ca}: no PEM CA certificate in it") from None
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    ours = client.wrap_bio(to_client, to_server)
    theirs = server.wrap_bio(to_server, to_client, server_side=True)
    for _ in range(8):      # TLS 1.3: three flights
        try:
            ours.do_handshake()
            return
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLCertVerificationError as e:
            raise CliError(f"Our own certificate {tls.cert} failed validation against {ca}: "
                           f"{e.verify_message}") from None
        try:
            theirs.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as e:
            raise CliError(f"{tls.cert}: the TLS handshake with it fails: {e.reason or e}") from None
    raise CliError(f"Our own certificate {tls.cert} could not be checked against {ca}")


def tls_config(objects: dict[str, TlsCredsX509 | AuthzSimple], creds_id: str | None,
               authz_id: str | None) -> TlsSettings | None:
    """--tls-creds ID [--tls-authz ID] (qemu-nbd.c main, nbd_get_tls_creds): TLS required."""
    if creds_id is None:
        if authz_id is not None:
            raise CliError("--tls-authz is not permitted without --tls-creds", EXIT_USAGE)
        return None
    creds = objects.get(creds_id)
    if creds is None:
        raise CliError(f"Failed to get TLS creds: No TLS credentials with id '{creds_id}'", EXIT_USAGE)
    if not isinstance(creds, TlsCredsX509):
        raise CliError(f"Failed to get TLS creds: Object with id '{creds_id}' is not TLS credentials", EXIT_USAGE)
    if creds.endpoint != "server":
        raise CliError("Failed to get TLS creds: Expected TLS credentials for a server endpoint", EXIT_USAGE)
    files = creds.files()
    tls = TlsSettings(cert=files["server-cert.pem"], key=files["server-key.pem"],
                    ca=files["ca-cert.pem"] if creds.verify_peer else None, mode="require")
    if creds.sanity_check:
        _sanity_check(tls, files["ca-cert.pem"])
    if authz_id is not None:
        authz = objects.get(authz_id)
        if not isinstance(authz, AuthzSimple):   # qemu would refuse every client: qauthz_is_allowed_by_id
            raise CliError(f"--tls-authz: no authz-simple object with id '{authz_id}'", EXIT_USAGE)
        if not creds.verify_peer:   # qemu checks no identity without verify-peer: refused, not ignored
            raise CliError(f"--tls-authz needs verify-peer=on in tls-creds-x509 '{creds_id}'", EXIT_USAGE)
        tls.identity = authz.identity
    return tls


def image_from_opts(text: str) -> tuple[str, str | None]:
    """--image-opts FILE (qemu-nbd.c: qemu_opts_parse_noisily, implied key "file"): the
    subset ``[driver=qcow2|raw,]file.filename=PATH[,file.driver=file]`` and
    ``driver=file,filename=PATH``.  Returns (path, format or None: probed)."""
    flag = "--image-opts"
    opts = parse_opts(text, "file", flag)
    if "file" in opts:
        raise CliError(f"{flag}: file={opts['file']}: node references are not supported "
                       "(give file.filename=PATH)", EXIT_USAGE)
    driver = opts.get("driver")
    if driver == "file":
        _refuse_unknown(flag, opts, ("driver", "filename"), "driver=file")
        if not opts.get("filename"):
            raise CliError(f"{flag}: the 'file' block driver requires a file name", EXIT_USAGE)
        return opts["filename"], "raw"
    if driver is not None and driver not in FORMATS:
        raise CliError(f"{flag}: driver={driver}: nbdserve serves qcow2, raw and file only", EXIT_USAGE)
    _refuse_unknown(flag, opts, ("driver", "file.driver", "file.filename"), f"driver={driver or '(probed)'}")
    if opts.get("file.driver", "file") != "file":
        raise CliError(f"{flag}: file.driver={opts['file.driver']}: only the file protocol is supported",
                       EXIT_USAGE)
    if not opts.get("file.filename"):
        raise CliError(f'{flag}: a block device must be specified for "file" (file.filename=PATH)', EXIT_USAGE)
    return opts["file.filename"], driver
