"""Validation of transmission requests (proto.md: "Request types", "Error values")."""

from __future__ import annotations

from .constants import Command, CommandFlag, Errno, TransmissionFlag as TF
from .exports import ExportInfo

KNOWN_COMMANDS = {Command.READ, Command.WRITE, Command.DISC, Command.FLUSH, Command.TRIM,
                  Command.CACHE, Command.WRITE_ZEROES, Command.BLOCK_STATUS}
WRITING = {Command.WRITE, Command.TRIM, Command.WRITE_ZEROES}
# Commands whose flag in the transmission flags must be set before use.
NEEDS_FLAG = {Command.FLUSH: TF.SEND_FLUSH, Command.TRIM: TF.SEND_TRIM,
              Command.WRITE_ZEROES: TF.SEND_WRITE_ZEROES}


def allowed_flags(command: int, flags: int, extended: bool = False) -> CommandFlag:
    """Command flags valid for ``command`` under transmission ``flags`` (proto.md: "Command flags");
    ``extended``: extended headers are in use, where NBD_CMD_WRITE may carry PAYLOAD_LEN (no
    other command's payload form is served)."""
    allowed = CommandFlag.FUA if flags & TF.SEND_FUA else CommandFlag(0)
    if extended and command == Command.WRITE:
        allowed |= CommandFlag.PAYLOAD_LEN
    if command == Command.READ and flags & TF.SEND_DF:
        allowed |= CommandFlag.DF
    elif command == Command.BLOCK_STATUS:
        allowed |= CommandFlag.REQ_ONE
    elif command == Command.WRITE_ZEROES:
        allowed |= CommandFlag.NO_HOLE
        if flags & TF.SEND_FAST_ZERO:
            allowed |= CommandFlag.FAST_ZERO
    return allowed


def check_request(export: ExportInfo, flags: int, has_contexts: bool,
                  command: int, cmd_flags: int, offset: int, length: int,
                  extended: bool = False) -> tuple[Errno, str]:
    """(error, reason) for a request; (Errno.OK, "") when it may go to the device.

    ``flags`` are the transmission flags as sent to the client; ``extended``: extended
    headers are in use (``length`` may then be a 64-bit effect length)."""
    if command not in KNOWN_COMMANDS:
        return Errno.EINVAL, f"unknown command {command}"
    command = Command(command)
    bad = cmd_flags & ~int(allowed_flags(command, flags, extended))   # int: IntFlag's ~ drops unknown bits
    if bad:
        return Errno.EINVAL, f"flags {bad:#x} not valid for {command.name}"
    if command in WRITING and flags & TF.READ_ONLY:
        return Errno.EPERM, "export is read-only"      # proto.md: "Error values"
    needed = NEEDS_FLAG.get(command)
    if needed is not None and not flags & needed:
        return Errno.EINVAL, f"{command.name} not advertised"
    if command == Command.BLOCK_STATUS and not has_contexts:
        return Errno.EINVAL, "no metadata context selected"   # proto.md: "Metadata querying"
    if command == Command.FLUSH:
        if offset or length:
            return Errno.EINVAL, "FLUSH offset and length must be zero"
        return Errno.OK, ""
    if offset + length > export.size:
        # proto.md: "Error values": ENOSPC for writes beyond the end, EINVAL otherwise.
        err = Errno.ENOSPC if command in (Command.WRITE, Command.WRITE_ZEROES) else Errno.EINVAL
        return err, f"range {offset}+{length} beyond export size {export.size}"
    if offset % export.min_block or length % export.min_block:
        return Errno.EINVAL, f"request not aligned to {export.min_block}"
    if command in (Command.READ, Command.WRITE) and length > export.max_block:
        # proto.md: EOVERFLOW only for a READ with DF that cannot be sent unfragmented.
        err = Errno.EOVERFLOW if cmd_flags & CommandFlag.DF else Errno.EINVAL
        return err, f"length {length} above maximum block size {export.max_block}"
    if command == Command.BLOCK_STATUS and length == 0:
        return Errno.EINVAL, "BLOCK_STATUS of length 0"
    return Errno.OK, ""


_OK = (Errno.OK, "")


class RequestChecker:
    """check_request() for one connection, with what the negotiation fixed worked out once:
    a valid READ or WRITE is passed with a few integer tests (the per-request hot path),
    anything else goes through check_request() for its precise error."""

    def __init__(self, export: ExportInfo, flags: int, has_contexts: bool, extended: bool = False):
        self.export, self.flags, self.has_contexts, self.extended = export, flags, has_contexts, extended
        self._size, self._max_block, self._min_block = export.size, export.max_block, export.min_block
        self._fast_flags = {int(Command.READ): int(allowed_flags(Command.READ, flags))}
        if not flags & TF.READ_ONLY:
            self._fast_flags[int(Command.WRITE)] = int(allowed_flags(Command.WRITE, flags, extended))

    def __call__(self, command: int, cmd_flags: int, offset: int, length: int) -> tuple[Errno, str]:
        allowed = self._fast_flags.get(command)
        if (allowed is not None and not cmd_flags & ~allowed and offset + length <= self._size
                and length <= self._max_block and not offset % self._min_block and not length % self._min_block):
            return _OK
        return check_request(self.export, self.flags, self.has_contexts, command, cmd_flags, offset, length,
                             self.extended)
