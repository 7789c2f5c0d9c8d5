"""Option haggling (proto.md: "Fixed newstyle negotiation", "Option types", "TLS support")."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from construct import ConstructError

from . import wire
from .constants import MAX_STRING, ClientFlag, Info, Option, Reply, TransmissionFlag
from .exports import ExportCatalog, ExportInfo


class TlsMode(Enum):
    """The server's TLS policy (proto.md: "Server-side requirements"; nbdkit --tls=off|on|require)."""

    OFF = "off"             # NOTLS: NBD_OPT_STARTTLS is unsupported
    ON = "on"               # TLS offered, plain clients served too (SELECTIVETLS without TLS-only exports)
    REQUIRE = "require"     # FORCEDTLS: nothing but STARTTLS and ABORT before TLS


@dataclass
class OptionOutcome:
    """What an option did: reply bytes, and whether haggling ends or TLS starts."""

    replies: bytes
    go: ExportInfo | None = None     # enter transmission on this export
    close: str | None = None         # end the session ("abort", "unknown export")
    start_tls: bool = False          # the replies hold STARTTLS's ACK: TLS starts after them


def option_name(option: int) -> str:
    try:
        return Option(option).name
    except ValueError:
        return f"OPTION_{option}"


def reply(option: int, reply_type: Reply, data: bytes = b"") -> bytes:
    return wire.OptionReply.build(dict(option=option, reply=reply_type, data=data))


def error_reply(option: int, reply_type: Reply, message: str) -> bytes:
    return reply(option, reply_type, message.encode()[:MAX_STRING])


def _parse_exact(declaration, payload: bytes):
    """Parse ``payload`` as ``declaration``; None unless it is exactly that long."""
    try:
        parsed = declaration.parse(payload)
        if len(declaration.build(parsed)) != len(payload):
            return None
        return parsed
    except (ConstructError, UnicodeError):
        return None


@dataclass
class Negotiation:
    """The per-connection negotiated state."""

    catalog: ExportCatalog
    tls_mode: TlsMode = TlsMode.OFF
    offer_extended_headers: bool = True             # False: NBD_OPT_EXTENDED_HEADERS is unsupported
    tls: bool = False                               # STARTTLS acknowledged
    tls_refused: bool = False                       # an option was refused because TLS had not started
    client_flags: ClientFlag = ClientFlag(0)
    structured_replies: bool = False
    extended_headers: bool = False                  # NBD_OPT_EXTENDED_HEADERS acknowledged
    meta_export: str | None = None                  # export SET_META_CONTEXT named
    meta_contexts: dict[int, str] = field(default_factory=dict)
    options_seen: list[str] = field(default_factory=list)

    @property
    def chunked_replies(self) -> bool:
        """Replies are chunks (structured or extended): reply payloads and meta contexts may be used."""
        return self.structured_replies or self.extended_headers

    def export_flags(self, export: ExportInfo) -> int:
        flags = export.flags
        if not self.chunked_replies:
            flags &= ~int(TransmissionFlag.SEND_DF)   # proto.md: "NBD_FLAG_SEND_DF" MUST be clear
        # proto.md: BLOCK_STATUS_PAYLOAD only after extended headers (its payload form is not served)
        return int(flags) & ~int(TransmissionFlag.BLOCK_STATUS_PAYLOAD)

    def handle(self, option: int, payload: bytes) -> OptionOutcome:
        self.options_seen.append(option_name(option))
        refusal = self._tls_refusal(option)
        if refusal is not None:
            return refusal
        handler = _HANDLERS.get(option)
        if handler is None:   # PEEK_EXPORT, unknown
            return _unsupported(option)
        return handler(self, option, payload)

    def too_big(self, option: int) -> bytes:
        self.options_seen.append(option_name(option))
        refusal = self._tls_refusal(option)
        if refusal is not None:
            return refusal.replies
        return error_reply(option, Reply.ERR_TOO_BIG, "option data too long")

    def _tls_refusal(self, option: int) -> OptionOutcome | None:
        """proto.md: "FORCEDTLS mode": before TLS, every option but STARTTLS and ABORT
        gets NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME, which cannot fail, ends
        the session.  A client without C_FIXED_NEWSTYLE cannot have TLS and may not
        be sent ERR_TLS_REQD ("NOTLS mode"): it gets ERR_POLICY."""
        if self.tls_mode is not TlsMode.REQUIRE or self.tls or option in (Option.STARTTLS, Option.ABORT):
            return None
        self.tls_refused = True
        if option == Option.EXPORT_NAME:
            return OptionOutcome(b"", close="NBD_OPT_EXPORT_NAME before TLS (TLS is required)")
        if not self.client_flags & ClientFlag.C_FIXED_NEWSTYLE:
            return OptionOutcome(error_reply(option, Reply.ERR_POLICY,
                                             "TLS is required, and needs fixed newstyle negotiation"))
        return OptionOutcome(error_reply(option, Reply.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS"))

    # -- handlers, one per option
    def _export_name(self, option, payload):
        if self.extended_headers:   # proto.md: "MUST NOT use this option"; it cannot fail
            return OptionOutcome(b"", close="NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS")
        try:
            name = payload.decode()
        except UnicodeError:
            return OptionOutcome(b"", close="export name is not UTF-8")
        export = self.catalog.lookup(name)
        if export is None:
            return OptionOutcome(b"", close=f"unknown export {name!r}")   # proto.md: MUST terminate
        self._select_contexts_for(export)
        data = wire.ExportNameReply.build(dict(size=export.size, flags=self.export_flags(export)))
        if not self.client_flags & ClientFlag.C_NO_ZEROES:
            data += bytes(124)
        return OptionOutcome(data, go=export)

    def _start_tls(self, option, payload):
        # proto.md: "NBD_OPT_STARTTLS", "FORCEDTLS mode", "SELECTIVETLS mode"
        if self.tls_mode is TlsMode.OFF:
            return _unsupported(option)
        if not self.client_flags & ClientFlag.C_FIXED_NEWSTYLE:   # "TLS requires fixed newstyle"
            return OptionOutcome(error_reply(option, Reply.ERR_POLICY, "TLS needs fixed newstyle negotiation"))
        if self.tls:
            return OptionOutcome(error_reply(option, Reply.ERR_INVALID, "TLS is already active"))
        if payload:
            return OptionOutcome(error_reply(option, Reply.ERR_INVALID, "NBD_OPT_STARTTLS takes no data"))
        # "the server MUST NOT preserve any negotiation state ... issued before this command"
        self.structured_replies = self.extended_headers = False
        self.meta_export, self.meta_contexts = None, {}
        self.tls = True
        return OptionOutcome(reply(option, Reply.ACK), start_tls=True)

    def _abort(self, option, payload):
        return OptionOutcome(reply(option, Reply.ACK), close="abort")

    def _list(self, option, payload):
        if payload:
            return OptionOutcome(error_reply(option, Reply.ERR_INVALID, "NBD_OPT_LIST takes no data"))
        out = b"".join(
            reply(option, Reply.SERVER, wire.ReplyServer.build(dict(name=e.name, description=e.description.encode())))
            for e in self.catalog.exports)
        return OptionOutcome(out + reply(option, Reply.ACK))

    def _info_or_go(self, option, payload):
        request = _parse_exact(wire.InfoRequest, payload)
        if request is None:
            return OptionOutcome(error_reply(option, Reply.ERR_INVALID, "malformed info request"))
        export = self.catalog.lookup(request.name)
        if export is None:
            return OptionOutcome(error_reply(option, Reply.ERR_UNKNOWN, f"unknown export {request.name!r}"))
        wanted = set(request.requests)
        infos = [wire.InfoExport.build(dict(size=export.size, flags=self.export_flags(export)))]
        if Info.NAME in wanted:
            infos.append(wire.InfoName.build(dict(name=export.name.encode())))
        if Info.DESCRIPTION in wanted and export.description:
            infos.append(wire.InfoDescription.build(dict(description=export.description.encode())))
        # Sent unasked too: our maximum is not the default (proto.md: "NBD_INFO_BLOCK_SIZE").
        infos.append(wire.InfoBlockSize.build(dict(minimum=export.min_block, preferred=export.preferred_block,
                                                   maximum=export.max_block)))
        out = b"".join(reply(option, Reply.INFO, i) for i in infos) + reply(option, Reply.ACK)
        if option == Option.GO:
            self._select_contexts_for(export)
            return OptionOutcome(out, go=export)
        return OptionOutcome(out)

    def _structured_reply(self, option, payload):
        if payload:
            return OptionOutcome(error_reply(option, Reply.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data"))
        if self.extended_headers:   # proto.md: extended headers take precedence
            return OptionOutcome(error_reply(option, Reply.ERR_EXT_HEADER_REQD,
                                             "extended headers are negotiated already"))
        self.structured_replies = True
        return OptionOutcome(reply(option, Reply.ACK))

    def _extended_headers(self, option, payload):
        """proto.md (extension-ext-header): "NBD_OPT_EXTENDED_HEADERS"."""
        if not self.offer_extended_headers:
            return _unsupported(option)
        if payload:
            return OptionOutcome(error_reply(option, Reply.ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data"))
        self.extended_headers = True
        return OptionOutcome(reply(option, Reply.ACK))

    def _meta_context(self, option, payload):
        listing = option == Option.LIST_META_CONTEXT
        if not listing:
            self.meta_contexts, self.meta_export = {}, None   # replaced even on failure
            if not self.chunked_replies:
                return OptionOutcome(error_reply(option, Reply.ERR_INVALID,
                                                 "neither structured replies nor extended headers negotiated"))
        request = _parse_exact(wire.MetaContextRequest, payload)
        if request is None:
            return OptionOutcome(error_reply(option, Reply.ERR_INVALID, "malformed meta context request"))
        export = self.catalog.lookup(request.name)
        if export is None:
            return OptionOutcome(error_reply(option, Reply.ERR_UNKNOWN, f"unknown export {request.name!r}"))
        names = match_contexts(export.meta_contexts, list(request.queries), listing)
        if listing:
            ids = {0: n for n in names}  # proto.md: the id in LIST replies SHOULD be zero
            pairs = [(0, n) for n in names]
        else:
            ids = {export.meta_contexts.index(n) + 1: n for n in names}
            pairs = list(ids.items())
            self.meta_contexts, self.meta_export = ids, export.name
        out = b"".join(reply(option, Reply.META_CONTEXT,
                             wire.ReplyMetaContext.build(dict(context_id=i, name=n.encode()))) for i, n in pairs)
        return OptionOutcome(out + reply(option, Reply.ACK))

    def _select_contexts_for(self, export: ExportInfo) -> None:
        # proto.md: contexts count only if SET named the export used for transmission.
        if self.meta_export != export.name or not self.chunked_replies:
            self.meta_contexts = {}


def _unsupported(option: int) -> OptionOutcome:
    return OptionOutcome(error_reply(option, Reply.ERR_UNSUP, f"option {option_name(option)} not supported"))


def match_contexts(available: tuple[str, ...], queries: list[str], listing: bool) -> list[str]:
    """The contexts a LIST/SET query selects.  An empty leaf ("base:", "qemu:", and
    qemu's "qemu:dirty-bitmap:") is a wildcard for LIST and selects nothing for SET
    (proto.md: "The base: metadata namespace"; qemu nbd/server.c nbd_meta_qemu_query);
    unknown namespaces and leaves are ignored."""
    if not queries:
        return list(available) if listing else []
    selected: list[str] = []
    for query in queries:
        if ":" not in query:
            continue
        if query.endswith(":"):
            matches = [n for n in available if n.startswith(query)] if listing else []
        else:
            matches = [query] if query in available else []
        selected += [m for m in matches if m not in selected]
    return selected


_HANDLERS = {
    Option.EXPORT_NAME: Negotiation._export_name,
    Option.ABORT: Negotiation._abort,
    Option.STARTTLS: Negotiation._start_tls,
    Option.LIST: Negotiation._list,
    Option.INFO: Negotiation._info_or_go,
    Option.GO: Negotiation._info_or_go,
    Option.STRUCTURED_REPLY: Negotiation._structured_reply,
    Option.LIST_META_CONTEXT: Negotiation._meta_context,
    Option.SET_META_CONTEXT: Negotiation._meta_context,
    Option.EXTENDED_HEADERS: Negotiation._extended_headers,
}
