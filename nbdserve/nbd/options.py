"""Option haggling (proto.md: "Fixed newstyle negotiation", "Option types")."""

from __future__ import annotations

from dataclasses import dataclass, field

from construct import ConstructError

from . import wire
from .constants import MAX_STRING, ClientFlag, Info, Option, Reply, TransmissionFlag
from .exports import ExportCatalog, ExportInfo


@dataclass
class OptionOutcome:
    """What an option did: reply bytes, and whether haggling ends."""

    replies: bytes
    go: ExportInfo | None = None     # enter transmission on this export
    close: str | None = None         # end the session ("abort", "unknown export")


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
    client_flags: ClientFlag = ClientFlag(0)
    structured_replies: bool = False
    meta_export: str | None = None                  # export SET_META_CONTEXT named
    meta_contexts: dict[int, str] = field(default_factory=dict)
    options_seen: list[str] = field(default_factory=list)

    def export_flags(self, export: ExportInfo) -> int:
        flags = export.flags
        if not self.structured_replies:
            flags &= ~int(TransmissionFlag.SEND_DF)   # proto.md: "NBD_FLAG_SEND_DF" MUST be clear
        return int(flags)

    def handle(self, option: int, payload: bytes) -> OptionOutcome:
        self.options_seen.append(option_name(option))
        handler = _HANDLERS.get(option)
        if handler is None:   # STARTTLS, EXTENDED_HEADERS, PEEK_EXPORT, unknown
            return OptionOutcome(error_reply(option, Reply.ERR_UNSUP, f"option {option_name(option)} not supported"))
        return handler(self, option, payload)

    def too_big(self, option: int) -> bytes:
        self.options_seen.append(option_name(option))
        return error_reply(option, Reply.ERR_TOO_BIG, "option data too long")

    # -- handlers, one per option
    def _export_name(self, option, payload):
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
        self.structured_replies = True
        return OptionOutcome(reply(option, Reply.ACK))

    def _meta_context(self, option, payload):
        listing = option == Option.LIST_META_CONTEXT
        if not listing:
            self.meta_contexts, self.meta_export = {}, None   # replaced even on failure
            if not self.structured_replies:
                return OptionOutcome(error_reply(option, Reply.ERR_INVALID, "structured replies not negotiated"))
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
        if self.meta_export != export.name or not self.structured_replies:
            self.meta_contexts = {}


def match_contexts(available: tuple[str, ...], queries: list[str], listing: bool) -> list[str]:
    """The contexts a LIST/SET query selects.  An empty leaf ("base:") is a
    wildcard for LIST and selects nothing for SET (proto.md: "The base: metadata
    namespace"); unknown namespaces and leaves are ignored."""
    if not queries:
        return list(available) if listing else []
    selected: list[str] = []
    for query in queries:
        namespace, colon, leaf = query.partition(":")
        if not colon:
            continue
        if leaf == "":
            matches = [n for n in available if n.startswith(namespace + ":")] if listing else []
        else:
            matches = [query] if query in available else []
        selected += [m for m in matches if m not in selected]
    return selected


_HANDLERS = {
    Option.EXPORT_NAME: Negotiation._export_name,
    Option.ABORT: Negotiation._abort,
    Option.LIST: Negotiation._list,
    Option.INFO: Negotiation._info_or_go,
    Option.GO: Negotiation._info_or_go,
    Option.STRUCTURED_REPLY: Negotiation._structured_reply,
    Option.LIST_META_CONTEXT: Negotiation._meta_context,
    Option.SET_META_CONTEXT: Negotiation._meta_context,
}
