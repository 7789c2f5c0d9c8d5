"""What the server is told to serve, as its own plain types: config.py (the TOML file), the
command line and the library face (api.py) build these; the transport reads nothing else.
No Trio here, so that building them costs nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..nbd.options import TlsMode

DEFAULT_PORT = 10809

TLS_MODES = (TlsMode.REQUIRE.value, TlsMode.ON.value, TlsMode.OFF.value)   # nbdkit --tls=require|on|off
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")   # qemu bdrv_parse_cache_mode
DETECT_ZEROES = ("off", "on", "unmap")   # qemu BlockdevDetectZeroesOptions


@dataclass
class ExportSettings:
    name: str
    image: str                      # absolute path
    format: str | None = None       # "qcow2", "raw", or None to probe
    read_only: bool = False
    description: str = ""
    allocator: str = "fixed"        # a qcow2 AllocationPolicy name (qcow2/policy.py ALLOCATORS)
    delays: dict[str, float] = field(default_factory=dict)  # blkdebug event -> seconds
    # blkdebug event -> (errno, once): qemu blkdebug's [inject-error] (qemu-iotests 026)
    inject_errors: dict[str, tuple[int, bool]] = field(default_factory=dict)
    offset: int = 0                 # serve the image from this byte on (qemu-nbd --offset)
    allocation_depth: bool = True   # offer qemu:allocation-depth (qemu-nbd offers it with -A only)
    multi_conn: bool | None = None  # NBD_FLAG_CAN_MULTI_CONN; None: when the device allows it
    # qemu-nbd --discard / --cache / --detect-zeroes, as qemu's block layer applies them
    discard: bool = True            # False: trims succeed doing nothing (qemu-nbd's default)
    cache: str = "writeback"        # CACHE_MODES
    detect_zeroes: str = "off"      # DETECT_ZEROES
    snapshot: str | None = None     # serve this internal snapshot read-only (qemu-nbd -l: ID_OR_NAME, snapshot.id=/name=)
    backing_root: str | None = None  # absolute path: every backing file must resolve inside it
    no_backing: bool = False        # refuse any backing file
    force_share: bool = False       # qemu-img -U: read-only, taking no lock that conflicts with a writer
    bitmaps: tuple[str, ...] = ()   # persistent dirty bitmaps offered as qemu:dirty-bitmap:NAME (qemu-nbd -B)
    trace: str | None = None        # the allocation trace's file (qcow2/trace.py, JSON lines), absolute


@dataclass
class TlsSettings:
    """NBD_OPT_STARTTLS with these PEM files (absolute paths)."""

    cert: str                       # the server's certificate (chain)
    key: str                        # its private key, unencrypted
    ca: str | None = None           # set: clients must present a certificate this CA signed
    identity: str | None = None     # set (needs ca): ... whose subject is this DN (server/x509_name.py)
    mode: str = TlsMode.REQUIRE.value   # TLS_MODES: "require": plain clients refused; "on": TLS offered; "off"


@dataclass
class ServerSettings:
    exports: list[ExportSettings]
    bind: str | None = "127.0.0.1"  # None: no TCP listener
    port: int = DEFAULT_PORT        # 0: any free port (run_server reports the one bound)
    unix_socket: str | None = None
    verbose: bool = False
    handshake_timeout: float = 10.0
    max_connections: int = 1000
    tls: TlsSettings | None = None  # None: no TLS (STARTTLS is unsupported)
    control: str | None = None      # the control socket's path (server/control.py), or None
    listen_fds: tuple[int, ...] = ()  # listening sockets handed over (systemd socket activation)
    persistent: bool = True         # False: exit once the last client that negotiated leaves (qemu-nbd without -t)
    queue_when_full: bool = False   # at max_connections: leave new clients waiting (qemu-nbd -e), not refused
    extended_headers: bool = True   # offer NBD_OPT_EXTENDED_HEADERS (64-bit lengths); False: refused
