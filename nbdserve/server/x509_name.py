"""A certificate's subject as GnuTLS's gnutls_x509_crt_get_dn() writes it, which qemu
compares with --tls-authz identities (crypto/tlssession.c
qcrypto_tls_session_check_certificate): ``C=GB,O=Org\\, Inc.,CN=client`` -- the RDNs in
certificate (DER) order joined by ``,``, multi-valued ones by ``+``, names from GnuTLS's
OID table (lib/x509/common.c ``_oid2str``), values escaped as its str_escape() does
(RFC 4514), an unknown attribute as ``OID=#HEX`` of its DER encoding.

A minimal DER reader of the Name in tbsCertificate (RFC 5280 4.1), nothing more.
"""

from __future__ import annotations

# GnuTLS's _oid2str names (lib/x509/common.c)
OID_NAMES = {
    "2.5.4.6": "C", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.3": "CN", "2.5.4.7": "L", "2.5.4.8": "ST",
    "2.5.4.9": "street", "2.5.4.12": "title", "2.5.4.13": "description", "2.5.4.5": "serialNumber",
    "2.5.4.20": "telephoneNumber", "2.5.4.4": "surName", "2.5.4.43": "initials",
    "2.5.4.44": "generationQualifier", "2.5.4.42": "givenName", "2.5.4.65": "pseudonym",
    "2.5.4.46": "dnQualifier", "2.5.4.17": "postalCode", "2.5.4.41": "name", "2.5.4.15": "businessCategory",
    "0.9.2342.19200300.100.1.25": "DC", "0.9.2342.19200300.100.1.1": "UID",
    "1.2.840.113556.1.4.656": "userPrincipalName",
    "1.3.6.1.4.1.311.60.2.1.1": "jurisdictionOfIncorporationLocalityName",
    "1.3.6.1.4.1.311.60.2.1.2": "jurisdictionOfIncorporationStateOrProvinceName",
    "1.3.6.1.4.1.311.60.2.1.3": "jurisdictionOfIncorporationCountryName",
    "1.3.6.1.5.5.7.9.2": "placeOfBirth", "1.3.6.1.5.5.7.9.3": "gender",
    "1.3.6.1.5.5.7.9.4": "countryOfCitizenship", "1.3.6.1.5.5.7.9.5": "countryOfResidence",
    "1.2.840.113549.1.9.1": "EMAIL", "1.3.6.1.5.5.7.8.5": "XmppAddr",
}
SEQUENCE, SET, OID, CONTEXT_0 = 0x30, 0x31, 0x06, 0xA0
UTF8, PRINTABLE, TELETEX, IA5, UNIVERSAL, BMP = 0x0C, 0x13, 0x14, 0x16, 0x1C, 0x1E
ESCAPED = set(',+"\\<>;')


class DerError(ValueError):
    """Not the DER of a certificate."""


def _tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, contents, end) of the element at ``pos`` (X.690 8.1: definite lengths only)."""
    if pos + 2 > len(data):
        raise DerError("truncated element")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or pos + count > len(data):
            raise DerError("bad length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise DerError("truncated element")
    return tag, data[pos:pos + length], pos + length


def _elements(data: bytes):
    pos = 0
    while pos < len(data):
        tag, contents, end = _tlv(data, pos)
        yield tag, contents, data[pos:end]
        pos = end


def _oid(contents: bytes) -> str:
    """X.690 8.19: base-128 arcs, the first two packed into the first."""
    arcs, value = [], 0
    for byte in contents:
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2) if arcs else 0
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]])) if arcs else ""


def _value_text(tag: int, contents: bytes) -> str | None:
    """The string GnuTLS prints for a known attribute, or None for its #HEX form."""
    try:
        if tag in (UTF8, PRINTABLE, IA5):
            text = contents.decode("utf-8")
        elif tag == TELETEX and contents.isascii():   # make_printable_string: ASCII only
            text = contents.decode("ascii")
        elif tag == BMP:
            text = contents.decode("utf-16-be")
        else:
            return None
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text


def _escape(text: str) -> str:
    """GnuTLS str_escape() (lib/x509/common.c)."""
    out = []
    for i, ch in enumerate(text):
        if ch in ESCAPED or (i == 0 and ch in "# ") or (i == len(text) - 1 and ch == " "):
            out.append("\\")
        out.append(ch)
    return "".join(out)


def _attribute(encoded: bytes) -> str:
    tag, contents, _ = _tlv(encoded, 0)
    parts = list(_elements(contents))
    if tag != SEQUENCE or len(parts) != 2 or parts[0][0] != OID:
        raise DerError("bad AttributeTypeAndValue")
    oid = _oid(parts[0][1])
    value_tag, value, value_encoded = parts[1]
    name = OID_NAMES.get(oid)
    text = _value_text(value_tag, value) if name is not None else None
    if text is None:
        return f"{name or oid}=#{value_encoded.hex()}"
    return f"{name}={_escape(text)}"


def subject_dn(certificate: bytes) -> str:
    """The subject of the DER ``certificate`` in gnutls_x509_crt_get_dn()'s form."""
    tag, cert, _ = _tlv(certificate, 0)
    if tag != SEQUENCE:
        raise DerError("not a certificate")
    tag, tbs, _ = _tlv(cert, 0)
    fields = list(_elements(tbs))
    if tag != SEQUENCE or not fields:
        raise DerError("no tbsCertificate")
    if fields[0][0] == CONTEXT_0:      # version
        fields = fields[1:]
    if len(fields) < 5 or fields[4][0] != SEQUENCE:   # serial, signature, issuer, validity, subject
        raise DerError("no subject")
    rdns = []
    for rdn_tag, rdn, _ in _elements(fields[4][1]):
        if rdn_tag != SET:
            raise DerError("bad RelativeDistinguishedName")
        rdns.append("+".join(_attribute(encoded) for _, _, encoded in _elements(rdn)))
    return ",".join(rdns)
