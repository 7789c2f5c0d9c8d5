"""``nbdserve-qemu-nbd``: qemu-nbd 7.2's command line, served by nbdserve's server.

A thin translation (qemu-nbd.c's main()): each flag becomes a field of the ExportSettings /
ServerSettings (server/settings.py) that ``nbdserve serve`` runs, with qemu-nbd's defaults (bind 0.0.0.0, port
10809, export name "", one client at a time (``-e 1``), exit once the last client has
gone (no ``-t``), discard ignored, allocation depth only with ``-A``), and it prints
nothing while serving, as qemu-nbd does.  A flag it cannot honour is refused with one line
naming it; none is ignored.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from .cli.errors import EXIT_RUNTIME, EXIT_USAGE, CliError, one_line, report
from .cli.serve import activated, run

PROG = "nbdserve-qemu-nbd"

# qemu-nbd flags this command refuses, and why.
REFUSED = {
    "connect": ("-c/--connect", "the kernel NBD device is not supported (use nbd-client)"),
    "disconnect": ("-d/--disconnect", "the kernel NBD device is not supported (use nbd-client -d)"),
    "list": ("-L/--list", "list mode (a client) is not supported (use nbdinfo --list)"),
    "tls_hostname": ("--tls-hostname", "not supported (list mode only in qemu-nbd)"),
    "trace": ("-T/--trace", "qemu trace events are not supported"),
    "selinux_label": ("--selinux-label", "not supported"),
}
AIO_MODES = ("threads", "native", "io_uring")   # qemu bdrv_parse_aio
DISCARD_MODES = {"ignore": False, "off": False, "unmap": True, "on": True}   # bdrv_parse_discard_flags


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise CliError(message, EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    from .server.settings import CACHE_MODES, DETECT_ZEROES

    p = _Parser(prog=PROG, description="qemu-nbd's command line, served by nbdserve.")
    p.add_argument("-V", "--version", action="version", version=f"{PROG} (nbdserve; qemu-nbd 7.2 command line)")
    p.add_argument("-p", "--port", help="port to listen on (default 10809)")
    p.add_argument("-b", "--bind", help="interface to bind to (default 0.0.0.0)")
    p.add_argument("-k", "--socket", help="path to the Unix socket (absolute)")
    p.add_argument("-e", "--shared", default="1", metavar="NUM",
                   help="device can be shared by NUM clients (default 1; 0: any number)")
    p.add_argument("-t", "--persistent", action="store_true", help="don't exit on the last connection")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="accepted; like qemu-nbd, serving prints nothing more")
    p.add_argument("--fork", action="store_true", help="fork off the server process and exit the parent "
                   "once the server is running")
    p.add_argument("--pid-file", metavar="PATH", help="store the server's process ID in PATH once listening")
    p.add_argument("-x", "--export-name", default="", metavar="NAME", help='export name (default "")')
    p.add_argument("-D", "--description", metavar="TEXT", help="export description")
    p.add_argument("-o", "--offset", default="0", help="offset into the image")
    p.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    p.add_argument("-s", "--snapshot", action="store_true",
                   help="use a temporary overlay: writes are dropped at exit")
    p.add_argument("-l", "--load-snapshot", metavar="SNAPSHOT_PARAM",
                   help="serve an internal snapshot read-only: ID_OR_NAME, or snapshot.id=ID,snapshot.name=NAME")
    p.add_argument("-A", "--allocation-depth", action="store_true", help="expose the allocation depth")
    p.add_argument("-f", "--format", help="image format: qcow2 or raw (default: probed)")
    p.add_argument("-n", "--nocache", action="store_true", help="like --cache=none")
    p.add_argument("--cache", choices=CACHE_MODES, help="cache mode (default writeback)")
    p.add_argument("--aio", help="AIO mode: threads (native and io_uring are refused)")
    p.add_argument("--discard", choices=tuple(DISCARD_MODES), help="discard: ignore (default) or unmap")
    p.add_argument("--detect-zeroes", choices=DETECT_ZEROES, help="detect all-zero writes: off, on, unmap")
    p.add_argument("-c", "--connect", metavar="DEV", help=argparse.SUPPRESS)
    p.add_argument("-d", "--disconnect", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-L", "--list", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-B", "--bitmap", action="append", metavar="NAME",
                   help="also export the metadata context qemu:dirty-bitmap:NAME")
    p.add_argument("--object", action="append", default=[], metavar="TYPE,id=ID,...",
                   help="tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off] or "
                        "authz-simple,id=ID,identity=DN")
    p.add_argument("--tls-creds", metavar="ID", help="require TLS with the tls-creds-x509 object ID")
    p.add_argument("--tls-authz", metavar="ID", help="let in only the client the authz-simple object ID names")
    p.add_argument("--tls-hostname", help=argparse.SUPPRESS)
    p.add_argument("--image-opts", action="store_true",
                   help="FILE is driver=qcow2|raw,file.filename=PATH or driver=file,filename=PATH")
    p.add_argument("-T", "--trace", action="append", help=argparse.SUPPRESS)
    p.add_argument("--selinux-label", help=argparse.SUPPRESS)
    p.add_argument("file", nargs="?", metavar="FILE")
    return p


def _number(flag: str, text: str, low: int = 0) -> int:
    """qemu_strtou64/qemu_strtoi with base 0: decimal, 0x hex or 0 octal."""
    try:
        value = int(text, 8) if re.fullmatch(r"0[0-7]+", text) else int(text, 0)
    except ValueError:
        value = low - 1
    if value < low:
        raise CliError(f"{flag}: invalid number {text!r}", EXIT_USAGE)
    return value


def _objects(texts: list[str]) -> dict:
    """--object, in order (qemu-nbd.c: user_creatable_process_cmdline): id -> object."""
    from .qemu_opts import parse_object
    objects = {}
    for text in texts:
        obj = parse_object(text)
        if obj.id in objects:
            raise CliError(f"--object: duplicate id '{obj.id}'", EXIT_USAGE)
        objects[obj.id] = obj
    return objects


def config_from_args(args: argparse.Namespace):
    from .blockdev.probe import FORMATS
    from .server.settings import DEFAULT_PORT, ExportSettings, ServerSettings
    from .qemu_opts import image_from_opts, tls_config

    for dest, (flag, why) in REFUSED.items():
        if getattr(args, dest):
            raise CliError(f"{flag}: {why}", EXIT_USAGE)
    objects = _objects(args.object)
    tls = tls_config(objects, args.tls_creds, args.tls_authz)
    if args.file is None:
        raise CliError("expected one FILE to serve", EXIT_USAGE)
    image, fmt = args.file, args.format
    if args.image_opts:
        if args.format is not None:
            raise CliError("--image-opts and -f are mutually exclusive", EXIT_USAGE)
        image, fmt = image_from_opts(args.file)
    if args.nocache and args.cache is not None:
        raise CliError("-n and --cache can only be specified once", EXIT_USAGE)
    cache = "none" if args.nocache else args.cache or "writeback"
    if args.aio is not None and args.aio not in AIO_MODES:
        raise CliError(f"--aio: invalid mode {args.aio!r} (expected threads, native or io_uring)", EXIT_USAGE)
    if args.aio in ("native", "io_uring"):
        raise CliError(f"--aio {args.aio}: not supported (nbdserve does its file I/O in threads: --aio threads)",
                       EXIT_USAGE)
    discard = DISCARD_MODES[args.discard or "ignore"]
    if args.detect_zeroes == "unmap" and not discard:
        raise CliError("--detect-zeroes unmap needs --discard unmap (as in qemu-nbd)", EXIT_USAGE)
    if fmt is not None and fmt not in FORMATS:
        raise CliError(f"-f {args.format}: nbdserve serves qcow2 and raw images only", EXIT_USAGE)
    if args.socket is not None and not args.socket.startswith("/"):
        raise CliError("-k: socket path must be absolute", EXIT_USAGE)
    shared = _number("-e", args.shared)
    port = DEFAULT_PORT if args.port is None else _number("-p", args.port, 1)
    if port > 65535:
        raise CliError(f"-p: port out of range: {args.port}", EXIT_USAGE)
    export = ExportSettings(
        name=args.export_name, image=os.path.abspath(image), format=fmt,
        read_only=args.read_only or args.load_snapshot is not None,   # -l implies -r
        snapshot=args.load_snapshot, description=args.description or "",
        offset=_number("-o", args.offset), allocation_depth=args.allocation_depth,
        multi_conn=shared != 1,          # nbd/server.c: CAN_MULTI_CONN unless one client at a time
        discard=discard, cache=cache, detect_zeroes=args.detect_zeroes or "off",
        bitmaps=tuple(dict.fromkeys(args.bitmap or ())))
    config = ServerSettings(exports=[export], bind=args.bind or "0.0.0.0", port=port,
                          verbose=False, persistent=args.persistent,
                          max_connections=shared or 1 << 30, queue_when_full=True, tls=tls,
                          extended_headers=False)   # qemu-nbd 7.2 refuses NBD_OPT_EXTENDED_HEADERS
    if args.socket is not None:          # nbd_build_socket_address: the socket wins over -b/-p
        config.unix_socket, config.bind = args.socket, None
    given = [flag for flag, value in (("-k", args.socket), ("-b", args.bind), ("-p", args.port))
             if value is not None]
    return activated(config, given)


def _snapshot_overlay(export) -> str:
    """-s: a temporary qcow2 overlay on top of the image (qemu's BDRV_O_SNAPSHOT: in $TMPDIR
    or /var/tmp), which the export serves instead; the caller removes it at exit."""
    import tempfile

    from .blockdev.images import ImageError
    from .blockdev.probe import probe_format, virtual_size
    from .qcow2.create import create_image
    try:
        fmt = export.format or probe_format(export.image)
        size = virtual_size(export.image, fmt)
        fd, path = tempfile.mkstemp(prefix="vl.", dir=os.environ.get("TMPDIR") or "/var/tmp")
        os.close(fd)
        create_image(path, size, backing=export.image, backing_format=fmt)
    except (OSError, ImageError) as e:
        raise CliError(f"-s: cannot make the temporary overlay: {one_line(e)}") from None
    export.image, export.format = path, "qcow2"
    return path


def _fork() -> None:
    """--fork (qemu-nbd.c): the child goes on with stderr on a pipe to the parent; the
    parent copies what comes through and exits 1 if anything did, 0 once the pipe closes
    (the child closes it when listening).  Only the child returns."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        errors = False
        while chunk := os.read(read_end, 1024):
            errors = True
            os.write(2, chunk)
        os._exit(EXIT_RUNTIME if errors else 0)
    os.close(read_end)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(write_end, 2)
    os.close(null)
    os.close(write_end)


def _listening(args: argparse.Namespace) -> None:
    if args.pid_file is not None:
        with open(args.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    if args.fork:
        os.dup2(1, 2)   # qemu-nbd.c: dup2(STDOUT_FILENO, STDERR_FILENO); stdout is /dev/null


def main(argv: list[str] | None = None) -> int:
    overlay = None
    try:
        args = build_parser().parse_args(argv)
        config = config_from_args(args)
        if args.fork:
            _fork()
        if args.snapshot:
            overlay = _snapshot_overlay(config.exports[0])
        return run(config, announce=False, quiet=True, on_listening=lambda: _listening(args))
    except CliError as e:
        return report(e, PROG)
    finally:
        if overlay is not None:
            os.unlink(overlay)


if __name__ == "__main__":
    sys.exit(main())
