"""The ``nbdserve`` command line: ``serve``, ``demo``, ``create``, ``check``, ``info``, ``map``,
``ctl`` and ``reproduce``.

Errors are one line on stderr, ``nbdserve: error: ...``; exit status 2 for bad
usage (flags, config file), 1 for failures at run time (images, sockets).

A command imports what it runs, when it runs: ``nbdserve check`` loads neither the
config module (tomllib, dataclasses) nor logging, Trio or the reproduce scenarios.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

TYPE_CHECKING = False    # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from pathlib import Path

    from .config import ExportConfig, ServerConfig, TlsConfig

PROG = "nbdserve"
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A one-line failure; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_RUNTIME):
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2.

    ``populate(parser)`` adds a subcommand's arguments when that subcommand is parsed or its
    help shown, so that parsing one command never imports what the others' flags need.
    """

    def __init__(self, *args, populate=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _add_arguments(self) -> None:
        populate, self._populate = self._populate, None
        if populate is not None:
            populate(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_arguments()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._add_arguments()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_arguments()
        return super().format_help()

    def error(self, message: str):  # type: ignore[override]
        sub = self.prog.removeprefix(PROG).strip()
        raise CliError(f"{sub}: {message}" if sub else message, EXIT_USAGE)


# -- sizes and options -----------------------------------------------------------------------

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"64k"``, ``"1M"``, ``"2G"``, ``"1T"``, ``"4096"``: binary suffixes, like qemu-img."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bBkKmMgGtT]?)\s*", text)
    if not m:
        raise ValueError(f"invalid size {text!r} (expected a number with an optional K/M/G/T suffix)")
    number, suffix = m.groups()
    value = float(number) * _SUFFIXES[suffix.lower()]
    if value != int(value):
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def parse_delay(text: str) -> tuple[str, float]:
    event, sep, seconds = text.partition("=")
    if not sep or not event:
        raise ValueError(f"--delay {text!r}: expected EVENT=SECONDS")
    try:
        value = float(seconds)
    except ValueError:
        raise ValueError(f"--delay {text!r}: {seconds!r} is not a number of seconds") from None
    return event, value


QCOW2_OPTIONS = ("cluster_size", "compat", "refcount_bits", "lazy_refcounts", "extended_l2", "compression_type")


def parse_create_options(texts: list[str]) -> dict[str, object]:
    """``-o cluster_size=64k,compat=1.1,refcount_bits=16,lazy_refcounts=on,extended_l2=off,
    compression_type=zlib`` (qemu-img's names) -> create_image keyword arguments."""
    opts: dict[str, object] = {}
    for text in texts:
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"-o {item!r}: expected KEY=VALUE")
            if key == "cluster_size":
                size = parse_size(value)
                if size < 512 or size > (2 << 20) or size & (size - 1):
                    raise ValueError(f"-o cluster_size: expected a power of two from 512 to 2M, got {value}")
                opts["cluster_size"] = size
            elif key == "compat":
                compat = {"0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}.get(value)
                if compat is None:
                    raise ValueError(f"-o compat: expected 0.10 or 1.1, got {value!r}")
                opts["compat"] = compat
            elif key == "refcount_bits":
                if not value.isdigit() or int(value) not in (1, 2, 4, 8, 16, 32, 64):
                    raise ValueError(f"-o refcount_bits: expected a power of two from 1 to 64, got {value!r}")
                opts["refcount_bits"] = int(value)
            elif key in ("lazy_refcounts", "extended_l2"):
                if value not in ("on", "off"):
                    raise ValueError(f"-o {key}: expected on or off, got {value!r}")
                opts[key] = value == "on"
            elif key == "compression_type":
                if value not in ("zlib", "zstd"):
                    raise ValueError(f"-o compression_type: expected zlib or zstd, got {value!r}")
                opts["compression_type"] = value
            else:
                raise ValueError(f"-o {key}: unknown option (expected one of: {', '.join(QCOW2_OPTIONS)})")
    return opts


# -- URIs ---------------------------------------------------------------------------------------

def export_uris(config: ServerConfig, export: ExportConfig, port: int | None = None) -> list[str]:
    """The URIs a client uses to reach ``export``: nbd:// for TCP, nbd+unix:// for the socket
    (nbds://, nbds+unix:// when TLS is required, as libnbd spells them).  ``port``: the port
    bound, where config.port is 0 (any free port)."""
    import ipaddress
    from urllib.parse import quote
    name = quote(export.name, safe="")
    scheme = "nbds" if config.tls is not None and config.tls.mode == "require" else "nbd"
    uris = []
    if config.bind is not None:
        host = config.bind
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        try:
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass  # a host name
        uris.append(f"{scheme}://{host}:{port or config.port}/{name}")
    if config.unix_socket is not None:
        uris.append(f"{scheme}+unix:///{name}?socket={quote(config.unix_socket, safe='/')}")
    return uris


# -- serving ------------------------------------------------------------------------------------

def _find_image_error(exc: BaseException):
    """The ImageError or OSError inside ``exc`` (possibly an exception group), if any."""
    from .images import ImageError
    if isinstance(exc, (ImageError, OSError)):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find_image_error(inner)
            if found is not None:
                return found
    return None


def _one_line(exc: BaseException) -> str:
    """An ImageError's message, or an OSError without its "[Errno N]" prefix."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = re.sub(r"^\[Errno \d+\] ", "", str(exc)) or type(exc).__name__
    return " ".join(text.split())


def setup_logging(verbose: bool, *, quiet: bool = False) -> None:
    """Log records go to stderr, one line per event (connect, negotiation, disconnect,
    errors); -v / verbose = true adds a line per request; ``quiet``: errors only."""
    import logging
    handler = logging.StreamHandler(sys.stderr)
    from .logline import OneLineFormatter
    handler.setFormatter(OneLineFormatter())
    root = logging.getLogger("nbdserve")
    root.addHandler(handler)
    root.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)


def run(config: ServerConfig, *, announce: bool = True, quiet: bool = False,
        on_listening=None) -> int:
    """Serve ``config`` until SIGTERM/SIGINT; print one line per URI once listening
    (``announce``), then call ``on_listening()`` if given; ``quiet``: log errors only."""
    for export in config.exports:
        if not os.path.exists(export.image):
            raise CliError(f"{export.image}: no such file")
        if not os.access(export.image, os.R_OK if export.read_only or export.force_share else os.R_OK | os.W_OK):
            raise CliError(f"{export.image}: permission denied")
    try:
        import trio
        from .server import run_server
        from .server.tls import TlsSetupError, server_context
    except ImportError as e:
        raise CliError(f"the NBD server is not available in this build ({e})") from None
    if config.tls is not None and config.tls.mode != "off":
        try:
            server_context(config.tls)   # refuse unusable TLS files before listening
        except TlsSetupError as e:
            raise CliError(str(e)) from None

    setup_logging(config.verbose, quiet=quiet)
    from .server.malloc import keep_reply_buffers
    keep_reply_buffers()   # process-wide: the command's, not run_server's (a library call's)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(run_server, config)
            port = next((b[1] for b in bound if isinstance(b, tuple)), None)
            # Socket-activated, stdout is often the activating client's: nothing goes there.
            if announce and not config.listen_fds:
                for export in config.exports:
                    for uri in export_uris(config, export, port):
                        print(f"{PROG}: serving {uri}", flush=True)
            if on_listening is not None:
                on_listening()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        found = _find_image_error(e)
        if found is None:
            raise
        raise CliError(_one_line(found)) from None
    return 0


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    from .config import (
        ConfigError, ExportConfig, ServerConfig, check_bitmap_names, check_delays, check_inject_errors,
        load_config,
    )
    if args.config is not None:
        if args.image is not None:
            raise CliError("serve: give either IMAGE or --config, not both", EXIT_USAGE)
        given = [flag for flag, value in (
            ("-x", args.export_name), ("-b", args.bind), ("-p", args.port), ("-k", args.socket),
            ("-r", args.read_only or None), ("-f", args.format), ("--allocator", args.allocator),
            ("--delay", args.delay or None), ("--inject-error", args.inject_error or None),
            ("--description", args.description), ("--control", args.control), ("--tls", args.tls),
            ("-B", args.bitmap or None), ("--no-extended-headers", args.no_extended_headers or None),
            ("--trace", args.trace),
            ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key), ("--tls-ca", args.tls_ca),
            ("--tls-authz-identity", args.tls_authz_identity),
            ("--backing-root", args.backing_root), ("--no-backing", args.no_backing or None),
            ("-U", args.force_share or None))
            if value is not None]
        if given:
            raise CliError(f"serve: {', '.join(given)} cannot be combined with --config "
                           "(set them in the config file)", EXIT_USAGE)
        try:
            config = load_config(args.config)
        except ConfigError as e:
            raise CliError(f"{args.config}: {e}", EXIT_USAGE) from None
        config.verbose = config.verbose or args.verbose
        return activated(config, [])
    if args.image is None:
        raise CliError("serve: give an IMAGE to serve or --config FILE", EXIT_USAGE)
    delays: dict[str, float] = {}
    try:
        for text in args.delay or []:
            event, seconds = parse_delay(text)
            delays[event] = seconds
        delays = check_delays("--delay", delays)
        injections: dict[str, str] = {}
        for text in args.inject_error or []:
            event, sep, spec = text.partition("=")
            if not sep or not event:
                raise ValueError(f"--inject-error {text!r}: expected EVENT=ERRNO[:once]")
            injections[event] = spec
        inject_errors = check_inject_errors("--inject-error", injections)
        bitmaps = check_bitmap_names("-B", args.bitmap or [])
    except (ValueError, ConfigError) as e:
        raise CliError(f"serve: {e}", EXIT_USAGE) from None
    if args.port is not None and not 0 <= args.port <= 65535:   # 0: any free port, printed once bound
        raise CliError(f"serve: -p: port out of range: expected 0 to 65535, got {args.port}", EXIT_USAGE)
    export = ExportConfig(
        name=args.export_name if args.export_name is not None else "",
        image=os.path.abspath(args.image),
        format=args.format,
        read_only=args.read_only,
        description=args.description or "",
        allocator=args.allocator or "fixed",
        delays=delays,
        inject_errors=inject_errors,
        backing_root=os.path.abspath(args.backing_root) if args.backing_root is not None else None,
        no_backing=args.no_backing,
        force_share=args.force_share,
        bitmaps=bitmaps,
        trace=os.path.abspath(args.trace) if args.trace else None,
    )
    config = ServerConfig(exports=[export], verbose=args.verbose, extended_headers=not args.no_extended_headers)
    if args.control is not None:
        config.control = os.path.abspath(args.control)
    if args.socket is not None:
        config.unix_socket = os.path.abspath(args.socket)
        if args.bind is None and args.port is None:
            config.bind = None   # qemu-nbd -k: Unix socket only
    if args.bind is not None:
        config.bind = args.bind
    if args.port is not None:
        config.port = args.port
    config.tls = tls_from_args(args)
    return activated(config, [flag for flag, value in (("-k", args.socket), ("-b", args.bind),
                                                       ("-p", args.port)) if value is not None])


def activated(config: ServerConfig, address_flags: list[str]) -> ServerConfig:
    """With systemd socket activation (LISTEN_PID/LISTEN_FDS), serve on the sockets handed over
    instead of binding; ``address_flags`` given too are refused, as qemu-nbd refuses them."""
    from .activation import ActivationError, listen_fds
    try:
        fds = listen_fds()
    except ActivationError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    if not fds:
        return config
    if address_flags:
        raise CliError(f"{', '.join(address_flags)} cannot be used with socket activation "
                       "(LISTEN_FDS is set)", EXIT_USAGE)
    config.listen_fds, config.bind, config.unix_socket = fds, None, None
    return config


def tls_from_args(args: argparse.Namespace) -> TlsConfig | None:
    """--tls-cert/--tls-key[/--tls-ca [--tls-authz-identity DN]] [--tls require|on|off]: TLS is
    required unless --tls says otherwise."""
    from .config import TlsConfig
    if args.tls_authz_identity is not None and args.tls_ca is None:
        raise CliError("serve: --tls-authz-identity needs --tls-ca (only a verified client certificate "
                       "has an identity)", EXIT_USAGE)
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_ca is not None:
            raise CliError("serve: --tls-ca needs --tls-cert and --tls-key", EXIT_USAGE)
        if args.tls in ("on", "require"):
            raise CliError(f"serve: --tls {args.tls} needs --tls-cert and --tls-key", EXIT_USAGE)
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise CliError("serve: --tls-cert and --tls-key go together", EXIT_USAGE)
    return TlsConfig(cert=os.path.abspath(args.tls_cert), key=os.path.abspath(args.tls_key),
                     ca=os.path.abspath(args.tls_ca) if args.tls_ca is not None else None,
                     identity=args.tls_authz_identity or None, mode=args.tls or "require")


def cmd_serve(args: argparse.Namespace) -> int:
    return run(config_from_args(args))


# -- demo ---------------------------------------------------------------------------------------

DEMO_SIZE = 64 << 20


def _demo_base_bytes(size: int) -> bytearray:
    """Recognisable content: every MiB starts with a line naming it."""
    data = bytearray(size)
    for mib in range(size >> 20):
        line = f"nbdserve demo base image: MiB {mib}\n".encode()
        data[mib << 20: (mib << 20) + len(line)] = line
    return data


async def _write_qcow2(path: Path, writes: list[tuple[int, bytes]]) -> None:
    from .qcow2 import Qcow2Image
    image = Qcow2Image.open(str(path))
    try:
        for offset, data in writes:
            await image.pwrite(offset, data)
        await image.flush()
    finally:
        await image.close()


def make_demo_chain(folder: Path) -> None:
    """base.qcow2 (text lines at each MiB) and top.qcow2 on top of it (0x54 'T' at 4M..4M+64k),
    made with nbdserve's own qcow2 engine; images already there are kept."""
    import trio
    from .qcow2 import Qcow2Error
    from .qcow2.create import create_image

    folder.mkdir(parents=True, exist_ok=True)
    base, top = folder / "base.qcow2", folder / "top.qcow2"
    try:
        if not base.exists():
            part = folder / "base.qcow2.part"
            create_image(str(part), DEMO_SIZE)
            content = _demo_base_bytes(DEMO_SIZE)
            trio.run(_write_qcow2, part, [(mib << 20, bytes(content[mib << 20: (mib << 20) + 4096]))
                                          for mib in range(DEMO_SIZE >> 20)])
            os.replace(part, base)
        if not top.exists():
            part = folder / "top.qcow2.part"
            create_image(str(part), DEMO_SIZE, backing="base.qcow2", backing_format="qcow2")
            trio.run(_write_qcow2, part, [(4 << 20, b"T" * (64 << 10))])
            os.replace(part, top)
    except (OSError, Qcow2Error) as e:
        raise CliError(f"demo: cannot create the demo images in {folder}: {_one_line(e)}") from None


def find_demo_config(explicit: str | None) -> Path:
    from pathlib import Path
    if explicit is not None:
        return Path(explicit)
    for candidate in (Path.cwd() / "conf" / "demo.toml",
                      Path(__file__).resolve().parent.parent / "conf" / "demo.toml"):
        if candidate.exists():
            return candidate
    raise CliError("demo: conf/demo.toml not found; run from the nbdserve checkout or pass --config",
                   EXIT_USAGE)


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import ConfigError, load_config
    path = find_demo_config(args.config)
    try:
        config = load_config(path)
    except ConfigError as e:
        raise CliError(f"{path}: {e}", EXIT_USAGE) from None
    if args.port is not None:
        if not 1 <= args.port <= 65535:
            raise CliError(f"demo: --port: out of range: expected 1 to 65535, got {args.port}", EXIT_USAGE)
        config.port = args.port
    for folder in sorted({Path(e.image).parent for e in config.exports}):
        make_demo_chain(folder)
    return run(config)


# -- create -------------------------------------------------------------------------------------

def _virtual_size(path: str, fmt: str | None) -> int:
    """A backing file's virtual size: qcow2 header bytes 24..32, else the file size."""
    from .images import probe_format
    with open(path, "rb") as f:
        if (fmt or probe_format(path)) == "qcow2":
            f.seek(24)
            return int.from_bytes(f.read(8), "big")
        return os.fstat(f.fileno()).st_size


def cmd_create(args: argparse.Namespace) -> int:
    fmt = args.format
    try:
        size = parse_size(args.size) if args.size is not None else None
        opts = parse_create_options(args.options or [])
    except ValueError as e:
        raise CliError(f"create: {e}", EXIT_USAGE) from None
    if args.backing_format is not None and args.backing is None:
        raise CliError("create: -F needs -b BACKING", EXIT_USAGE)
    if fmt == "raw":
        if args.backing is not None:
            raise CliError("create: raw images have no backing file (use -f qcow2)", EXIT_USAGE)
        if opts:
            raise CliError("create: -o options apply to qcow2 only", EXIT_USAGE)
        if size is None:
            raise CliError("create: SIZE is required", EXIT_USAGE)
        try:
            with open(args.file, "wb") as f:
                f.truncate(size)
        except OSError as e:
            raise CliError(f"{args.file}: {e.strerror}") from None
        print(f"Formatting '{args.file}', fmt=raw size={size}", flush=True)
        return 0

    backing = args.backing
    if size is None:
        if backing is None:
            raise CliError("create: SIZE is required without -b BACKING", EXIT_USAGE)
        from .blockdev.chain import full_backing_filename
        resolved = full_backing_filename(os.path.abspath(args.file), backing)
        try:
            size = _virtual_size(resolved, args.backing_format)
        except OSError as e:
            raise CliError(f"{resolved}: {e.strerror}") from None
    try:
        from .qcow2.create import create_image
    except ImportError as e:
        raise CliError(f"create: qcow2 creation is not available in this build ({e})") from None
    try:
        create_image(args.file, size, backing=backing, backing_format=args.backing_format, **opts)
    except OSError as e:
        raise CliError(f"{args.file}: {e.strerror or e}") from None
    except Exception as e:  # the engine's own refusal (Qcow2Error, ValueError)
        raise CliError(f"create: {e}") from None
    print(f"Formatting '{args.file}', fmt=qcow2 size={size}", flush=True)
    return 0


# -- the parser ---------------------------------------------------------------------------------

def _serve_arguments(s: argparse.ArgumentParser) -> None:
    from .config import ALLOCATORS, DEFAULT_PORT, FORMATS, TLS_MODES

    s.add_argument("image", nargs="?", metavar="IMAGE", help="the image file to serve")
    s.add_argument("--config", metavar="FILE", help="serve the exports of this TOML file")
    s.add_argument("-x", "--export-name", metavar="NAME", help='export name (default: "")')
    s.add_argument("-b", "--bind", metavar="ADDR", help="TCP address to listen on (default: 127.0.0.1)")
    s.add_argument("-p", "--port", type=int, metavar="PORT", help=f"TCP port (default: {DEFAULT_PORT})")
    s.add_argument("-k", "--socket", metavar="SOCKET",
                   help="listen on this Unix socket (alone: no TCP listener, like qemu-nbd)")
    s.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    s.add_argument("-f", "--format", choices=FORMATS, help="image format (default: probed)")
    s.add_argument("--allocator", choices=ALLOCATORS,
                   help="qcow2 cluster allocator: fixed (default), qemu-1.1.2 (qemu 1.1.2's, which "
                        "corrupts as in 2012) or qemu-1.1.2+b7ab0fea (the same with the fix alone)")
    s.add_argument("--delay", action="append", metavar="EVENT=SECONDS",
                   help="sleep at this blkdebug event (repeatable), e.g. cow_read=0.5")
    s.add_argument("--inject-error", action="append", metavar="EVENT=ERRNO[:once]",
                   help="fail this blkdebug event with ERRNO (repeatable; every time, or once), "
                        "e.g. l2_update=ENOSPC:once (qemu blkdebug's inject-error)")
    s.add_argument("--description", metavar="TEXT", help="export description shown to clients")
    s.add_argument("-B", "--bitmap", action="append", metavar="NAME",
                   help="offer the qcow2 persistent dirty bitmap NAME as the meta context "
                        "qemu:dirty-bitmap:NAME (repeatable; qemu-nbd's -B)")
    s.add_argument("--control", metavar="SOCKET",
                   help="control socket for blkdebug breakpoints, delays and errors at run time (nbdserve ctl)")
    s.add_argument("--backing-root", metavar="DIR",
                   help="every backing file of the image must resolve (symlinks, ..) inside DIR")
    s.add_argument("--no-backing", action="store_true", help="refuse an image that has a backing file")
    s.add_argument("-U", "--force-share", action="store_true",
                   help="serve read-only, sharing the image with a writer (qemu-img -U's locks)")
    s.add_argument("--no-extended-headers", action="store_true",
                   help="refuse NBD_OPT_EXTENDED_HEADERS (clients then use 32-bit lengths)")
    s.add_argument("--trace", metavar="FILE",
                   help="append the qcow2 allocation trace to FILE, one JSON object per line "
                        "(every allocating write round in qemu 1.1.2's terms, and the frees)")
    s.add_argument("-v", "--verbose", action="store_true", help="also log every request (connections are always logged)")
    s.add_argument("--tls-cert", metavar="FILE", help="TLS: the server's certificate (PEM)")
    s.add_argument("--tls-key", metavar="FILE", help="TLS: the certificate's private key (PEM)")
    s.add_argument("--tls-ca", metavar="FILE",
                   help="TLS: accept only clients with a certificate this CA (PEM) signed")
    s.add_argument("--tls-authz-identity", metavar="DN",
                   help="TLS: ... and only the one whose subject is DN, as GnuTLS writes it "
                        "(C=..,O=..,CN=..; qemu's authz-simple identity)")
    s.add_argument("--tls", choices=TLS_MODES,
                   help="require (default with --tls-cert): plain clients refused; on: TLS offered; off")
    s.set_defaults(func=cmd_serve)


def _demo_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("--port", "-p", type=int, metavar="PORT", help="TCP port (default: the config's)")
    d.add_argument("--config", metavar="FILE", help="demo config (default: conf/demo.toml)")
    d.set_defaults(func=cmd_demo)


def _create_arguments(c: argparse.ArgumentParser) -> None:
    from .config import FORMATS

    c.add_argument("-f", dest="format", choices=FORMATS, default="raw", help="format (default: raw)")
    c.add_argument("-b", dest="backing", metavar="BACKING", help="backing file (qcow2)")
    c.add_argument("-F", dest="backing_format", choices=FORMATS, metavar="FMT", help="backing file format")
    c.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="cluster_size=N,compat=0.10|1.1,refcount_bits=N,lazy_refcounts=on|off,"
                        "extended_l2=on|off,compression_type=zlib|zstd")
    c.add_argument("file", metavar="FILE")
    c.add_argument("size", nargs="?", metavar="SIZE", help="size with an optional K/M/G/T suffix")
    c.set_defaults(func=cmd_create)


# -- ctl ----------------------------------------------------------------------------------------

def cmd_ctl(args: argparse.Namespace) -> int:
    """One request to a server's control socket; its refusal is one line and exit 1."""
    from .control import ControlError, ControlClient
    arguments = {key: getattr(args, key, None) for key in ("event", "tag", "timeout", "seconds", "errno", "state")}
    if getattr(args, "once", None):
        arguments["once"] = True
    if getattr(args, "file", None):
        arguments["file"] = os.path.abspath(args.file)   # the server's working folder may differ
    try:
        with ControlClient(args.socket) as client:
            client.request(args.ctl_command, export=getattr(args, "export", None), **arguments)
    except ControlError as e:
        raise CliError(f"ctl {args.ctl_command}: {e}") from None
    return 0


def _ctl_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("socket", metavar="SOCKET", help="the server's control socket (serve --control)")
    c.add_argument("--export", metavar="NAME", help="the export (needed when the server has several)")
    sub = c.add_subparsers(dest="ctl_command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, prog=f"{PROG} ctl {name}")
        p.add_argument("--export", metavar="NAME", default=argparse.SUPPRESS, help="the export")
        return p

    p = command("break", "stop the next request reaching EVENT (until resume TAG)")
    p.add_argument("event", metavar="EVENT")
    p.add_argument("tag", metavar="TAG")
    p = command("wait-break", "return once a request is suspended at TAG's breakpoint")
    p.add_argument("tag", metavar="TAG")
    p.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds (exit 1)")
    p = command("resume", "continue the request suspended at TAG")
    p.add_argument("tag", metavar="TAG")
    p = command("remove-break", "remove TAG's breakpoint, resuming a request suspended there")
    p.add_argument("tag", metavar="TAG")
    p = command("delay", "sleep SECONDS at every firing of EVENT (0 removes the delay)")
    p.add_argument("event", metavar="EVENT")
    p.add_argument("seconds", type=float, metavar="SECONDS")
    p = command("inject-error", "fail requests reaching EVENT with ERRNO (every time, or once)")
    p.add_argument("event", metavar="EVENT")
    p.add_argument("errno", metavar="ERRNO", help="a name like EIO or ENOSPC, or its number")
    p.add_argument("once", nargs="?", choices=["once"], help="only the first request fails")
    command("clear", "remove every breakpoint (resuming what is suspended), delay and injected error")
    p = command("trace", "start or stop the allocation trace (JSON lines into FILE, or serve --trace's)")
    p.add_argument("state", choices=["on", "off"], metavar="on|off")
    p.add_argument("file", nargs="?", metavar="FILE", help="on: trace into this file instead")
    c.set_defaults(func=cmd_ctl)


def _reproduce_arguments(r: argparse.ArgumentParser) -> None:
    from .reproduce.cli import add_arguments

    add_arguments(r)


def build_parser() -> argparse.ArgumentParser:
    """nbdserve's parser; each subcommand's arguments are added when it is used (_Parser)."""
    parser = _Parser(prog=PROG, description="NBD server for qcow2 and raw images.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    sub.add_parser("serve", help="serve an image (or the exports of a config file) over NBD",
                   populate=_serve_arguments)
    sub.add_parser("demo", help="create the demo backing chain under conf/demo/ and serve it",
                   populate=_demo_arguments)
    sub.add_parser("create", help="create a raw or qcow2 image", populate=_create_arguments)

    from .cli_image import add_subcommands as add_image_commands
    add_image_commands(sub)
    sub.add_parser("ctl", help="breakpoints, delays and injected errors of a running server "
                               "(serve --control SOCKET)", populate=_ctl_arguments)
    sub.add_parser("reproduce",
                   help="reproduce the qemu-1.1.2 qcow2 corruption: qemu-io scenarios and a Linux guest",
                   populate=_reproduce_arguments)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return e.status


if __name__ == "__main__":
    sys.exit(main())
