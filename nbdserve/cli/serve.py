"""``nbdserve serve``: an image (flags) or a config file's exports, until SIGTERM/SIGINT;
``run`` also serves ``demo`` and ``nbdserve-qemu-nbd``."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import EXIT_USAGE, PROG, CliError, command, find_error, one_line

TYPE_CHECKING = False    # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from ..server.settings import ExportSettings, ServerSettings, TlsSettings


def parse_delay(text: str) -> tuple[str, float]:
    event, sep, seconds = text.partition("=")
    if not sep or not event:
        raise ValueError(f"--delay {text!r}: expected EVENT=SECONDS")
    try:
        value = float(seconds)
    except ValueError:
        raise ValueError(f"--delay {text!r}: {seconds!r} is not a number of seconds") from None
    return event, value


# -- URIs ---------------------------------------------------------------------------------------

def export_uris(config: ServerSettings, export: ExportSettings, port: int | None = None) -> list[str]:
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

def setup_logging(verbose: bool, *, quiet: bool = False) -> None:
    """Log records go to stderr, one line per event (connect, negotiation, disconnect,
    errors); -v / verbose = true adds a line per request; ``quiet``: errors only."""
    import logging
    handler = logging.StreamHandler(sys.stderr)
    from ..logline import OneLineFormatter
    handler.setFormatter(OneLineFormatter())
    root = logging.getLogger("nbdserve")
    root.addHandler(handler)
    root.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)


def run(config: ServerSettings, *, announce: bool = True, quiet: bool = False,
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
        from ..server import run_server
        from ..server.tls import TlsSetupError, server_context
    except ImportError as e:
        raise CliError(f"the NBD server is not available in this build ({e})") from None
    if config.tls is not None and config.tls.mode != "off":
        try:
            server_context(config.tls)   # refuse unusable TLS files before listening
        except TlsSetupError as e:
            raise CliError(str(e)) from None

    setup_logging(config.verbose, quiet=quiet)
    from ..server.malloc import keep_reply_buffers
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
        from ..blockdev.images import ImageError
        found = find_error(e, (ImageError, OSError))
        if found is None:
            raise
        raise CliError(one_line(found)) from None
    return 0


def config_from_args(args: argparse.Namespace) -> ServerSettings:
    from ..config import ConfigError, check_bitmap_names, check_delays, check_inject_errors, load_config
    from ..server.settings import ExportSettings, ServerSettings
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
    export = ExportSettings(
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
    config = ServerSettings(exports=[export], verbose=args.verbose, extended_headers=not args.no_extended_headers)
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


def activated(config: ServerSettings, address_flags: list[str]) -> ServerSettings:
    """With systemd socket activation (LISTEN_PID/LISTEN_FDS), serve on the sockets handed over
    instead of binding; ``address_flags`` given too are refused, as qemu-nbd refuses them."""
    from ..activation import ActivationError, listen_fds
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


def tls_from_args(args: argparse.Namespace) -> TlsSettings | None:
    """--tls-cert/--tls-key[/--tls-ca [--tls-authz-identity DN]] [--tls require|on|off]: TLS is
    required unless --tls says otherwise."""
    from ..server.settings import TlsSettings
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
    return TlsSettings(cert=os.path.abspath(args.tls_cert), key=os.path.abspath(args.tls_key),
                     ca=os.path.abspath(args.tls_ca) if args.tls_ca is not None else None,
                     identity=args.tls_authz_identity or None, mode=args.tls or "require")


@command
def cmd_serve(args: argparse.Namespace) -> int:
    return run(config_from_args(args))


def add_arguments(s: argparse.ArgumentParser) -> None:
    from ..blockdev.probe import FORMATS
    from ..qcow2.policy import ALLOCATORS
    from ..server.settings import DEFAULT_PORT, TLS_MODES

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


