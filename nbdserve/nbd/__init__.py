"""The NBD protocol core, sans I/O (in the manner of h11): no sockets, no Trio."""

from .connection import MAX_OPTION_LENGTH, ServerConnection
from .constants import (CONTEXT_BASE_ALLOCATION, CONTEXT_QEMU_ALLOCATION_DEPTH, ChunkType, Command, CommandFlag,
                        Errno, Info, Option, Reply, StateFlag, TransmissionFlag)
from .errors import LocalProtocolError, ProtocolError
from .events import (NEED_DATA, BlockStatus, Disconnect, ErrorChunk, Negotiated, NoneChunk, OffsetData,
                     OffsetHole, Request, SimpleReply, StartTLS)
from .exports import ExportCatalog, ExportInfo
from .options import TlsMode

__all__ = [
    "MAX_OPTION_LENGTH", "ServerConnection", "CONTEXT_BASE_ALLOCATION", "CONTEXT_QEMU_ALLOCATION_DEPTH",
    "ChunkType", "Command", "CommandFlag", "Errno", "Info", "Option", "Reply", "StateFlag", "TransmissionFlag",
    "LocalProtocolError", "ProtocolError", "NEED_DATA", "BlockStatus", "Disconnect", "ErrorChunk", "Negotiated",
    "NoneChunk", "OffsetData", "OffsetHole", "Request", "SimpleReply", "StartTLS", "ExportCatalog", "ExportInfo",
    "TlsMode",
]
