"""The TOML config file, and the value checks it shares with the command line: both build
the server's own settings (server/settings.py: ServerSettings, ExportSettings, TlsSettings).

The TOML file (see ``conf/nbdserve.example.toml``)::

    [server]
    bind = "127.0.0.1"        # TCP address; omit together with socket set for no TCP listener
    port = 10809
    socket = "nbdserve.sock"  # Unix socket, relative to the config file's folder
    control = "control.sock"  # control socket (blkdebug breakpoints at run time), likewise
    verbose = false
    handshake_timeout = 10.0
    max_connections = 1000
    extended_headers = true   # offer NBD extended headers (64-bit lengths); false: refuse them
    tls = { cert = "server-cert.pem", key = "server-key.pem", ca = "ca-cert.pem", mode = "require" }
    # tls identity = "C=GB,O=Org,CN=client": only the client certificate with this subject (needs ca)

    [[export]]
    name = "disk"
    image = "images/disk.qcow2"   # relative to the config file's folder
    format = "qcow2"              # or "raw"; omitted: probed
    read_only = false
    description = "a disk"
    allocator = "fixed"           # or "qemu-1.1.2", "qemu-1.1.2+b7ab0fea"
    delay = { cow_read = 0.5 }    # blkdebug event -> seconds
    inject_error = { l2_update = "ENOSPC:once" }   # blkdebug event -> "ERRNO[:once]"
    backing_root = "images"       # every backing file must resolve inside this folder
    no_backing = false            # true: refuse images that have a backing file
    force_share = false           # true: read-only, sharing the image like qemu-img -U
    bitmaps = ["b0"]              # qcow2 persistent dirty bitmaps served as qemu:dirty-bitmap:NAME

Every flaw is refused with a :class:`ConfigError` whose message starts with the
key at fault, e.g. ``export[1].allocator: expected "fixed" or "qemu-1.1.2", got "foo"``
(export indices count from 0, in file order).
"""

from __future__ import annotations

import os
from typing import Any

from .blockdev.probe import FORMATS
from .qcow2.policy import ALLOCATORS
from .server.settings import TLS_MODES, ExportSettings, ServerSettings, TlsSettings

class ConfigError(ValueError):
    """A configuration is unusable; ``key`` names the offending entry ("" for the whole file)."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


# -- value checks, shared by the TOML loader and the CLI ------------------------------------

def _show(value: Any) -> str:
    """A value as TOML would spell it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        expected = " or ".join(f'"{c}"' for c in choices)
        raise ConfigError(key, f"expected {expected}, got {_show(value)}")
    return value


def check_str(key: str, value: Any, *, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {_show(value)}")
    if nonempty and not value:
        raise ConfigError(key, "must not be empty")
    return value


def check_bitmap_names(key: str, value: Any) -> tuple[str, ...]:
    """A list of bitmap names, each once."""
    if not isinstance(value, list):
        raise ConfigError(key, f"expected an array of bitmap names, got {_show(value)}")
    names = tuple(check_str(f"{key}[{i}]", v, nonempty=True) for i, v in enumerate(value))
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{key}[{i}]", f"bitmap {_show(name)} named twice")
    return names


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {_show(value)}")
    return value


def check_int(key: str, value: Any, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(key, f"expected an integer, got {_show(value)}")
    if value < lo or (hi is not None and value > hi):
        where = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(key, f"out of range: expected {where}, got {value}")
    return value


def check_seconds(key: str, value: Any, *, positive: bool = False) -> float:
    if not _is_number(value):
        raise ConfigError(key, f"expected a number of seconds, got {_show(value)}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(key, f"expected a finite number of seconds, got {value}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(key, f"expected a {'positive' if positive else 'non-negative'} "
                               f"number of seconds, got {_show(value)}")
    return value


def check_delays(key: str, value: Any) -> dict[str, float]:
    """``{event = seconds}``: blkdebug events a request can wait at mapped to non-negative delays."""
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a table of event = seconds, got {_show(value)}")
    delays: dict[str, float] = {}
    for event, seconds in value.items():
        if not event:
            raise ConfigError(key, "event name must not be empty")
        from .qcow2.events import check_suspendable   # here: only a delay needs the engine's names
        try:
            check_suspendable(event)
        except ValueError as e:
            raise ConfigError(f"{key}.{event}", str(e)) from None
        delays[event] = check_seconds(f"{key}.{event}", seconds)
    return delays


def check_inject_errors(key: str, value: Any) -> dict[str, tuple[int, bool]]:
    """``{event = "ERRNO[:once]"}``: fail every firing of the blkdebug event (only the first
    with ``:once``) with ERRNO, a name like ``"ENOSPC"`` or a number (qemu blkdebug's errno/once)."""
    if not isinstance(value, dict):
        raise ConfigError(key, f'expected a table of event = "ERRNO[:once]", got {_show(value)}')
    injections: dict[str, tuple[int, bool]] = {}
    for event, spec in value.items():
        if not event:
            raise ConfigError(key, "event name must not be empty")
        from .qcow2.events import check_event, parse_errno   # here: only an injection needs the engine's names
        try:
            check_event(event)
        except ValueError as e:
            raise ConfigError(f"{key}.{event}", str(e)) from None
        text = str(spec) if isinstance(spec, int) and not isinstance(spec, bool) else spec
        if not isinstance(text, str):
            raise ConfigError(f"{key}.{event}", f'expected "ERRNO" or "ERRNO:once", got {_show(spec)}')
        name, sep, mode = text.partition(":")
        number = parse_errno(name)
        if (sep and mode != "once") or number is None:
            raise ConfigError(f"{key}.{event}", f'expected "ERRNO" or "ERRNO:once" with ERRNO a name '
                                                f'like EIO or ENOSPC or its number, got {_show(spec)}')
        injections[event] = (number, bool(sep))
    return injections


def check_unique_names(exports: list[ExportSettings], key: str = "export") -> None:
    seen: dict[str, int] = {}
    for i, export in enumerate(exports):
        if export.name in seen:
            raise ConfigError(f"{key}[{i}].name",
                              f"duplicate export name {_show(export.name)} "
                              f"(also {key}[{seen[export.name]}])")
        seen[export.name] = i


def _refuse_unknown(key: str, table: dict[str, Any], known: tuple[str, ...]) -> None:
    for k in table:
        if k not in known:
            name = f"{key}.{k}" if key else k
            raise ConfigError(name, f"unknown key (expected one of: {', '.join(known)})")


# -- the TOML file ------------------------------------------------------------------------------

SERVER_KEYS = ("bind", "port", "socket", "control", "verbose", "handshake_timeout", "max_connections", "tls",
               "extended_headers")
TLS_KEYS = ("cert", "key", "ca", "identity", "mode")
EXPORT_KEYS = ("name", "image", "format", "read_only", "description", "allocator", "delay", "inject_error",
               "backing_root", "no_backing", "force_share", "bitmaps", "trace")


def _resolve(base: str, path: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _parse_export(i: int, table: Any, base: str) -> ExportSettings:
    key = f"export[{i}]"
    if not isinstance(table, dict):
        raise ConfigError(key, f"expected a table ([[export]]), got {_show(table)}")
    _refuse_unknown(key, table, EXPORT_KEYS)
    if "image" not in table:
        raise ConfigError(f"{key}.image", "missing (every [[export]] needs an image)")
    image = check_str(f"{key}.image", table["image"], nonempty=True)
    export = ExportSettings(name=check_str(f"{key}.name", table.get("name", "")),
                          image=_resolve(base, image))
    if "format" in table:
        export.format = check_choice(f"{key}.format", table["format"], FORMATS)
    if "read_only" in table:
        export.read_only = check_bool(f"{key}.read_only", table["read_only"])
    if "description" in table:
        export.description = check_str(f"{key}.description", table["description"])
    if "allocator" in table:
        export.allocator = check_choice(f"{key}.allocator", table["allocator"], ALLOCATORS)
    if "delay" in table:
        export.delays = check_delays(f"{key}.delay", table["delay"])
    if "inject_error" in table:
        export.inject_errors = check_inject_errors(f"{key}.inject_error", table["inject_error"])
    if "backing_root" in table:
        export.backing_root = _resolve(base, check_str(f"{key}.backing_root", table["backing_root"],
                                                       nonempty=True))
    if "no_backing" in table:
        export.no_backing = check_bool(f"{key}.no_backing", table["no_backing"])
    if "force_share" in table:
        export.force_share = check_bool(f"{key}.force_share", table["force_share"])
    if "bitmaps" in table:
        export.bitmaps = check_bitmap_names(f"{key}.bitmaps", table["bitmaps"])
    if "trace" in table:
        export.trace = _resolve(base, check_str(f"{key}.trace", table["trace"], nonempty=True))
    return export


def _parse_tls(table: Any, base: str) -> TlsSettings:
    key = "server.tls"
    if not isinstance(table, dict):
        raise ConfigError(key, f"expected a table {{ cert = ..., key = ... }}, got {_show(table)}")
    _refuse_unknown(key, table, TLS_KEYS)
    paths = {}
    for name in ("cert", "key"):
        if name not in table:
            raise ConfigError(f"{key}.{name}", "missing (TLS needs a certificate and its key)")
        paths[name] = _resolve(base, check_str(f"{key}.{name}", table[name], nonempty=True))
    tls = TlsSettings(cert=paths["cert"], key=paths["key"])
    if "ca" in table:
        tls.ca = _resolve(base, check_str(f"{key}.ca", table["ca"], nonempty=True))
    if "identity" in table:
        tls.identity = check_str(f"{key}.identity", table["identity"], nonempty=True)
        if tls.ca is None:
            raise ConfigError(f"{key}.identity", "needs ca (only a verified client certificate has an identity)")
    if "mode" in table:
        tls.mode = check_choice(f"{key}.mode", table["mode"], TLS_MODES)
    return tls


def parse_config(data: dict[str, Any], base_dir: str) -> ServerSettings:
    """Build a ServerSettings from parsed TOML; relative paths are taken from ``base_dir``."""
    base = os.path.abspath(base_dir)
    _refuse_unknown("", data, ("server", "export"))
    server = data.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError("server", f"expected a table ([server]), got {_show(server)}")
    _refuse_unknown("server", server, SERVER_KEYS)

    exports_raw = data.get("export", [])
    if not isinstance(exports_raw, list):
        raise ConfigError("export", f"expected an array of tables ([[export]]), got {_show(exports_raw)}")
    if not exports_raw:
        raise ConfigError("export", "no exports: add at least one [[export]] table")
    exports = [_parse_export(i, t, base) for i, t in enumerate(exports_raw)]
    check_unique_names(exports)

    config = ServerSettings(exports=exports)
    if "socket" in server:
        config.unix_socket = _resolve(base, check_str("server.socket", server["socket"], nonempty=True))
        # Like qemu-nbd -k: a Unix socket alone means no TCP listener unless bind/port ask for one.
        if "bind" not in server and "port" not in server:
            config.bind = None
    if "control" in server:
        config.control = _resolve(base, check_str("server.control", server["control"], nonempty=True))
    if "bind" in server:
        config.bind = check_str("server.bind", server["bind"], nonempty=True)
    if "port" in server:
        config.port = check_int("server.port", server["port"], 0, 65535)   # 0: any free port
    if "verbose" in server:
        config.verbose = check_bool("server.verbose", server["verbose"])
    if "handshake_timeout" in server:
        config.handshake_timeout = check_seconds("server.handshake_timeout",
                                                 server["handshake_timeout"], positive=True)
    if "max_connections" in server:
        config.max_connections = check_int("server.max_connections", server["max_connections"], 1)
    if "tls" in server:
        config.tls = _parse_tls(server["tls"], base)
    if "extended_headers" in server:
        config.extended_headers = check_bool("server.extended_headers", server["extended_headers"])
    return config


def load_config(path: str | os.PathLike[str]) -> ServerSettings:
    """Read a TOML config file; raise ConfigError naming the first flaw found."""
    import tomllib      # only here: ``serve IMAGE`` and ``create`` take the constants above, not a file

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError("", f"cannot read config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"invalid TOML: {e}") from None
    return parse_config(data, os.path.dirname(os.path.abspath(path)))
