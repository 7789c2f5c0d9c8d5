"""Every NBD wire structure, declared once with ``construct``.

The per-request hot path (request header, simple reply header, structured
chunk header) uses ``struct.Struct`` objects checked against these
declarations at import time.
"""

from __future__ import annotations

import struct

from construct import (Array, Const, GreedyBytes, GreedyRange, Int16ub, Int32ub, Int64ub, Padding,
                       PascalString, Prefixed, Struct, this)

from . import constants as c

# -- handshake (proto.md: "Newstyle negotiation")
Greeting = Struct(
    "magic" / Const(c.NBDMAGIC, Int64ub),
    "ihaveopt" / Const(c.IHAVEOPT, Int64ub),
    "handshake_flags" / Int16ub,
)
ClientFlags = Struct("flags" / Int32ub)

OptionRequestHeader = Struct(
    "magic" / Int64ub,
    "option" / Int32ub,
    "length" / Int32ub,
)
OptionReply = Struct(
    "magic" / Const(c.OPTION_REPLY_MAGIC, Int64ub),
    "option" / Int32ub,
    "reply" / Int32ub,
    "data" / Prefixed(Int32ub, GreedyBytes),
)
# Reply to NBD_OPT_EXPORT_NAME: size, flags, then 124 zeroes unless NO_ZEROES.
ExportNameReply = Struct("size" / Int64ub, "flags" / Int16ub)
EXPORT_NAME_ZEROES = Padding(124)

# -- option payloads
String32 = PascalString(Int32ub, "utf8")
# proto.md: "NBD_OPT_INFO (6) and NBD_OPT_GO (7)"
InfoRequest = Struct(
    "name" / String32,
    "count" / Int16ub,
    "requests" / Array(this.count, Int16ub),
)
# proto.md: "NBD_OPT_LIST_META_CONTEXT" / "NBD_OPT_SET_META_CONTEXT"
MetaContextRequest = Struct(
    "name" / String32,
    "count" / Int32ub,
    "queries" / Array(this.count, String32),
)
# NBD_REP_SERVER: name length, name, then the description to the end.
ReplyServer = Struct("name" / String32, "description" / GreedyBytes)
ReplyMetaContext = Struct("context_id" / Int32ub, "name" / GreedyBytes)

# NBD_REP_INFO payloads (proto.md: "NBD_REP_INFO")
InfoExport = Struct("type" / Const(c.Info.EXPORT, Int16ub), "size" / Int64ub, "flags" / Int16ub)
InfoName = Struct("type" / Const(c.Info.NAME, Int16ub), "name" / GreedyBytes)
InfoDescription = Struct("type" / Const(c.Info.DESCRIPTION, Int16ub), "description" / GreedyBytes)
InfoBlockSize = Struct(
    "type" / Const(c.Info.BLOCK_SIZE, Int16ub),
    "minimum" / Int32ub,
    "preferred" / Int32ub,
    "maximum" / Int32ub,
)

# -- transmission (proto.md: "Request message", "Simple reply message",
#    "Structured reply chunk message")
RequestHeader = Struct(
    "magic" / Int32ub,
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,
    "length" / Int32ub,
)
# proto.md (extension-ext-header): the 32-byte headers of NBD_OPT_EXTENDED_HEADERS
ExtendedRequestHeader = Struct(
    "magic" / Int32ub,
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,
    "length" / Int64ub,             # payload length with NBD_CMD_FLAG_PAYLOAD_LEN, else effect length
)
ExtendedReplyHeader = Struct(
    "magic" / Const(c.EXTENDED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,             # the request's offset
    "length" / Int64ub,
)
SimpleReplyHeader = Struct(
    "magic" / Const(c.SIMPLE_REPLY_MAGIC, Int32ub),
    "error" / Int32ub,
    "cookie" / Int64ub,
)
ChunkHeader = Struct(
    "magic" / Const(c.STRUCTURED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "length" / Int32ub,
)
# Chunk payloads (proto.md: "Structured reply types")
OffsetDataPrefix = Struct("offset" / Int64ub)        # followed by the data
OffsetHole = Struct("offset" / Int64ub, "size" / Int32ub)
BlockStatusDescriptor = Struct("length" / Int32ub, "flags" / Int32ub)
BlockStatusPayload = Struct("context_id" / Int32ub, "descriptors" / GreedyRange(BlockStatusDescriptor))
# NBD_REPLY_TYPE_BLOCK_STATUS_EXT (extended headers only)
BlockStatusExtDescriptor = Struct("length" / Int64ub, "flags" / Int64ub)
BlockStatusExtPayload = Struct("context_id" / Int32ub, "count" / Int32ub,
                               "descriptors" / Array(this.count, BlockStatusExtDescriptor))
ErrorPayload = Struct("error" / Int32ub, "message" / PascalString(Int16ub, "utf8"))
ErrorOffsetPayload = Struct("error" / Int32ub, "message" / PascalString(Int16ub, "utf8"),
                            "offset" / Int64ub)


def _checked(fmt: str, declaration: Struct) -> struct.Struct:
    """A struct.Struct for the hot path, asserted to match its construct declaration."""
    packed = struct.Struct(fmt)
    assert packed.size == declaration.sizeof(), (fmt, declaration)
    return packed


REQUEST_HEADER = _checked(">IHHQQI", RequestHeader)            # 28 bytes
EXTENDED_REQUEST_HEADER = _checked(">IHHQQQ", ExtendedRequestHeader)   # 32 bytes
EXTENDED_REPLY_HEADER = _checked(">IHHQQQ", ExtendedReplyHeader)       # 32 bytes
SIMPLE_REPLY_HEADER = _checked(">IIQ", SimpleReplyHeader)      # 16 bytes
CHUNK_HEADER = _checked(">IHHQI", ChunkHeader)                 # 20 bytes
OFFSET_DATA_HEADER = _checked(">IHHQIQ", Struct("chunk" / ChunkHeader, "prefix" / OffsetDataPrefix))   # 28 bytes
OPTION_REQUEST_HEADER = _checked(">QII", OptionRequestHeader)  # 16 bytes
OFFSET_DATA_PREFIX = _checked(">Q", OffsetDataPrefix)
DESCRIPTOR = _checked(">II", BlockStatusDescriptor)
EXT_DESCRIPTOR = _checked(">QQ", BlockStatusExtDescriptor)
